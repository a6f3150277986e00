"""Modeled profiles for named presets: a model, a training mode (dtype, LoRA, recompute) and a
device, e.g. `7b-bf16-lora16-80gb` (select with `--sim-preset`, config `model.sim_preset`).

Memory per stage is counted from the architecture, the way the real engine holds it:

- weights: every parameter of the stage in the dtype (embeddings on stage 0; final norm and LM
  head on the last stage), plus the LoRA adapters in float32 (peft's convention);
- training state on a node that trains, at its peak (gradients accumulated, moments held):
  full training keeps gradients in the dtype plus AdamW's two float32 moments (8 B/param), in
  half precision also a float32 master copy (4 B/param): 12 B/param in float32, 14 in bf16. LoRA:
  the same for the adapters only (float32: 4 B grads + 8 B moments), nothing for the frozen base;
- a weight sync or merge moves every weight (full) or only the adapters (LoRA);
- stashed activations per token and layer, what autograd keeps in our blocks: about
  (9H + 3·kv + 4I) values (norm inputs and outputs, q/k/v before and after rotary, attention
  output, SwiGLU's gate, up, act and product); LoRA leaves out the inputs only a frozen weight's
  gradient would need (about 2H + I); RMSNorm keeps float32 copies in half precision (2H x 4 B),
  and with LoRA about as much again for the inputs peft casts to float32 for the adapters;
  recompute keeps only the stage input (H values; token ids on stage 0);
- KV cache: 2 x kv values per token and layer, in the dtype.

Op costs follow `default_profile`: forward 2·params FLOPs per token plus attention; backward
twice the forward for full training, about one forward with LoRA (input gradients only, the
adapters' own gradients are r/H of that), plus one more forward with recompute; the optimizer
step streams 16 B per trained parameter. `lemix profile` measures the real figures.
"""
from __future__ import annotations

from dataclasses import dataclass

from lemix.sched.latency import OpCoeffs, Profile, StageProfile

_DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


@dataclass(frozen=True)
class Arch:
    layers: int
    hidden: int
    intermediate: int
    kv_hidden: int          # n_kv_heads x head_dim
    vocab: int
    head_dim: int = 128     # the rotary table (head_dim / 2 values, in the dtype) sits on every stage


@dataclass(frozen=True)
class Device:
    name: str
    flops: float            # dense half-precision FLOP/s
    bandwidth_Bps: float    # device memory bandwidth
    capacity_bytes: int


@dataclass(frozen=True)
class TrainMode:
    dtype: str = "bfloat16"
    lora_rank: int = 0
    lora_targets: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj")
    recompute: bool = False

    @property
    def label(self) -> str:
        mode = f"lora r={self.lora_rank} alpha={2 * self.lora_rank}" if self.lora_rank else "full"
        return f"{mode} {self.dtype}" + (" +recompute" if self.recompute else "")


@dataclass(frozen=True)
class Preset:
    arch: str
    device: str
    mode: TrainMode


ARCHS = {
    "tiny": Arch(layers=4, hidden=128, intermediate=256, kv_hidden=64, vocab=259, head_dim=32),   # builtin-tiny
    "3b": Arch(layers=28, hidden=3072, intermediate=8192, kv_hidden=1024, vocab=128256),
    "7b": Arch(layers=32, hidden=4096, intermediate=11008, kv_hidden=4096, vocab=32000),
    "70b": Arch(layers=80, hidden=8192, intermediate=28672, kv_hidden=1024, vocab=128256),
}
DEVICES = {
    "cpu": Device("cpu", flops=50e9, bandwidth_Bps=20e9, capacity_bytes=8 * 10**9),
    "a6000-48gb": Device("modeled-a6000", flops=100e12, bandwidth_Bps=768e9, capacity_bytes=48 * 10**9),
    "a100-80gb": Device("modeled-a100-80gb", flops=312e12, bandwidth_Bps=2.0e12, capacity_bytes=80 * 10**9),
    "h100-80gb": Device("modeled-h100-80gb", flops=989e12, bandwidth_Bps=3.35e12, capacity_bytes=80 * 10**9),
}
PRESETS = {
    "7b-bf16-lora16-80gb": Preset("7b", "a100-80gb", TrainMode("bfloat16", 16)),
    "7b-bf16-lora16-recompute-80gb": Preset("7b", "a100-80gb", TrainMode("bfloat16", 16, recompute=True)),
    "7b-bf16-full-80gb": Preset("7b", "a100-80gb", TrainMode("bfloat16")),
    "3b-bf16-lora16-48gb": Preset("3b", "a6000-48gb", TrainMode("bfloat16", 16)),
    "3b-bf16-full-48gb": Preset("3b", "a6000-48gb", TrainMode("bfloat16")),
    "70b-bf16-lora16-h100": Preset("70b", "h100-80gb", TrainMode("bfloat16", 16)),
    "tiny-fp32-full-cpu": Preset("tiny", "cpu", TrainMode("float32")),
    "tiny-fp32-lora8-cpu": Preset("tiny", "cpu", TrainMode("float32", 8)),
    "tiny-bf16-lora8-cpu": Preset("tiny", "cpu", TrainMode("bfloat16", 8)),
    "tiny-fp32-full-recompute-cpu": Preset("tiny", "cpu", TrainMode("float32", recompute=True)),
}


def layer_ranges(num_layers: int, num_stages: int) -> list[tuple[int, int]]:
    """The engine's split: contiguous [start, end), the first `layers % stages` get one more."""
    if not 1 <= num_stages <= num_layers:
        raise ValueError(f"cannot split {num_layers} layers into {num_stages} stages")
    base, extra = divmod(num_layers, num_stages)
    out, start = [], 0
    for s in range(num_stages):
        end = start + base + (1 if s < extra else 0)
        out.append((start, end))
        start = end
    return out


def _lora_params_per_layer(a: Arch, mode: TrainMode) -> int:
    H, I, kv, r = a.hidden, a.intermediate, a.kv_hidden, mode.lora_rank
    shape = {"q_proj": (H, H), "k_proj": (H, kv), "v_proj": (H, kv), "o_proj": (H, H),
             "gate_proj": (H, I), "up_proj": (H, I), "down_proj": (I, H)}
    return sum(r * (i + o) for t, (i, o) in shape.items() if t in mode.lora_targets)


def stage_memory(a: Arch, mode: TrainMode, stage: int, stages: int) -> dict[str, int]:
    """Modeled bytes of one stage: weight, training state, sync, stash and KV per token."""
    lo, hi = layer_ranges(a.layers, stages)[stage]
    nl, H, I, kv, V = hi - lo, a.hidden, a.intermediate, a.kv_hidden, a.vocab
    b = _DTYPE_BYTES[mode.dtype]
    half = b < 4
    params = nl * (2 * H * H + 2 * H * kv + 3 * H * I + 2 * H)
    if stage == 0:
        params += V * H
    if stage == stages - 1:
        params += V * H + H
    adapters = nl * _lora_params_per_layer(a, mode)
    if mode.lora_rank:
        train_state, sync = adapters * (4 + 8), adapters * 4
    else:
        train_state, sync = params * (b + 8 + (4 if half else 0)), params * b
    if mode.recompute:
        act = 8 if stage == 0 else H * b
    else:
        per_layer = 9 * H + 3 * kv + 4 * I - ((2 * H + I) if mode.lora_rank else 0)
        # half precision: RMSNorm's float32 copies; with LoRA also the inputs peft casts to float32
        act = nl * (per_layer * b + ((2 * H * 4) * (2 if mode.lora_rank else 1) if half else 0))
    if stage == stages - 1:
        act += 8 + (0 if mode.recompute else 2 * V * 4)     # labels; logits, float32 for the loss
    return {"weight_bytes": params * b + adapters * 4 + a.head_dim // 2 * b,
            "train_state_bytes": train_state,
            "sync_bytes": sync, "act_bytes_per_token": act, "kv_bytes_per_token": 2 * nl * kv * b,
            "params": params, "adapter_params": adapters}


def preset_profile(name: str, *, stages: int, capacity_bytes: int | None = None,
                   host_bandwidth_Bps: float = 16e9, network_bandwidth_Bps: float = 10e9) -> Profile:
    """The modeled Profile of preset `name` split into `stages` stages."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; allowed: {', '.join(PRESETS)}")
    p = PRESETS[name]
    a, dev, mode = ARCHS[p.arch], DEVICES[p.device], p.mode
    out = []
    for s in range(stages):
        m = stage_memory(a, mode, s, stages)
        lo, hi = layer_ranges(a.layers, stages)[s]
        nl = hi - lo
        fwd = OpCoeffs(a=1.0e-3, b=2 * m["params"] / dev.flops, c=4 * nl * a.hidden / dev.flops)
        bwd = fwd.scaled((1.0 + 2 * mode.lora_rank / a.hidden) if mode.lora_rank else 2.0)
        if mode.recompute:
            bwd = OpCoeffs(bwd.a + fwd.a, bwd.b + fwd.b, bwd.c + fwd.c)
        trained = m["adapter_params"] if mode.lora_rank else m["params"]
        decode = OpCoeffs(a=m["weight_bytes"] / dev.bandwidth_Bps + 0.5e-3, b=8 * m["params"] / dev.flops,
                          c=m["kv_bytes_per_token"] / dev.bandwidth_Bps)
        out.append(StageProfile(
            fwd=fwd, bwd=bwd, decode=decode,
            optim=OpCoeffs(a=trained * 16 / dev.bandwidth_Bps + 1.0e-4),
            weight_bytes=m["weight_bytes"], train_state_bytes=m["train_state_bytes"],
            act_bytes_per_token=m["act_bytes_per_token"],
            tmp_bytes_per_token=a.hidden * 16 + (a.vocab * 4 if s == stages - 1 else 0),
            kv_bytes_per_token=m["kv_bytes_per_token"], sync_bytes=m["sync_bytes"], layers=hi - lo))
    return Profile(model=f"modeled-{p.arch}", device=dev.name, dtype=mode.dtype, stages=tuple(out),
                   capacity_bytes=int(capacity_bytes or dev.capacity_bytes),
                   host_bandwidth_Bps=host_bandwidth_Bps, network_bandwidth_Bps=network_bandwidth_Bps,
                   train_mode=mode.label)
