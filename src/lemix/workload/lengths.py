"""Length models: how many prompt and output tokens each request has.

A length model is anything with `sample(n, rng) -> (prompt_tokens, output_tokens)`, two int64
arrays of length n. Clipping bounds are arguments because the real engine runs small models with
short contexts while the simulator models long ones.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import numpy as np

from lemix.workload.trace import Trace


@runtime_checkable
class LengthModel(Protocol):
    def sample(self, n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        """Draw n (prompt_tokens, output_tokens) pairs as two int64 arrays."""
        ...


def _check_n(n: int) -> int:
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 0:
        raise ValueError(f"n must be an integer >= 0, got {n!r}")
    return int(n)


def _check_bounds(name: str, low: int, high: int | None, floor: int) -> None:
    if isinstance(low, bool) or not isinstance(low, (int, np.integer)) or low < floor:
        raise ValueError(f"min_{name} must be an integer >= {floor}, got {low!r}")
    if high is not None and (
        isinstance(high, bool) or not isinstance(high, (int, np.integer)) or high < low
    ):
        raise ValueError(f"max_{name} must be an integer >= min_{name} ({low}), got {high!r}")


def _lognormal_ints(
    n: int, median: float, sigma: float, low: int, high: int, rng: np.random.Generator
) -> np.ndarray:
    x = rng.lognormal(mean=math.log(median), sigma=sigma, size=n)
    return np.clip(np.rint(x), low, high).astype(np.int64)


@dataclass(frozen=True)
class LognormalLengths:
    """The built-in default: independent lognormal prompt and output lengths, rounded and clipped.

    Medians 256 (prompt) and 64 (output) tokens with log-space sigma 1.0 give a long right tail
    like production traces, without needing one.
    """

    prompt_median: float = 256.0
    prompt_sigma: float = 1.0
    output_median: float = 64.0
    output_sigma: float = 1.0
    min_prompt: int = 8
    max_prompt: int = 4096
    min_output: int = 1
    max_output: int = 1024

    def __post_init__(self) -> None:
        for name in ("prompt_median", "output_median"):
            v = getattr(self, name)
            if not (math.isfinite(v) and v > 0):
                raise ValueError(f"{name} must be finite and > 0, got {v!r}")
        for name in ("prompt_sigma", "output_sigma"):
            v = getattr(self, name)
            if not (math.isfinite(v) and v >= 0):
                raise ValueError(f"{name} must be finite and >= 0, got {v!r}")
        _check_bounds("prompt", self.min_prompt, self.max_prompt, 1)
        _check_bounds("output", self.min_output, self.max_output, 0)

    def sample(self, n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        n = _check_n(n)
        prompt = _lognormal_ints(n, self.prompt_median, self.prompt_sigma,
                                 self.min_prompt, self.max_prompt, rng)
        output = _lognormal_ints(n, self.output_median, self.output_sigma,
                                 self.min_output, self.max_output, rng)
        return prompt, output


@dataclass(frozen=True)
class FixedLengths:
    """Every request has the same lengths (uses no randomness)."""

    prompt_tokens: int
    output_tokens: int = 0

    def __post_init__(self) -> None:
        _check_bounds("prompt", self.prompt_tokens, None, 1)
        _check_bounds("output", self.output_tokens, None, 0)

    def sample(self, n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        n = _check_n(n)
        return (np.full(n, self.prompt_tokens, dtype=np.int64),
                np.full(n, self.output_tokens, dtype=np.int64))


class TraceLengths:
    """Resamples (prompt, output) pairs of a trace with replacement, keeping their correlation.

    The pairs are clipped to [min_prompt, max_prompt] x [min_output, max_output]; a max of None
    leaves that side unbounded.
    """

    def __init__(
        self,
        trace: Trace,
        *,
        min_prompt: int = 1,
        max_prompt: int | None = None,
        min_output: int = 0,
        max_output: int | None = None,
    ) -> None:
        if len(trace) == 0:
            raise ValueError("TraceLengths needs a trace with at least one row")
        _check_bounds("prompt", min_prompt, max_prompt, 1)
        _check_bounds("output", min_output, max_output, 0)
        self.prompt_tokens = np.clip(trace.prompt_tokens, min_prompt, max_prompt).astype(np.int64)
        self.output_tokens = np.clip(trace.output_tokens, min_output, max_output).astype(np.int64)

    def sample(self, n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        n = _check_n(n)
        idx = rng.integers(0, len(self.prompt_tokens), size=n)
        return self.prompt_tokens[idx], self.output_tokens[idx]
