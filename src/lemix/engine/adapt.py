"""How a model adapts: weight dtype, LoRA adapters (peft), recompute.

An `AdaptSpec` is applied once, to the whole Hugging Face model, by `prepare_model`: the weights
are cast to the dtype, `peft.get_peft_model` wraps the attention (or chosen) projections with
LoRA adapters (kept in float32, peft's `autocast_adapter_dtype` convention), and gradient
checkpointing is switched on with the HF call. The prepared model then *is* the description of
the mode: `split_stages` reads it and gives every stage the same dtype, the same LoRA layers
(peft's, injected into our blocks by module path) with the same initial adapter values, and the
recompute flag. So every node, and every restarted node, starts from the same adapters.

Targets are named as in the HF model (peft's suffix rule: a module matches when its path equals
the name or ends with "." + name); `stage_lora_config` translates them to our stage's module
paths.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch
from torch import nn

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
DEFAULT_TARGETS = {"llama": ("q_proj", "k_proj", "v_proj", "o_proj"),
                   "qwen2": ("q_proj", "k_proj", "v_proj", "o_proj"),
                   "gpt2": ("c_attn", "attn.c_proj")}
ADAPTER_NAME = "default"


class AdaptError(ValueError):
    """A training mode the model cannot take (e.g. LoRA targets that match no module)."""


@dataclass(frozen=True)
class AdaptSpec:
    """dtype None = the checkpoint's torch_dtype (float32 when it names none); lora_rank 0 = train
    every parameter; lora_alpha None = 2 x rank; lora_targets None = the attention projections."""

    dtype: str | None = None
    lora_rank: int = 0
    lora_alpha: float | None = None
    lora_targets: tuple[str, ...] | None = None
    recompute: bool = False

    def __post_init__(self) -> None:
        if self.dtype is not None and self.dtype not in DTYPES:
            raise AdaptError(f"dtype {self.dtype!r}: allowed {', '.join(DTYPES)}")
        if self.lora_rank < 0:
            raise AdaptError(f"lora_rank must be >= 0, got {self.lora_rank}")

    @property
    def lora(self) -> bool:
        return self.lora_rank > 0


def spec_from_config(model_cfg) -> AdaptSpec:
    """The AdaptSpec of a config's `model` section (dtype 'auto' = the checkpoint's)."""
    m = model_cfg
    return AdaptSpec(dtype=None if m.dtype == "auto" else m.dtype, lora_rank=m.lora_rank,
                     lora_alpha=m.lora_alpha,
                     lora_targets=tuple(m.lora_targets) if m.lora_targets else None,
                     recompute=m.recompute)


def checkpoint_dtype(config: dict) -> str:
    """The dtype a checkpoint's config.json names (`torch_dtype`, or `dtype` in newer files)."""
    name = str(config.get("torch_dtype") or config.get("dtype") or "float32").removeprefix("torch.")
    return name if name in DTYPES else "float32"


def base_model(hf_model: nn.Module) -> nn.Module:
    """The HF causal LM inside a peft wrapper (or the model itself)."""
    get = getattr(hf_model, "get_base_model", None)
    return get() if get is not None else hf_model


def recompute_on(base: nn.Module) -> bool:
    """Whether gradient checkpointing is on in an HF model (the attribute's name changed in v5)."""
    for name in ("is_activation_checkpointing", "is_gradient_checkpointing"):
        if hasattr(type(base), name):
            return bool(getattr(base, name))
    return False


def lora_config_of(hf_model: nn.Module):
    """The peft LoraConfig of a prepared model, or None without adapters."""
    configs = getattr(hf_model, "peft_config", None)
    return None if not configs else configs[ADAPTER_NAME]


def prepare_model(hf_model: nn.Module, spec: AdaptSpec, family: str, dtype: str) -> nn.Module:
    """Cast to `dtype`, add LoRA adapters (peft) and turn on recompute, as `spec` says."""
    hf_model = hf_model.to(DTYPES[dtype])
    if spec.recompute:   # the HF switch (renamed in transformers 5); split_stages reads it
        enable = getattr(hf_model, "activation_checkpointing_enable", None) or \
            hf_model.gradient_checkpointing_enable
        enable()
    if not spec.lora:
        return hf_model
    from peft import LoraConfig, get_peft_model

    targets = list(spec.lora_targets or DEFAULT_TARGETS[family])
    config = LoraConfig(r=spec.lora_rank, lora_alpha=spec.lora_alpha or 2 * spec.lora_rank,
                        target_modules=targets, lora_dropout=0.0, bias="none",
                        fan_in_fan_out=family == "gpt2", task_type="CAUSAL_LM")
    # a private RNG stream: the same seed gives the same adapters, the caller's RNG is untouched
    with torch.random.fork_rng(devices=[]), warnings.catch_warnings():
        torch.manual_seed(0)
        # peft reads the deprecated `is_gradient_checkpointing` of transformers 5
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        try:
            model = get_peft_model(hf_model, config)
        except ValueError as exc:   # peft's NoMatchingPeftModuleError among others
            raise AdaptError(f"lora_targets {targets} match no module of the {family} model: {exc}") from exc
    return model


def _matches(path: str, targets) -> bool:
    return any(path == t or path.endswith("." + t) for t in targets)


def stage_lora_config(stage: nn.Module, hf_config, module_hf_path):
    """peft LoraConfig for one stage: hf_config's settings, targets as our module paths.

    module_hf_path(our module path) -> its path in the HF model (None for modules with no HF
    counterpart)."""
    from peft import LoraConfig

    targets = []
    for name, module in stage.named_modules():
        hf_path = module_hf_path(name) if name else None
        if hf_path is not None and _matches(hf_path, hf_config.target_modules):
            targets.append(name)
    if not targets:
        return None
    return LoraConfig(r=hf_config.r, lora_alpha=hf_config.lora_alpha, target_modules=targets,
                      lora_dropout=0.0, bias="none", fan_in_fan_out=hf_config.fan_in_fan_out,
                      use_rslora=hf_config.use_rslora)


def train_mode_of(stage: nn.Module) -> str:
    """A stage's training mode as profiles name it, e.g. 'lora r=8 alpha=16 bfloat16 +recompute'."""
    a = stage.adapt
    mode = f"lora r={a.lora_rank} alpha={a.lora_alpha:g}" if a.lora_rank else "full"
    return f"{mode} {a.dtype}" + (" +recompute" if a.recompute else "")
