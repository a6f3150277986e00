"""Loading models: the built-in tiny Llama made in code, or a local HF checkpoint directory."""
from __future__ import annotations

import torch

from lemix.engine.checkpoint import TOKENIZER_FILES, CheckpointError, check_checkpoint_dir, has_tokenizer_files
from lemix.engine.stage import StageModule, split_stages
from lemix.engine.tokenizer import ByteTokenizer, HFTokenizer, load_tokenizer

BUILTIN_TINY = "builtin-tiny"

__all__ = ["BUILTIN_TINY", "CheckpointError", "StageModule", "build_builtin_tiny", "load_model",
           "split_stages"]


def build_builtin_tiny(seed: int = 0, num_layers: int = 4):
    """A small random-init Llama over the byte vocabulary; the same seed gives the same weights."""
    from transformers import LlamaConfig, LlamaForCausalLM
    tok = ByteTokenizer()
    config = LlamaConfig(
        vocab_size=tok.vocab_size, hidden_size=128, intermediate_size=256,
        num_hidden_layers=num_layers, num_attention_heads=4, num_key_value_heads=2,
        max_position_embeddings=2048, bos_token_id=tok.bos_id, eos_token_id=tok.eos_id,
        pad_token_id=tok.pad_id, tie_word_embeddings=False)
    # A private RNG stream: building a model must not disturb the caller's global RNG state.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    return model.float().eval()


def load_model(spec: str, seed: int = 0, *, tokenizer: str | None = None,
               byte_tokenizer: bool = False) -> tuple[torch.nn.Module, ByteTokenizer | HFTokenizer, str]:
    """spec "builtin-tiny" or a checkpoint dir -> (HF model in float32, tokenizer, family).

    family is the HF model_type: "llama", "qwen2" or "gpt2". The tokenizer is the checkpoint's
    own (or the one in the `tokenizer` dir); a checkpoint without tokenizer files is refused
    unless `byte_tokenizer` asks for the byte-level tokenizer on purpose (a silent fallback
    would feed the model 259 byte ids it was never trained on).
    """
    if spec == BUILTIN_TINY:
        return build_builtin_tiny(seed), ByteTokenizer(), "llama"
    config = check_checkpoint_dir(spec)
    from transformers import AutoModelForCausalLM
    try:
        model = AutoModelForCausalLM.from_pretrained(spec, local_files_only=True, dtype=torch.float32)
    except (OSError, ValueError, KeyError) as exc:
        raise CheckpointError(f"could not load the checkpoint in {spec}: {exc}") from exc
    vocab = model.config.vocab_size
    if byte_tokenizer:
        return model.eval(), load_tokenizer(None, vocab), config["model_type"]
    tok_dir = tokenizer or spec
    if not has_tokenizer_files(tok_dir):
        raise CheckpointError(f"{tok_dir} has no tokenizer files ({', '.join(TOKENIZER_FILES)}): pass "
                              f"--tokenizer DIR, or --byte-tokenizer to use the byte-level tokenizer on purpose")
    return model.eval(), load_tokenizer(tok_dir, vocab), config["model_type"]

