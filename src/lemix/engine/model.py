"""Loading models: the built-in tiny Llama made in code, or a local HF checkpoint directory."""
from __future__ import annotations

import torch

from lemix.engine.adapt import DTYPES, AdaptSpec, checkpoint_dtype, prepare_model
from lemix.engine.checkpoint import CheckpointError, check_checkpoint_dir, has_tokenizer_files
from lemix.engine.stage import StageModule, split_stages
from lemix.engine.tokenizer import ByteTokenizer, HFTokenizer, load_tokenizer

BUILTIN_TINY = "builtin-tiny"

__all__ = ["BUILTIN_TINY", "CheckpointError", "StageModule", "AdaptSpec", "build_builtin_tiny", "load_model",
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
    model.lemix_base = {"model": BUILTIN_TINY, "seed": seed}   # how to build it again (export)
    return model.float().eval()


def load_model(spec: str, seed: int = 0, adapt: AdaptSpec | None = None
               ) -> tuple[torch.nn.Module, ByteTokenizer | HFTokenizer, str]:
    """spec "builtin-tiny" or a checkpoint dir -> (HF model, tokenizer, family).

    family is the HF model_type: "llama", "qwen2" or "gpt2". The model is in `adapt.dtype`
    (default: the checkpoint's torch_dtype; float32 for the built-in model), with LoRA adapters
    and recompute when `adapt` asks for them (lemix.engine.adapt.prepare_model).
    """
    adapt = adapt or AdaptSpec()
    if spec == BUILTIN_TINY:
        model, tokenizer, family, dtype = build_builtin_tiny(seed), ByteTokenizer(), "llama", "float32"
    else:
        config = check_checkpoint_dir(spec)
        family, dtype = config["model_type"], checkpoint_dtype(config)
        from transformers import AutoModelForCausalLM
        try:
            model = AutoModelForCausalLM.from_pretrained(spec, local_files_only=True,
                                                         dtype=DTYPES[adapt.dtype or dtype])
        except (OSError, ValueError, KeyError) as exc:
            raise CheckpointError(f"could not load the checkpoint in {spec}: {exc}") from exc
        tok_dir = spec if has_tokenizer_files(spec) else None
        tokenizer = load_tokenizer(tok_dir, model.config.vocab_size)
        model.eval()
        model.lemix_base = {"model": spec, "seed": seed}   # the base reference checkpoints and export keep
    return prepare_model(model, adapt, family, adapt.dtype or dtype), tokenizer, family
