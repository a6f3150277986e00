"""Real text for the tasks of a run: every task gets token ids of exactly its length.

Text comes from a TextSource (the built-in drifting pydoc corpus or the user's JSONL), sampled at
the task's arrival time, so requests and training samples follow the same topic drift.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from lemix.types import Task
from lemix.workload import TextSource


@dataclass(frozen=True)
class TaskTokens:
    """Token ids of a task: one list per sample (one for a request, C for a training task)."""

    samples: tuple[tuple[int, ...], ...]


class TaskTexts:
    def __init__(self, tokenizer, source: TextSource, seed: int = 0, chars_per_token: float = 1.2) -> None:
        self.tok = tokenizer
        self.source = source
        self.seed = seed
        self.chars_per_token = chars_per_token
        self._cache: dict[int, TaskTokens] = {}

    def tokens(self, task: Task) -> TaskTokens:
        got = self._cache.get(task.task_id)
        if got is None:
            rng = np.random.default_rng((self.seed, task.task_id))
            n = task.batch_size if task.is_train else 1
            got = TaskTokens(tuple(self._sample(task.arrival_s, task.prompt_tokens, rng) for _ in range(n)))
            self._cache[task.task_id] = got
        return got

    def _sample(self, t_s: float, n_tokens: int, rng: np.random.Generator) -> tuple[int, ...]:
        chars = max(8, int(n_tokens * self.chars_per_token) + 8)
        for _ in range(8):
            ids = self.tok.encode(self.source.sample_text(t_s, chars, rng))
            if len(ids) >= n_tokens:
                return tuple(ids[:n_tokens])
            chars *= 2
        raise ValueError(f"could not draw {n_tokens} tokens of text at t={t_s:.1f}s")

    def put(self, task_id: int, tokens: TaskTokens) -> None:
        """Tokens given by the caller (online requests) instead of drawn from the source."""
        self._cache[task_id] = tokens

    def drop(self, task_id: int) -> None:
        self._cache.pop(task_id, None)
