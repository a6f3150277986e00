"""Choosing the next token from last-position logits: greedy, or temperature + top-p.

Sampling is stateless: each draw uses a generator seeded from (seed, position of the token being
generated), so a request's tokens do not depend on batching, offloads or retries.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch

from lemix.engine.messages import SamplingParams

_GREEDY = SamplingParams()


def _draw_seed(seed: int, position: int) -> int:
    return (seed * 1_000_003 + position) % (2 ** 63)


def _sample_one(logits: torch.Tensor, p: SamplingParams, position: int) -> int:
    """logits [V] -> one token id."""
    if p.temperature <= 0:
        return int(logits.argmax())
    scaled = logits.float().cpu() / p.temperature                          # [V]
    if not bool(torch.isfinite(scaled).all()):   # a temperature so close to 0 that it is greedy
        return int(logits.argmax())
    probs = torch.softmax(scaled, dim=-1)
    sorted_probs, order = probs.sort(descending=True)
    # Keep the smallest prefix whose mass reaches top_p; the most likely token is always kept,
    # however small top_p is (5e-324 underflows every comparison).
    keep = (sorted_probs.cumsum(0) - sorted_probs) < p.top_p
    keep[0] = True
    sorted_probs = sorted_probs * keep
    gen = torch.Generator().manual_seed(_draw_seed(p.seed, position))
    pick = torch.multinomial(sorted_probs / sorted_probs.sum(), 1, generator=gen)
    return int(order[pick])


def sample_tokens(logits: torch.Tensor, params: Sequence[SamplingParams] | None,
                  positions: Sequence[int]) -> tuple[int, ...]:
    """logits [B,V]; params per sequence (None = greedy); positions of the new tokens [B]."""
    params = params if params is not None else [_GREEDY] * logits.shape[0]
    if len(params) != logits.shape[0]:
        raise ValueError(f"{len(params)} sampling params for {logits.shape[0]} sequences")
    if all(p.temperature <= 0 for p in params):
        return tuple(int(t) for t in logits.argmax(-1).tolist())
    return tuple(_sample_one(logits[b], p, pos) for b, (p, pos) in enumerate(zip(params, positions)))
