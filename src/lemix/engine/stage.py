"""Pipeline stages: a contiguous range of decoder layers that owns copies of its weights.

Stage 0 also holds the embeddings; the last stage holds the final norm and the LM head. Each
stage is an independent nn.Module (deep copies of the HF tensors), so stages can live on
different devices or processes and be trained independently.

Batches are right-padded: sequence b has `lengths[b]` valid tokens at positions 0..len-1.
Tied input/output embeddings (e.g. GPT-2) are untied by the split: stage 0 and the last stage
each train their own copy.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lemix.engine import adapt
from lemix.engine.blocks import (ArchConfig, AttnContext, GPT2Block, LlamaBlock, RMSNorm,
                                 rotary_tables)
from lemix.sched.presets import layer_ranges  # the one split rule, shared with the modeled presets

IGNORE_INDEX = -100   # the HF label convention for "no loss here"

# Rope variants whose frequencies depend on the current sequence length (not supported).
_DYNAMIC_ROPE = ("dynamic", "longrope")


class StageModule(nn.Module):
    """Layers [layer_start, layer_end) of a causal LM, plus embeddings / head at the ends."""

    def __init__(self, cfg: ArchConfig, stage_index: int, num_stages: int,
                 layer_start: int, layer_end: int):
        super().__init__()
        self.cfg = cfg
        self.stage_index, self.num_stages = stage_index, num_stages
        self.layer_start, self.layer_end = layer_start, layer_end
        self.is_first, self.is_last = stage_index == 0, stage_index == num_stages - 1
        llama = cfg.family == "llama"
        if self.is_first:
            self.embed = nn.Embedding(cfg.vocab, cfg.hidden, padding_idx=cfg.pad_id if llama else None)
            if not llama:
                self.pos_embed = nn.Embedding(cfg.max_positions, cfg.hidden)
        self.blocks = nn.ModuleList(
            LlamaBlock(cfg) if llama else GPT2Block(cfg, i) for i in range(layer_start, layer_end))
        if self.is_last:
            self.norm = (RMSNorm(cfg.hidden, cfg.norm_eps) if llama
                         else nn.LayerNorm(cfg.hidden, eps=cfg.norm_eps))
            self.lm_head = nn.Linear(cfg.hidden, cfg.vocab, bias=False)
        if llama:
            self.register_buffer("inv_freq", torch.zeros(cfg.head_dim // 2), persistent=False)
        self.hf_names: dict[str, str] = {}   # our state_dict key -> HF checkpoint key
        self.adapt = adapt.AdaptSpec(dtype="float32")   # the mode split_stages gave the stage
        self.base_ref: dict = {}             # where the base weights come from (for export)

    @property
    def num_layers(self) -> int:
        return self.layer_end - self.layer_start

    def forward(self, x: torch.Tensor, lengths: torch.Tensor,
                kv_out: list | None = None) -> torch.Tensor:
        """Prefill / training over a right-padded batch starting at position 0.

        x: token ids [B,T] on stage 0, else hidden [B,T,H]; lengths [B] long.
        Returns hidden [B,T,H], or logits [B,T,V] on the last stage. When kv_out is a list,
        each layer appends its K,V [B,nkv,T,hd] (for the KV cache).
        """
        B, T = x.shape[:2]
        pos = torch.arange(T, device=x.device)
        positions = pos.expand(B, T)                                   # [B,T]
        key_valid = pos[None, :] < lengths[:, None]                    # [B,T]
        causal = torch.ones(T, T, dtype=torch.bool, device=x.device).tril()
        mask = causal[None, None] & key_valid[:, None, None, :]         # [B,1,T,T]
        return self._run(x, positions, mask, None, kv_out)

    def decode(self, x: torch.Tensor, past: list | None, past_lengths: torch.Tensor,
               kv_out: list | None = None) -> torch.Tensor:
        """One new token per sequence, sequences of different cached lengths.

        x: ids [B] on stage 0, else hidden [B,1,H]; past: per local layer cached K,V
        [B,nkv,P,hd], right-padded; past_lengths [B]. Returns hidden [B,1,H] / logits [B,1,V].
        """
        if x.dim() == 1:
            x = x[:, None]                                             # [B,1]
        B = x.shape[0]
        P = past[0][0].shape[2] if past else 0
        cached_valid = torch.arange(P, device=x.device)[None, :] < past_lengths[:, None]  # [B,P]
        new_valid = torch.ones(B, 1, dtype=torch.bool, device=x.device)
        mask = torch.cat([cached_valid, new_valid], dim=1)[:, None, None, :]   # [B,1,1,P+1]
        return self._run(x, past_lengths[:, None], mask, past, kv_out)

    def _run(self, x, positions, mask, past, kv_out) -> torch.Tensor:
        h = self._embed(x, positions) if self.is_first else x          # [B,T,H]
        ctx = AttnContext(mask=mask, past=past, new_kv=kv_out)
        if self.cfg.family == "llama":
            ctx.cos, ctx.sin = rotary_tables(positions, self.inv_freq, self.cfg.rope_attention_scale,
                                             h.dtype)
        for i, block in enumerate(self.blocks):
            h = block(h, ctx, i)
        if self.is_last:
            h = self.lm_head(self.norm(h))                             # [B,T,V]
        return h

    def _embed(self, ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        h = self.embed(ids)
        if self.cfg.family == "gpt2":
            h = h + self.pos_embed(positions)
        return h


# ---------------------------------------------------------------- losses

def token_nll(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Next-token NLL. logits [B,T,V], labels [B,T] (unshifted, -100 = ignore).

    Returns nll [B,T-1] (0 where ignored) and the valid mask [B,T-1].
    """
    shift_logits = logits[:, :-1].float()                              # [B,T-1,V]
    shift_labels = labels[:, 1:]                                       # [B,T-1]
    valid = shift_labels != IGNORE_INDEX
    nll = F.cross_entropy(shift_logits.transpose(1, 2), shift_labels.clamp_min(0), reduction="none")
    return nll * valid, valid


def causal_lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean NLL over all valid predicted tokens of the batch (the HF CausalLM loss)."""
    nll, valid = token_nll(logits, labels)
    return nll.sum() / valid.sum().clamp_min(1)


def sequence_nll(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per-sequence mean NLL [B]; NaN for a sequence with no predicted token."""
    nll, valid = token_nll(logits, labels)
    return nll.sum(1) / valid.sum(1)


def mask_labels(labels: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """Labels with padding positions (t >= length) set to IGNORE_INDEX."""
    pad = torch.arange(labels.shape[1], device=labels.device)[None, :] >= lengths[:, None]
    return labels.masked_fill(pad, IGNORE_INDEX)


# ---------------------------------------------------------------- splitting

def arch_config(hf_model: nn.Module) -> ArchConfig:
    """Read our ArchConfig from an HF Llama / Qwen2 / GPT-2 causal LM (or its peft wrapper)."""
    hf_model = adapt.base_model(hf_model)
    c = hf_model.config
    if c.model_type == "gpt2":
        return ArchConfig(
            family="gpt2", hidden=c.n_embd, n_layers=c.n_layer, n_heads=c.n_head,
            n_kv_heads=c.n_head, head_dim=c.n_embd // c.n_head,
            intermediate=c.n_inner or 4 * c.n_embd, vocab=c.vocab_size,
            max_positions=c.n_positions, norm_eps=c.layer_norm_epsilon,
            act=c.activation_function, scale_attn_weights=c.scale_attn_weights,
            scale_attn_by_layer=c.scale_attn_by_inverse_layer_idx)
    if c.model_type not in ("llama", "qwen2"):
        raise ValueError(f"unsupported model_type {c.model_type!r} (llama, qwen2 or gpt2)")
    rope_type = (getattr(c, "rope_parameters", None) or {}).get("rope_type", "default")
    if rope_type in _DYNAMIC_ROPE:
        raise ValueError(f"rope_type {rope_type!r} is not supported")
    if getattr(c, "use_sliding_window", False):
        raise ValueError("sliding-window attention is not supported")
    layer = hf_model.model.layers[0]
    return ArchConfig(
        family="llama", hidden=c.hidden_size, n_layers=c.num_hidden_layers,
        n_heads=c.num_attention_heads,
        n_kv_heads=getattr(c, "num_key_value_heads", None) or c.num_attention_heads,
        head_dim=getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads,
        intermediate=c.intermediate_size, vocab=c.vocab_size,
        max_positions=c.max_position_embeddings, norm_eps=c.rms_norm_eps, act=c.hidden_act,
        pad_id=c.pad_token_id,
        qkv_bias=layer.self_attn.q_proj.bias is not None,
        o_bias=layer.self_attn.o_proj.bias is not None,
        mlp_bias=layer.mlp.gate_proj.bias is not None,
        rope_attention_scale=float(hf_model.model.rotary_emb.attention_scaling))


def split_stages(hf_model: nn.Module, num_stages: int) -> list[StageModule]:
    """Split an HF causal LM into `num_stages` StageModules owning copies of its weights (CPU).

    The stages follow the model's mode (lemix.engine.adapt.prepare_model): its dtype, its peft
    LoRA adapters (the same layers, injected into each stage by module path, with the same
    values) and gradient checkpointing (`recompute`).
    """
    from peft import inject_adapter_in_model

    base = adapt.base_model(hf_model)
    cfg = arch_config(base)
    lora = adapt.lora_config_of(hf_model)
    hf_state = base.state_dict()
    spec = adapt.AdaptSpec(
        dtype=str(base.dtype).removeprefix("torch."), lora_rank=lora.r if lora else 0,
        lora_alpha=float(lora.lora_alpha) if lora else None,
        lora_targets=tuple(sorted(lora.target_modules)) if lora else None,
        recompute=adapt.recompute_on(base))
    stages = []
    for s, (lo, hi) in enumerate(layer_ranges(cfg.n_layers, num_stages)):
        with torch.device("meta"):   # allocate nothing until the real tensors are assigned
            stage = StageModule(cfg, s, num_stages, lo, hi)
            if lora is not None:
                stage_cfg = adapt.stage_lora_config(stage, lora, _module_hf_path(stage))
                if stage_cfg is not None:
                    inject_adapter_in_model(stage_cfg, stage, adapter_name=adapt.ADAPTER_NAME)
        stage.hf_names = _hf_names(stage)
        # assign: each stage owns a copy of the HF tensor, in the HF tensor's dtype
        stage.load_state_dict({k: hf_state[stage.hf_names[k]].detach().clone()
                               for k in stage.state_dict()}, strict=True, assign=True)
        if cfg.family == "llama":
            stage.inv_freq = base.model.rotary_emb.inv_freq.detach().clone()
        for name, p in stage.named_parameters():
            p.requires_grad_(lora is None or "lora_" in name)
        stage.adapt = spec
        stage.base_ref = dict(getattr(base, "lemix_base", None) or {"model": base.name_or_path})
        stages.append(stage)
    return stages


def _module_hf_path(stage: StageModule):
    """our module path -> its module path in the HF model (None where there is none)."""
    names = _hf_names(stage)

    def path(module: str) -> str | None:
        key = names.get(module + ".weight")
        return key.removesuffix(".weight") if key is not None else None
    return path


def _hf_names(stage: StageModule) -> dict[str, str]:
    llama = stage.cfg.family == "llama"
    root, layers = ("model.", "model.layers.") if llama else ("transformer.", "transformer.h.")
    ends = {"embed.weight": root + ("embed_tokens.weight" if llama else "wte.weight"),
            "pos_embed.weight": root + "wpe.weight",
            "lm_head.weight": "lm_head.weight"}
    block_key = LlamaBlock.hf_key if llama else GPT2Block.hf_key
    names = {}
    for key in stage.state_dict():
        if key in ends:
            names[key] = ends[key]
        elif key.startswith("norm."):
            names[key] = root + ("norm." if llama else "ln_f.") + key.split(".", 1)[1]
        else:   # blocks.{j}.{param}
            _, j, rest = key.split(".", 2)
            names[key] = f"{layers}{stage.layer_start + int(j)}.{block_key(rest)}"
    return names
