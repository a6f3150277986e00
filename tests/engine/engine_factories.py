"""Factory helpers for the engine tests: tiny HF models, workers, and small pipeline drivers."""
from __future__ import annotations

import torch

from lemix.engine.messages import Backward, Decode, Forward
from lemix.engine.model import split_stages
from lemix.engine.worker import StageWorker

PAD = 258


def tiny_hf(family: str, seed: int = 0, layers: int = 3, tie: bool = False):
    """A random-init tiny HF causal LM of `family` (llama, qwen2, gpt2), float32, eval mode."""
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM
    from transformers import Qwen2Config, Qwen2ForCausalLM
    common = dict(vocab_size=300, bos_token_id=256, eos_token_id=257, pad_token_id=PAD,
                  tie_word_embeddings=tie)
    if family == "gpt2":
        config = GPT2Config(n_embd=64, n_layer=layers, n_head=4, n_positions=128, resid_pdrop=0.0,
                            embd_pdrop=0.0, attn_pdrop=0.0, **common)
        cls = GPT2LMHeadModel
    else:
        config = (LlamaConfig if family == "llama" else Qwen2Config)(
            hidden_size=64, intermediate_size=96, num_hidden_layers=layers, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=128, **common)
        cls = LlamaForCausalLM if family == "llama" else Qwen2ForCausalLM
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = cls(config)
        if family == "qwen2":   # HF inits biases to zero; make them matter
            for layer in model.model.layers:
                for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                    torch.nn.init.normal_(proj.bias, std=0.1)
    return model.float().eval()


def padded_batch(lengths, seed: int = 0, vocab: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """Random ids right-padded with PAD: ids [B,T], attention mask [B,T]."""
    gen = torch.Generator().manual_seed(seed)
    T = max(lengths)
    ids = torch.randint(0, vocab, (len(lengths), T), generator=gen)
    mask = (torch.arange(T)[None, :] < torch.tensor(lengths)[:, None]).long()
    return ids.masked_fill(mask == 0, PAD), mask


def make_workers(hf_model, num_stages: int, **kwargs) -> list[StageWorker]:
    stages = split_stages(hf_model, num_stages)
    return [StageWorker(st, i, num_stages, **kwargs) for i, st in enumerate(stages)]


def pipeline_forward(workers, batch_id, ids, lengths, *, train=False, labels=None, keep_kv=False,
                     seq_ids=None, sampling=None, loss_scale=1.0):
    """Send one micro-batch through all stages; returns the last stage's ForwardResult."""
    seq_ids = tuple(seq_ids if seq_ids is not None else range(len(lengths)))
    hidden = None
    for w in workers:
        res = w.handle(Forward(batch_id, train, seq_ids, tuple(lengths),
                               input_ids=ids if w.stage_index == 0 else None, hidden=hidden,
                               labels=labels, keep_kv=keep_kv, sampling=sampling,
                               loss_scale=loss_scale))
        hidden = res.hidden
    return res


def pipeline_backward(workers, batch_id) -> None:
    grad = None
    for w in reversed(workers):
        grad = w.handle(Backward(batch_id, grad)).grad_input


def pipeline_decode(workers, iter_id, seq_ids, tokens, sampling=None) -> tuple[int, ...]:
    hidden = None
    for w in workers:
        res = w.handle(Decode(iter_id, tuple(seq_ids),
                              token_ids=torch.tensor(tokens) if w.stage_index == 0 else None,
                              hidden=hidden, sampling=sampling))
        hidden = res.hidden
    return res.next_tokens
