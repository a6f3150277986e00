"""Decoder blocks computed with our own code from Hugging Face weights.

Two families: the Llama family (RMSNorm, rotary positions, grouped-query attention, SwiGLU;
Qwen2 is Llama with a bias on q/k/v) and GPT-2 (LayerNorm, learned positions, Conv1D-layout
projections, GELU). Writing the math ourselves, instead of calling the HF layers, gives us full
control of the KV cache and of variable-length (right-padded) batches.

Shapes: B batch, T new tokens, P cached tokens, H hidden, nh/nkv query/KV heads, hd head dim.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers.activations import ACT2FN
from transformers.pytorch_utils import Conv1D as HFConv1D


@dataclass(frozen=True)
class ArchConfig:
    """Everything a stage needs to know about the architecture (read from the HF config)."""

    family: str                  # "llama" (Llama, Qwen2) or "gpt2"
    hidden: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int
    max_positions: int
    norm_eps: float
    act: str
    pad_id: int | None = None
    qkv_bias: bool = False       # llama family: Qwen2 has True
    o_bias: bool = False
    mlp_bias: bool = False
    rope_attention_scale: float = 1.0     # multiplier on cos/sin (some rope types)
    scale_attn_weights: bool = True       # gpt2
    scale_attn_by_layer: bool = False     # gpt2: scale also by 1/(layer_index+1)


@dataclass
class AttnContext:
    """What all attention layers of one stage call share."""

    mask: torch.Tensor                                   # [B,1,T,P+T] bool, True = may attend
    cos: torch.Tensor | None = None                      # [B,T,hd] rotary tables (llama family)
    sin: torch.Tensor | None = None
    past: list[tuple[torch.Tensor, torch.Tensor]] | None = None    # per local layer K,V [B,nkv,P,hd]
    new_kv: list[tuple[torch.Tensor, torch.Tensor]] | None = None  # layers append K,V [B,nkv,T,hd]


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, ctx: AttnContext, layer: int,
           scale: float) -> torch.Tensor:
    """q [B,nh,T,hd], k/v [B,nkv,T,hd] of the new tokens -> attention output [B,T,nh*hd]."""
    B, nh, T, hd = q.shape
    if ctx.new_kv is not None:
        ctx.new_kv.append((k, v))
    if ctx.past is not None:
        past_k, past_v = ctx.past[layer]
        k = torch.cat([past_k, k], dim=2)                # [B,nkv,P+T,hd]
        v = torch.cat([past_v, v], dim=2)
    rep = nh // k.shape[1]
    if rep > 1:  # grouped-query attention: query head h reads KV head h // rep
        k = k.repeat_interleave(rep, dim=1)              # [B,nh,P+T,hd]
        v = v.repeat_interleave(rep, dim=1)
    # Right padding keeps every query row non-empty (key 0 or the new token is always valid),
    # so no row is fully masked and no NaN can leak into gradients.
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=ctx.mask, scale=scale)  # [B,nh,T,hd]
    return out.transpose(1, 2).reshape(B, T, nh * hd)


def rotary_tables(positions: torch.Tensor, inv_freq: torch.Tensor, scale: float,
                  dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """positions [B,T] -> cos, sin [B,T,hd] (the half-split layout HF Llama checkpoints use)."""
    freqs = positions[..., None].float() * inv_freq.float()   # [B,T,hd/2]
    emb = torch.cat([freqs, freqs], dim=-1)                    # [B,T,hd]
    return (emb.cos() * scale).to(dtype), (emb.sin() * scale).to(dtype)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [B,n,T,hd] rotated by position; cos/sin [B,T,hd]."""
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos[:, None] + rotated * sin[:, None]


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalize in float32 like the reference implementation, then scale.
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)


class LlamaBlock(nn.Module):
    """Pre-norm decoder block: x + attn(norm(x)), then + SwiGLU(norm(x))."""

    def __init__(self, cfg: ArchConfig):
        super().__init__()
        H, nh, nkv, hd, inter = cfg.hidden, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.intermediate
        self.cfg = cfg
        self.input_layernorm = RMSNorm(H, cfg.norm_eps)
        self.post_attention_layernorm = RMSNorm(H, cfg.norm_eps)
        self.q_proj = nn.Linear(H, nh * hd, bias=cfg.qkv_bias)
        self.k_proj = nn.Linear(H, nkv * hd, bias=cfg.qkv_bias)
        self.v_proj = nn.Linear(H, nkv * hd, bias=cfg.qkv_bias)
        self.o_proj = nn.Linear(nh * hd, H, bias=cfg.o_bias)
        self.gate_proj = nn.Linear(H, inter, bias=cfg.mlp_bias)
        self.up_proj = nn.Linear(H, inter, bias=cfg.mlp_bias)
        self.down_proj = nn.Linear(inter, H, bias=cfg.mlp_bias)
        self.act = ACT2FN[cfg.act]

    def forward(self, x: torch.Tensor, ctx: AttnContext, layer: int) -> torch.Tensor:
        B, T, _ = x.shape
        hd = self.cfg.head_dim
        h = self.input_layernorm(x)
        q = self.q_proj(h).view(B, T, -1, hd).transpose(1, 2)   # [B,nh,T,hd]
        k = self.k_proj(h).view(B, T, -1, hd).transpose(1, 2)   # [B,nkv,T,hd]
        v = self.v_proj(h).view(B, T, -1, hd).transpose(1, 2)
        q, k = apply_rotary(q, ctx.cos, ctx.sin), apply_rotary(k, ctx.cos, ctx.sin)
        x = x + self.o_proj(attend(q, k, v, ctx, layer, hd ** -0.5))
        h = self.post_attention_layernorm(x)
        return x + self.down_proj(self.act(self.gate_proj(h)) * self.up_proj(h))

    @staticmethod
    def hf_key(key: str) -> str:
        """Our parameter name -> the name inside an HF Llama/Qwen2 decoder layer."""
        head = key.split(".")[0]
        if head in ("q_proj", "k_proj", "v_proj", "o_proj"):
            return "self_attn." + key
        if head in ("gate_proj", "up_proj", "down_proj"):
            return "mlp." + key
        return key


class Conv1D(HFConv1D):
    """GPT-2's projection layout: weight [in, out], y = x @ W + b (transformers' own class, so
    peft recognizes it as a LoRA target)."""

    def __init__(self, n_in: int, n_out: int):
        super().__init__(n_out, n_in)


_GPT2_KEYS = {"c_attn": "attn.c_attn", "attn_proj": "attn.c_proj",
              "c_fc": "mlp.c_fc", "mlp_proj": "mlp.c_proj"}


class GPT2Block(nn.Module):
    """Pre-LayerNorm block: x + attn(ln_1(x)), then + MLP(ln_2(x))."""

    def __init__(self, cfg: ArchConfig, layer_index: int):
        super().__init__()
        H = cfg.hidden
        self.cfg = cfg
        self.ln_1 = nn.LayerNorm(H, eps=cfg.norm_eps)
        self.ln_2 = nn.LayerNorm(H, eps=cfg.norm_eps)
        self.c_attn = Conv1D(H, 3 * H)
        self.attn_proj = Conv1D(H, H)
        self.c_fc = Conv1D(H, cfg.intermediate)
        self.mlp_proj = Conv1D(cfg.intermediate, H)
        self.act = ACT2FN[cfg.act]
        scale = cfg.head_dim ** -0.5 if cfg.scale_attn_weights else 1.0
        # The optional per-layer scaling uses the layer's index in the whole model.
        self.scale = scale / (layer_index + 1) if cfg.scale_attn_by_layer else scale

    def forward(self, x: torch.Tensor, ctx: AttnContext, layer: int) -> torch.Tensor:
        B, T, H = x.shape
        hd = self.cfg.head_dim
        q, k, v = self.c_attn(self.ln_1(x)).split(H, dim=-1)   # 3 x [B,T,H]
        q, k, v = (t.view(B, T, -1, hd).transpose(1, 2) for t in (q, k, v))   # [B,nh,T,hd]
        x = x + self.attn_proj(attend(q, k, v, ctx, layer, self.scale))
        return x + self.mlp_proj(self.act(self.c_fc(self.ln_2(x))))

    @staticmethod
    def hf_key(key: str) -> str:
        """Our parameter name -> the name inside an HF GPT-2 block."""
        head, rest = key.split(".", 1)
        return f"{_GPT2_KEYS.get(head, head)}.{rest}"
