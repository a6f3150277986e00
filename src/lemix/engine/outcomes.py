"""What the engine hands out besides the scheduler's records: the listener protocol an online
user (the HTTP server) implements, the weighted average of a merge, and per-step losses."""
from __future__ import annotations

from dataclasses import replace
from typing import Protocol

import torch

from lemix.engine.messages import TokenLogprob
from lemix.types import RequestRecord, TrainStepRecord, TrainTaskRecord


class Listener(Protocol):
    """What an online user of the engine (the HTTP server) hears, on the engine's thread."""

    def on_token(self, task_id: int, token: int, logprob: TokenLogprob | None = None) -> bool:
        """A generated token (and its logprob, when the request's sampling asked); return True
        to stop the sequence here (a stop string matched)."""
        ...

    def on_finish(self, record: RequestRecord | TrainTaskRecord) -> None: ...

    def on_applied(self, task_ids: tuple[int, ...], node: int, version: int) -> None:
        """Training tasks whose gradients an optimizer step of `node` just applied."""
        ...

    # Optional (called only when the listener has the method):
    # on_train_loss(node, loss) -- a training micro-batch's mean token NLL, as soon as its forward
    # reached the last stage; on_prompt_logprobs(task_id, logprobs) -- a request's prompt
    # logprobs (tokens 1..), when its sampling asked (SamplingParams.prompt_logprobs).


def average_weights(copies: list[tuple[float, dict[str, torch.Tensor]]]) -> dict[str, torch.Tensor]:
    """The weighted average of state dicts (weights need not sum to 1), summed in list order."""
    total = sum(w for w, _ in copies)
    return {k: sum(w * sd[k] for w, sd in copies) / total for k in copies[0][1]}


def step_losses(steps: list[TrainStepRecord], train_losses: list[tuple[int, float, float]]) -> list[TrainStepRecord]:
    """Each node step gets the mean loss of the micro-batches that node finished before it."""
    out = []
    by_node: dict[int, list[tuple[float, float]]] = {}
    for node, t, loss in train_losses:
        by_node.setdefault(node, []).append((t, loss))
    prev: dict[int, float] = {}
    for st in sorted(steps, key=lambda s: (s.node, s.time_s)):
        lo = prev.get(st.node, -1.0)
        losses = [l for t, l in by_node.get(st.node, []) if lo < t <= st.time_s]
        prev[st.node] = st.time_s
        out.append(replace(st, loss=sum(losses) / len(losses) if losses else None))
    return sorted(out, key=lambda s: s.time_s)
