"""Forecast of idleness increased (II) and response time (R): the paper's Algorithm 1.

A node's timeline holds, per stage, the predicted intervals of the ops it already owes
(running ops with their actual start, then queued work in dispatch order). Placing a task
walks its ops stage by stage: an op may start at max(ready_s, free_s) where ready_s is the
end of the task's op on the previous stage (a stage waits for its input) and free_s is the
earliest gap on that stage long enough for the op, given every committed op, training
backwards included ("far dependency").

II = the idle time the placement leaves on the node's stages from now on: on each stage the gap
between max(now, end of the previous committed op) and the task's op start. Time already spent
idle is sunk and does not count.
"""
from __future__ import annotations

import bisect
from typing import NamedTuple, Sequence

# An interval: (start_s, end_s, train)
Interval = tuple[float, float, bool]
# A chain as runs: (stage, durations of consecutive ops on that stage), in dependency order
Runs = list[tuple[int, Sequence[float]]]


class Forecast(NamedTuple):   # a NamedTuple: made once per node per decision, so cheap to build
    ii_s: float              # idleness increased, summed over stages
    r_s: float               # response: end of the last forward - arrival (+ decode estimate)
    stage_s: float           # the task's own mean predicted stage time (t-hat)
    ii_paper_s: float = 0.0  # the research code's gaps: from the previous op's end, not from now
    first_start_s: float = 0.0


class NodeTimeline:
    """Predicted busy intervals per stage of one node, built at `built_s`.

    `iv[stage]` holds (start, end, train) sorted. Intervals committed by `chain` never overlap,
    so their ends are sorted too: `earliest` bisects to the first interval ending after `ready`
    instead of scanning from the start, and a query that jumps queued training walks only the
    inference intervals. An `add` that overlaps what is there (possible only through a direct
    call) switches the timeline to the plain scan, which gives the same answers for any input.
    """

    __slots__ = ("built_s", "horizon_s", "iv", "_ends", "_inf", "_inf_ends", "_disjoint")

    def __init__(self, num_stages: int, built_s: float) -> None:
        self.built_s = built_s
        # the first predicted event: the earliest predicted end of a running op or start of a
        # committed chain. Until then a rebuild of the unchanged node would give this timeline.
        self.horizon_s = float("inf")
        self.iv: list[list[Interval]] = [[] for _ in range(num_stages)]
        self._ends: list[list[float]] = [[] for _ in range(num_stages)]        # ends of iv[stage]
        self._inf: list[list[tuple[float, float]]] = [[] for _ in range(num_stages)]  # non-training
        self._inf_ends: list[list[float]] = [[] for _ in range(num_stages)]
        self._disjoint = True

    def add(self, stage: int, start: float, end: float, train: bool) -> None:
        iv = self.iv[stage]
        item = (start, end, train)
        i = bisect.bisect_right(iv, item)
        if self._disjoint and (end < start or (i > 0 and iv[i - 1][1] > start)
                               or (i < len(iv) and end > iv[i][0])):
            self._disjoint = False
        iv.insert(i, item)
        self._ends[stage].insert(i, end)
        if not train:
            inf = self._inf[stage]
            j = bisect.bisect_right(inf, (start, end))
            inf.insert(j, (start, end))
            self._inf_ends[stage].insert(j, end)

    def earliest(self, stage: int, ready: float, dur: float, jump_training: bool) -> tuple[float, float]:
        """Earliest start >= ready with `dur` free on `stage`, and the end of the op before it.

        With jump_training (inference under inference-first dispatch), queued training ops that
        would not have started by then do not block: the inference op is dispatched first.
        """
        if not self._disjoint:
            return self._earliest_scan(stage, ready, dur, jump_training)
        # Intervals ending by `ready` only raise prev_end; ends are sorted, so that is the last.
        ends = self._ends[stage]
        i = bisect.bisect_right(ends, ready)
        prev_end = ends[i - 1] if i and ends[i - 1] > -1.0 else -1.0
        t = ready
        iv = self.iv[stage]
        n = len(iv)
        if jump_training:
            # Only the first interval ending after `ready` can be training that blocks (one that
            # already covers `ready`); every later one starts after t and is jumped.
            if i < n:
                start, end, train = iv[i]
                if not (train and start >= t):
                    if start >= t + dur:
                        return t, prev_end
                    if end > prev_end:
                        prev_end = end
                    t = end
            inf = self._inf[stage]
            j = bisect.bisect_right(self._inf_ends[stage], t)
            for k in range(j, len(inf)):
                start, end = inf[k]
                if end <= t:
                    continue  # a zero-length op at t: prev_end is t already
                if start >= t + dur:
                    break
                if end > prev_end:
                    prev_end = end
                t = end
            return t, prev_end
        while i < n:
            start, end, _ = iv[i]
            i += 1
            if end <= t:
                if end > prev_end:
                    prev_end = end
                continue
            if start >= t + dur:
                break
            if end > prev_end:
                prev_end = end
            t = end
        return t, prev_end

    def _earliest_scan(self, stage: int, ready: float, dur: float, jump_training: bool) -> tuple[float, float]:
        """The reference walk over every interval (any input, overlapping or not)."""
        t = ready
        prev_end = -1.0
        for start, end, train in self.iv[stage]:
            if end <= t:
                prev_end = max(prev_end, end)
                continue
            if jump_training and train and start >= t:
                continue
            if start >= t + dur:
                break
            # overlaps [t, t + dur): move past it
            prev_end = max(prev_end, end)
            t = end
        return t, prev_end

    def chain(self, stage_ops: list[tuple[int, float]], ready: float, train: bool) -> float:
        """Commit a dependent chain of (stage, duration) ops; return the end of the last. Each op
        goes where earliest(stage, ready, dur, False) puts it, as add() would."""
        return self.chain_runs(runs_of(stage_ops), ready, train)

    def chain_runs(self, runs: Runs, ready: float, train: bool) -> float:
        """chain() of the ops the runs list in order: (stage, durations of consecutive ops there).

        The walk is inlined (timeline rebuilds are most of a decision's cost), with two short cuts
        that place each op where it would put it. `tail`: nothing on the stage ends after `ready`
        and an op starting then sorts last, so it is appended with no search; after one op of the
        run goes last, so do the rest. `gap`: the previous op of the run went into a gap, before
        the interval now at iv[gap] (starting at `limit`); the next one, starting at its end, goes
        there too if it ends by `limit`."""
        first = True
        bisect_right = bisect.bisect_right
        ivs, ends_of, infs, inf_ends = self.iv, self._ends, self._inf, self._inf_ends
        for stage, durs in runs:
            ends = ends_of[stage]
            iv = ivs[stage]
            tail = self._disjoint and (not ends or ends[-1] < ready or (ends[-1] == ready and iv[-1][0] < ready))
            gap, limit = -1, 0.0
            for dur in durs:
                if tail:
                    start = ready
                    ready = ready + dur
                    iv.append((start, ready, train))
                    ends.append(ready)
                    if not train:
                        infs[stage].append((start, ready))
                        inf_ends[stage].append(ready)
                else:
                    if gap >= 0:
                        end = ready + dur
                        if ready < end <= limit:   # (a zero-length op takes the walk below)
                            start, ready = ready, end
                            iv.insert(gap, (start, ready, train))
                            ends.insert(gap, ready)
                            if not train:
                                self._insert_inf(stage, start, ready)
                            gap += 1
                            continue   # (not the chain's first op: the horizon is set)
                        gap = -1
                    if not self._disjoint:
                        start, _ = self._earliest_scan(stage, ready, dur, False)
                        ready = start + dur
                        self.add(stage, start, ready, train)
                    else:
                        # earliest(): skip what ends by `ready`, then move past every op in the way
                        t = ready
                        i = bisect_right(ends, t)
                        n = len(iv)
                        while i < n:
                            s0, e0, _ = iv[i]
                            if e0 > t:
                                if s0 >= t + dur:
                                    break
                                t = e0
                            i += 1
                        start, ready = t, t + dur
                        item = (start, ready, train)
                        if i == n and (not iv or iv[-1] <= item):
                            iv.append(item)
                            ends.append(ready)
                            if not train:
                                infs[stage].append((start, ready))
                                inf_ends[stage].append(ready)
                            tail = True   # the next op of the run starts at its end: it goes last too
                        elif i < n and ready > start:
                            # into the gap before iv[i]: everything before ends by `start`, iv[i]
                            # starts at `ready` or later, so i is where add() would bisect to
                            limit = iv[i][0]
                            iv.insert(i, item)
                            ends.insert(i, ready)
                            if not train:
                                self._insert_inf(stage, start, ready)
                            gap = i + 1
                        else:
                            self.add(stage, start, ready, train)
                if first:  # the chain's first op starts before its others
                    first = False
                    if start < self.horizon_s:
                        self.horizon_s = start
        return ready

    def _insert_inf(self, stage: int, start: float, end: float) -> None:
        """An inference op placed into a gap: into the inference-only lists, as add() does."""
        inf = self._inf[stage]
        k = bisect.bisect_right(inf, (start, end))
        inf.insert(k, (start, end))
        self._inf_ends[stage].insert(k, end)


def runs_of(stage_ops: list[tuple[int, float]]) -> Runs:
    """(stage, duration) ops as runs: consecutive ops on one stage grouped."""
    runs: list[tuple[int, list[float]]] = []
    for stage, dur in stage_ops:
        if runs and runs[-1][0] == stage:
            runs[-1][1].append(dur)
        else:
            runs.append((stage, [dur]))
    return runs


def forecast_chain(
    tl: NodeTimeline,
    now: float,
    arrival_s: float,
    fwd: list[float],
    bwd: list[float],
    jump_training: bool,
) -> Forecast:
    """II and R of placing a task with per-stage forward (and training backward) durations."""
    earliest = tl.earliest
    ready = now if now >= arrival_s else arrival_s           # max(now, arrival_s)
    ii = 0.0
    ii_paper = 0.0
    first = ready
    own_fwd_end = []
    for s, dur in enumerate(fwd):
        start, prev_end = earliest(s, ready, dur, jump_training)
        if s == 0:
            first = start
        ii += start - (now if now >= prev_end else prev_end)
        ii_paper += start - (prev_end if prev_end >= 0 else now)
        ready = start + dur
        own_fwd_end.append(ready)
    fwd_end = ready
    for s in range(len(bwd) - 1, -1, -1):
        start, prev_end = earliest(s, ready, bwd[s], False)
        own = own_fwd_end[s]
        if own > prev_end:  # the task's own forward also covers the stage
            prev_end = own
        ii += start - (now if now >= prev_end else prev_end)
        ii_paper += start - (prev_end if prev_end >= 0 else now)
        ready = start + bwd[s]
    t_hat = (sum(fwd) + sum(bwd)) / max(1, len(fwd) + len(bwd))
    return Forecast(ii, fwd_end - arrival_s, t_hat, ii_paper, first)


def forecast_alone(now: float, arrival_s: float, fwd: list[float], bwd: list[float]) -> Forecast:
    """forecast_chain on an idle node (an empty timeline), with the same arithmetic: every op
    starts when its input is ready; a stage's previous op is the task's own forward, if any."""
    ready = now if now >= arrival_s else arrival_s   # max(now, arrival_s)
    first = ready
    ii = ii_paper = 0.0
    own_fwd_end = []
    for f in fwd:
        ii += ready - now          # prev_end is -1: max(now, -1) is now (times are >= 0)
        ii_paper += ready - now
        ready = ready + f
        own_fwd_end.append(ready)
    fwd_end = ready
    for s in range(len(bwd) - 1, -1, -1):
        prev_end = own_fwd_end[s]
        ii += ready - (now if now >= prev_end else prev_end)
        ii_paper += ready - prev_end
        ready = ready + bwd[s]
    t_hat = (sum(fwd) + sum(bwd)) / max(1, len(fwd) + len(bwd))
    return Forecast(ii, fwd_end - arrival_s, t_hat, ii_paper, first)


def build_timeline(
    num_stages: int,
    now: float,
    running: list[tuple[int, float, float, bool]],
    chains: list[tuple[float, list[tuple[int, float]], bool]],
) -> NodeTimeline:
    """Timeline from running ops (stage, start, predicted end, train) and queued chains
    (ready_s, [(stage, dur), ...], train) in dispatch order."""
    return build_from_runs(num_stages, now, running, [(r, runs_of(ops), t) for r, ops, t in chains])


def build_from_runs(
    num_stages: int,
    now: float,
    running: list[tuple[int, float, float, bool]],
    chains: list[tuple[float, Runs, bool]],
) -> NodeTimeline:
    """build_timeline() with each chain given as runs (ready_s, [(stage, durs), ...], train)."""
    tl = NodeTimeline(num_stages, now)
    for stage, start, end, train in running:
        busy = end if end > now else now   # max(now, end)
        if tl.iv[stage] or busy < start:
            tl.add(stage, start, busy, train)
        else:   # (as add() on an empty stage: one running op per stage is the usual case)
            tl.iv[stage].append((start, busy, train))
            tl._ends[stage].append(busy)
            if not train:
                tl._inf[stage].append((start, busy))
                tl._inf_ends[stage].append(busy)
        if end < tl.horizon_s:
            tl.horizon_s = end
    for ready, runs, train in chains:
        tl.chain_runs(runs, ready if ready > now else now, train)   # max(now, ready)
    return tl
