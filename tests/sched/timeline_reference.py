"""A plain per-op node timeline: the reference NodeTimeline's answers are compared with.

Every op's (start, end, train) interval in one sorted list per stage; every query scans the
list from the start, every committed op is searched for and inserted on its own. This is the
Algorithm 1 walk with no short cut at all.
"""
from __future__ import annotations

import bisect


class PlainTimeline:
    def __init__(self, num_stages: int) -> None:
        self.iv: list[list[tuple[float, float, bool]]] = [[] for _ in range(num_stages)]
        self.horizon_s = float("inf")

    def add(self, stage: int, start: float, end: float, train: bool) -> None:
        bisect.insort_right(self.iv[stage], (start, end, train))

    def earliest(self, stage: int, ready: float, dur: float, jump_training: bool) -> tuple[float, float]:
        t, prev_end = ready, -1.0
        for start, end, train in self.iv[stage]:
            if end <= t:
                prev_end = max(prev_end, end)
                continue
            if jump_training and train and start >= t:
                continue   # queued training that has not started by t: jumped
            if start >= t + dur:
                break
            prev_end = max(prev_end, end)
            t = end
        return t, prev_end

    def chain(self, stage_ops, ready: float, train: bool) -> float:
        for k, (stage, dur) in enumerate(stage_ops):
            start, _ = self.earliest(stage, ready, dur, False)
            if k == 0:
                self.horizon_s = min(self.horizon_s, start)
            ready = start + dur
            self.add(stage, start, ready, train)
        return ready


def plain_build(num_stages: int, now: float, running, chains) -> PlainTimeline:
    """build_from_runs() on the plain timeline: running ops (stage, start, end, train) first,
    busy until now at least, then chains (ready_s, [(stage, durations), ...], train)."""
    tl = PlainTimeline(num_stages)
    for stage, start, end, train in running:
        tl.add(stage, start, max(now, end), train)
        tl.horizon_s = min(tl.horizon_s, end)
    for ready, runs, train in chains:
        tl.chain([(s, d) for s, ds in runs for d in ds], max(now, ready), train)
    return tl
