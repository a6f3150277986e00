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
from itertools import accumulate, islice, repeat
from math import ulp as _ulp
from typing import Iterable, NamedTuple, Sequence

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

    A stage keeps its ops as runs: ops of one kind (training or not) back to back, each starting
    where the one before it ends (the chunks of a micro-batch, queued ops that follow each
    other), stored as one item with its boundaries [start, end of op 1, ..., end of the last].
    `iv` lists the per-op intervals (start, end, train), sorted; every answer is the one the
    per-op intervals give. Committed ops never overlap, so run ends are sorted too: `earliest`
    bisects to the first run ending after `ready`. Walking past a run is walking past each of its
    ops when `b + dur > b` in floats at each inner boundary b, which `dur >= ulp(the stage's last
    end)` guarantees (a run grows only at a boundary >= 0, and durations are >= 0); a
    zero-length or negligible `dur` walks the ops instead. An `add` that overlaps what is there
    (possible only through a direct call) switches the timeline to plain per-op lists and the
    plain scan, which gives the same answers for any input.
    """

    __slots__ = ("built_s", "horizon_s", "_b", "_en", "_tr", "_ops")

    def __init__(self, num_stages: int, built_s: float) -> None:
        self.built_s = built_s
        # the first predicted event: the earliest predicted end of a running op or start of a
        # committed chain. Until then a rebuild of the unchanged node would give this timeline.
        self.horizon_s = float("inf")
        self._b: list[list[list[float]]] = [[] for _ in range(num_stages)]   # each run's boundaries
        self._en: list[list[float]] = [[] for _ in range(num_stages)]        # each run's end
        self._tr: list[list[bool]] = [[] for _ in range(num_stages)]         # each run's kind
        self._ops: list[list[Interval]] | None = None   # per-op lists, once an add() overlapped

    @property
    def iv(self) -> list[list[Interval]]:
        """Per stage, the (start, end, train) interval of every op, sorted."""
        if self._ops is not None:
            return self._ops
        return [self._expand(s) for s in range(len(self._b))]

    def _expand(self, stage: int) -> list[Interval]:
        out: list[Interval] = []
        for b, train in zip(self._b[stage], self._tr[stage]):
            out.extend(zip(b, islice(b, 1, None), repeat(train)))
        return out

    def _repack(self, stage: int, ops: list[Interval]) -> None:
        """A stage's runs, in place, from its sorted disjoint per-op intervals."""
        bs, en, tr = self._b[stage], self._en[stage], self._tr[stage]
        bs.clear()
        en.clear()
        tr.clear()
        for start, end, train in ops:
            if en and en[-1] == start and tr[-1] == train and start >= 0.0:
                bs[-1].append(end)
                en[-1] = end
            else:
                bs.append([start, end])
                en.append(end)
                tr.append(train)

    def add(self, stage: int, start: float, end: float, train: bool) -> None:
        """Insert one op's interval where bisect puts it among the stage's ops (running ops, and
        ops the short cuts of chain_runs do not place): the stage's ops are listed, the op goes
        in, and the stage is packed into runs again."""
        item = (start, end, train)
        if self._ops is None:
            ops = self._expand(stage)
            i = bisect.bisect_right(ops, item)
            if not (end < start or (i > 0 and ops[i - 1][1] > start) or (i < len(ops) and end > ops[i][0])):
                ops.insert(i, item)
                self._repack(stage, ops)
                return
            self._ops = [self._expand(s) for s in range(len(self._b))]   # overlapping: plain lists
        ops = self._ops[stage]
        ops.insert(bisect.bisect_right(ops, item), item)

    def earliest(self, stage: int, ready: float, dur: float, jump_training: bool) -> tuple[float, float]:
        """Earliest start >= ready with `dur` free on `stage`, and the end of the op before it.

        With jump_training (inference under inference-first dispatch), queued training ops that
        would not have started by then do not block: the inference op is dispatched first.
        """
        if self._ops is not None:
            return self._earliest_scan(stage, ready, dur, jump_training)
        en = self._en[stage]
        n = len(en)
        i = bisect.bisect_right(en, ready)   # runs before i end by `ready`: they only raise prev_end
        if i == n:
            return ready, (en[-1] if n and en[-1] > -1.0 else -1.0)
        if not dur >= _ulp(en[-1]):
            return self._earliest_scan(stage, ready, dur, jump_training)
        bs = self._b[stage]
        b = bs[i]
        if b[1] <= ready:   # run i's first op ends by `ready`: prev_end is its last op end by then
            k = bisect.bisect_right(b, ready)
            prev_end = b[k - 1]
        else:
            k = 1
            prev_end = en[i - 1] if i else -1.0
        if not prev_end > -1.0:
            prev_end = -1.0
        t = ready
        tr = None
        if jump_training:
            tr = self._tr[stage]
            if tr[i]:
                # only the training op covering `ready` (started before it) blocks, until its own
                # end; every later op starts at or after t and is jumped
                if b[k - 1] < t:
                    t = b[k]
                    if t > prev_end:
                        prev_end = t
                i += 1
        while i < n:   # the runs in the way (jumping training: the inference runs only)
            if tr is None or not tr[i]:
                end = en[i]
                if end > t:
                    if bs[i][0] >= t + dur:
                        break
                    if end > prev_end:
                        prev_end = end
                    t = end
            i += 1
        return t, prev_end

    def _earliest_scan(self, stage: int, ready: float, dur: float, jump_training: bool) -> tuple[float, float]:
        """The reference walk over every op's interval (any input, overlapping or not)."""
        t = ready
        prev_end = -1.0
        for start, end, train in (self._ops[stage] if self._ops is not None else self._expand(stage)):
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

        Timeline rebuilds are most of a decision's cost; three short cuts place each op where
        chain() would. `tail`: nothing on the stage ends after `ready` and an op starting then
        sorts last, so the rest of the run is appended with no search, as one run (its
        boundaries summed in order, the floats the walk gives) or onto the last run if that ends
        at `ready`. Otherwise the op walks the runs; if it goes last, so do the rest of the run.
        `gap`: the previous op of the run went into a gap, onto the end of run g, before a run
        starting at `limit`; the next one, starting at its end, goes there too if it ends by
        `limit`."""
        bisect_right = bisect.bisect_right
        bss, ens, trs = self._b, self._en, self._tr
        horizon = None   # the start of the chain's first op
        for stage, durs in runs:
            en = ens[stage]
            if not en or en[-1] < ready or (en[-1] == ready and bss[stage][-1][-2] < ready):
                if self._ops is None and ready >= 0.0:   # tail, the whole run: _append_tail, inlined
                    if horizon is None:
                        horizon = ready
                    if en and en[-1] == ready and trs[stage][-1] == train:   # onto the last run
                        b = bss[stage][-1]
                        ends = accumulate(durs, initial=ready)
                        next(ends)   # `ready`: the run's end already
                        b.extend(ends)
                        ready = en[-1] = b[-1]
                    else:
                        b = list(accumulate(durs, initial=ready))
                        bss[stage].append(b)
                        ready = b[-1]
                        en.append(ready)
                        trs[stage].append(train)
                    continue
                tail = self._ops is None
            else:
                tail = False
            bs, tr = bss[stage], trs[stage]
            j, m = 0, len(durs)
            g, limit = -1, 0.0
            while j < m and not tail:
                dur = durs[j]
                j += 1
                if g >= 0:
                    end = ready + dur
                    if ready < end <= limit:   # (a zero-length op takes the walk below)
                        bs[g].append(end)
                        en[g] = end
                        ready = end
                        continue   # (not the chain's first op: the horizon is set)
                    g = -1
                if self._ops is not None or not dur >= _ulp(en[-1]):
                    start, _ = self._earliest_scan(stage, ready, dur, False)   # the ops' own walk
                    ready = start + dur
                    self.add(stage, start, ready, train)
                else:
                    # earliest(): skip what ends by `ready`, then move past every run in the way
                    t = ready
                    i = bisect_right(en, t)
                    n = len(en)
                    while i < n:
                        e0 = en[i]
                        if e0 > t:
                            if bs[i][0] >= t + dur:
                                break
                            t = e0
                        i += 1
                    start, ready = t, t + dur
                    if i == n and (bs[-1][-2], en[-1], tr[-1]) <= (start, ready, train):
                        self._append_tail(stage, (dur,), start, train)
                        tail = True   # the next op of the run starts at its end: it goes last too
                    elif i < n and ready > start:
                        # into the gap before run i: everything before ends by `start`, run i
                        # starts at `ready` or later, so that is where add() would put it
                        if i and en[i - 1] == start and tr[i - 1] == train and start >= 0.0:
                            g = i - 1   # onto the end of the run before
                            bs[g].append(ready)
                            en[g] = ready
                        else:
                            bs.insert(i, [start, ready])
                            en.insert(i, ready)
                            tr.insert(i, train)
                            g = i if start >= 0.0 else -1
                        limit = bs[g + 1][0]
                    else:
                        self.add(stage, start, ready, train)
                if horizon is None:
                    horizon = start
            if j < m:   # tail: the rest of the run goes last, back to back
                if horizon is None:
                    horizon = ready
                ready = self._append_tail(stage, islice(durs, j, None), ready, train)
        if horizon is not None and horizon < self.horizon_s:
            self.horizon_s = horizon
        return ready

    def _append_tail(self, stage: int, durs: Iterable[float], ready: float, train: bool) -> float:
        """Ops back to back from `ready`, last on the stage (nothing there ends later): onto the
        last run if it ends at `ready` and is of their kind, else as a new run, their boundaries
        summed in order (the floats a walk op by op gives); one run per op below 0 (runs grow at
        boundaries >= 0 only). Returns the end of the last."""
        bs, en, tr = self._b[stage], self._en[stage], self._tr[stage]
        if ready < 0.0:
            for dur in durs:
                start, ready = ready, ready + dur
                bs.append([start, ready])
                en.append(ready)
                tr.append(train)
            return ready
        if en and en[-1] == ready and tr[-1] == train:
            b = bs[-1]
            ends = accumulate(durs, initial=ready)
            next(ends)   # `ready`: the run's end already
            b.extend(ends)
            en[-1] = b[-1]
        else:
            b = list(accumulate(durs, initial=ready))
            bs.append(b)
            en.append(b[-1])
            tr.append(train)
        return en[-1]


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
        if tl._en[stage] or busy < start or tl._ops is not None:
            tl.add(stage, start, busy, train)
        else:   # (as add() on an empty stage: one running op per stage is the usual case)
            tl._b[stage].append([start, busy])
            tl._en[stage].append(busy)
            tl._tr[stage].append(train)
        if end < tl.horizon_s:
            tl.horizon_s = end
    for ready, runs, train in chains:
        tl.chain_runs(runs, ready if ready > now else now, train)   # max(now, ready)
    return tl
