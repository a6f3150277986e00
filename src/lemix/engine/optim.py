"""The optimizer of one stage: AdamW over the trainable parameters only, state in float32.

With LoRA the trainable parameters are the adapters (float32 already, peft's convention), so
AdamW runs on them directly and the frozen base has no gradient and no optimizer state. When
trainable parameters are half precision (full training in bfloat16/float16), AdamW runs on
float32 master copies (the mixed-precision convention): the half-precision gradients are copied
into the masters' .grad, AdamW steps the masters, and the weights are the masters rounded back.
So updates smaller than a half-precision ulp are not lost, and the AdamW moments are float32.
"""
from __future__ import annotations

import torch
from torch import nn


class StageOptimizer:
    def __init__(self, params: list[nn.Parameter], *, lr: float, weight_decay: float) -> None:
        self.params = params
        half = any(p.dtype != torch.float32 for p in params)
        self.masters = ([p.detach().float().clone().requires_grad_() for p in params]
                        if half else None)
        self.inner = torch.optim.AdamW(self.masters if half else params, lr=lr,
                                       weight_decay=weight_decay)

    def step(self) -> None:
        if self.masters is None:
            self.inner.step()
            return
        for p, m in zip(self.params, self.masters):
            m.grad = None if p.grad is None else p.grad.float()
        self.inner.step()
        with torch.no_grad():
            for p, m in zip(self.params, self.masters):
                p.copy_(m)
                m.grad = None

    def zero_grad(self) -> None:
        for p in self.params:
            p.grad = None

    def weights_changed(self) -> None:
        """The weights were overwritten (sync, merge, restore): the masters follow them."""
        if self.masters is not None:
            with torch.no_grad():
                for p, m in zip(self.params, self.masters):
                    m.copy_(p)

    @property
    def state(self) -> dict:
        """AdamW's per-parameter state (keyed by the masters in half precision)."""
        return self.inner.state

    def state_dict(self) -> dict:
        return self.inner.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.inner.load_state_dict(state)

    @property
    def state_bytes(self) -> int:
        """AdamW moments (and float32 masters) held on the device."""
        moments = sum(v.nbytes for st in self.inner.state.values() for v in st.values()
                      if torch.is_tensor(v))
        return moments + sum(m.nbytes for m in self.masters or ())
