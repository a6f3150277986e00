"""Bounded blocking: training forwards and backwards cut into chunks of layers (ours, beyond the
paper; design notes, "Bounded blocking").

Devices are non-preemptive, and one training micro-batch's forward or backward on a stage can
outlast a short request's whole SLO (4 x 512 tokens on the built-in 3B profile: ~65 ms forward,
~130 ms backward per stage, against ~30-90 ms SLOs): no placement can save a request that arrives
behind it. So a chunked training micro-batch runs each stage's forward as k ops over contiguous
ranges of the stage's layers (ascending), and its backward as k ops over the same ranges in
reverse (descending), each op carrying its range (`Op.layers`). Inference is dispatched between
chunks, so a request or decode iteration waits for at most one chunk per stage.

Chunk size, from the profile: the fewest chunks per stage such that one chunk's predicted time
(forward or backward: `a + frac x (b C l + c C l^2)`, calibrated; every chunk pays the per-op
constant `a`) stays under `chunk_frac` x the tightest SLO in force, or under `train_chunk_ms`
when given. The tightest SLO in force is a low quantile (`_TIGHT_Q`) of the SLO of recent
requests per blocking unit: the whole SLO in prefill mode, the SLO per output token in generate
mode (a decode iteration can be blocked once per token). Before any request was seen, the SLO
of a one-token request. A stage whose profile does not know its layer count is not cut.

Quiet cluster: a micro-batch admitted when the last request arrived more than `chunk_quiet_s`
ago (and none is queued or running on the cluster: the scheduler's `inference_present`) runs
unchunked: there is no inference to protect (before the first request, chunks are kept: a
server's first requests are not blocked by whole ops), and each chunk pays the per-op constant (per-layer chunks of the
built-in profile cost 19% more device time than one op per stage). A drain of training after
the requests end ran at 81% of separate's speed without it. `chunk_quiet_s = None` chunks always.

A micro-batch's plan is fixed when it is admitted (`Batch.chunks`: per stage, its chunks'
layer boundaries) and is followed to the end.

Adaptive chunks (`adaptive_chunks`, on by default; `--no-adaptive-chunks`): the bound is for
a request that finds a chunk running; while the node serves nothing (no request queued, in
flight or decoding there), one op may cover several consecutive chunks (`Batch.span`; forward
and backward each choose theirs), as many as the tight request (the same quantile of recent
requests) arriving at the op's start would still meet its SLO behind (`merge_budget_s`), and
only while training waits for device time (a task placed on the node not yet in its pipeline,
or one deferred: otherwise a merge gains nothing) and another node runs no merged op (so at
any time one node keeps the bound for the requests tighter than the quantile, and placement
can send them there). Each op saves the per-op constant of the chunks it merges (on the built-in 3B profile,
one-layer chunks cost 19% more device time than one op per stage); with a request on the node
ops shrink back to one chunk. A forward over several chunks carries their inner boundaries
(`Op.cuts`) so the worker keeps each chunk's boundary activation: a backward may then cover
any run of the forward's chunks, top down. Memory follows the chunks: a forward chunk stashes
its layers' share of the stage's activations, a backward chunk frees it (`stash_bytes`).
Lookahead slack: the lookahead (a device does not start training that would still run when
inference on its way arrives) lets a training op start if it ends within the chunk bound of
that arrival: the same blocking a request accepts from a chunk already running. Without it,
a node with a decode pool (iterations alternate between stages, leaving gaps shorter than a
chunk) ran training only at the minimum training share. `--no-lookahead-slack` turns it off.

A chunk started on a stage is continued whatever the pipeline mode says about new forwards
(the stage is already committed to the micro-batch), and no step or weight copy touches a stage
in between (its stash is held until the stage's backward is complete).
"""
from __future__ import annotations

import math
from collections import deque
from typing import Callable, Sequence

from lemix.sched.latency import LatencyModel, layer_fraction
from lemix.sched.params import SchedParams
from lemix.sched.state import Batch, NodeState
from lemix.types import OpKind, Task, TaskKind

Plan = tuple[tuple[int, ...], ...]   # per stage, layer boundaries (0, ..., L); () = not chunked
_TIGHT_Q = 0.1       # the quantile of recent per-unit SLOs taken as the tightest in force
_WINDOW = 512        # recent requests it is taken over
_REFRESH = 16        # recomputed every this many requests
_NEVER = float("-inf")   # no request seen yet


def n_chunks(b: Batch, s: int) -> int:
    return len(b.chunks[s]) - 1 if b.chunks else 1


def chunk_layers(b: Batch, s: int) -> tuple:
    """The layer range of the op due next on stage s: `b.span` chunks from the current one
    (forward: upwards; backward: downwards); () when the stage is one op."""
    if not b.chunks or len(b.chunks[s]) <= 2:
        return ()
    bounds, j, m = b.chunks[s], b.chunk, b.span
    if b.fwd_done:
        return (bounds[j - m + 1], bounds[j + 1])
    return (bounds[j], bounds[j + m])


def chunk_cuts(b: Batch, s: int) -> tuple[int, ...]:
    """The chunk boundaries inside a forward op over several chunks (adaptive chunks): the
    worker keeps each chunk's boundary so that a backward can cover any run of them."""
    if not b.chunks or b.span <= 1 or b.fwd_done:
        return ()
    return b.chunks[s][b.chunk + 1:b.chunk + b.span]


def mid_stage(b: Batch) -> bool:
    """A chunked training micro-batch is part-way through its current stage's forward or
    backward (the stage is committed to it: its next chunk is not gated again)."""
    if not b.chunks:
        return False
    if not b.fwd_done:
        return b.chunk > 0
    return 0 <= b.bwd_next and b.chunk < n_chunks(b, b.bwd_next) - 1


def stash_bytes(b: Batch, s: int, per_token: int) -> int:
    """Bytes of b's activations stashed on stage s now (its chunks whose forward started and
    whose backward has not finished)."""
    if s not in b.stash_stages:
        return 0
    total = b.tokens * per_token
    if not b.chunks:
        return total
    bounds = b.chunks[s]
    if not b.fwd_done and b.fwd_next == s:
        upto = bounds[b.chunk + (b.span if b.running else 0)]
    elif b.fwd_done and b.bwd_next == s:
        upto = bounds[b.chunk + 1]
    else:
        upto = bounds[-1]
    return total * upto // bounds[-1]


def chunk_stash_bytes(b: Batch, s: int, per_token: int) -> int:
    """What the op due next on stage s (its `b.span` chunks) stashes (forward) or frees
    (backward)."""
    total = b.tokens * per_token
    if not b.chunks:
        return total
    bounds, j, m = b.chunks[s], b.chunk, b.span
    lo, hi = (j - m + 1, j + 1) if b.fwd_done else (j, j + m)
    return total * bounds[hi] // bounds[-1] - total * bounds[lo] // bounds[-1]


def left_on_stage(b: Batch, s: int) -> int:
    """Chunks of the stage's current direction not yet started (forward: from b.chunk up;
    backward: from b.chunk down)."""
    return b.chunk + 1 if b.fwd_done else n_chunks(b, s) - b.chunk


def advance_fwd(b: Batch) -> bool:
    """A forward op (b.span chunks) finished: True when the stage's forward is complete."""
    if not b.chunks:
        return True
    b.chunk += b.span
    b.span = 1
    if b.chunk < n_chunks(b, b.fwd_next):
        return False
    b.chunk = 0
    return True


def start_bwd(b: Batch, s: int) -> None:
    """The backward on stage s begins with its last chunk."""
    if b.chunks and s >= 0:
        b.chunk = n_chunks(b, s) - 1
        b.span = 1


def advance_bwd(b: Batch) -> bool:
    """A backward op (b.span chunks) finished: True when the stage's backward is complete."""
    if not b.chunks:
        return True
    m, b.span = b.span, 1
    if b.chunk - m < 0:
        b.chunk = 0
        return True
    b.chunk -= m
    return False


class Chunker:
    """Chooses chunk plans and predicts chunked chains (for forecasts)."""

    def __init__(self, params: SchedParams, lat: LatencyModel, slo_of: Callable[[Task], float], *,
                 enabled: bool, now: Callable[[], float] | None = None,
                 inference_present: Callable[[], bool] | None = None, nodes: Sequence[NodeState] = (),
                 training_waits: Callable[[], bool] | None = None) -> None:
        self.params = params
        self.lat = lat
        self.enabled = enabled
        self.lookahead_slack = enabled and not params.no_lookahead_slack
        self.adaptive = enabled and params.adaptive_chunks
        self._per_unit: deque[tuple[float, float, int, int]] = deque(maxlen=_WINDOW)  # (unit, SLO, shape)
        self._seen = 0
        probe = Task(-1, TaskKind.INFER, 0.0, 1, 1)
        self._tight_s = slo_of(probe)
        self._probe = (self._tight_s, 1, 1)   # the tight request: its SLO, prompt and output tokens
        self._limits: dict[tuple, list[float]] = {}   # per request shape and calibration: _budget_s
        self._nodes: list[NodeState] = list(nodes)
        self._training_waits = training_waits
        self._durs: dict[tuple, tuple] = {}   # chunk durations and chains per shape, plan, calibration
        self._raw_durs: dict[tuple, tuple[list[list[float]], list[list[float]]]] = {}   # ... uncalibrated
        self._plans: dict[tuple, tuple[int, Plan]] = {}
        self._now = now
        self._inference_present = inference_present
        self._last_request_s = float("-inf")

    # ------------------------------------------------------------------ the bound
    def observe(self, task: Task, slo_s: float) -> None:
        """An inference request arrived with this SLO."""
        if not self.enabled or task.is_train:
            return
        self._last_request_s = max(self._last_request_s, task.arrival_s)
        unit = slo_s / max(1, task.output_tokens) if self.params.generate else slo_s
        self._per_unit.append((unit, slo_s, task.prompt_tokens, task.output_tokens))
        self._seen += 1
        if self._seen <= _REFRESH or self._seen % _REFRESH == 0:
            xs = sorted(self._per_unit)
            tight = xs[min(len(xs) - 1, int(_TIGHT_Q * len(xs)))]
            self._tight_s, self._probe = tight[0], tight[1:]

    def target_s(self) -> float:
        """The longest a chunk may be predicted to run."""
        if self.params.train_chunk_ms is not None:
            return self.params.train_chunk_ms / 1e3
        return self.params.chunk_frac * self._tight_s

    def quiet(self) -> bool:
        """Requests were seen, none arrived for chunk_quiet_s and none is queued or running:
        nothing to protect."""
        q = self.params.chunk_quiet_s
        if q is None or self._now is None or self._inference_present is None:
            return False
        last = self._last_request_s
        return last > _NEVER and self._now() >= last + q and not self._inference_present()

    # ------------------------------------------------------------------ adaptive chunks
    def span(self, node: NodeState, s: int, b: Batch) -> int:
        """How many of b's chunks the op due next on stage s covers: 1 while the node serves
        anything (the bound); else the most that the tight request arriving now would still
        meet its SLO behind (`merge_budget_s`), provided another node keeps to one chunk per op
        (`_fast_lane`: at any time one node of a cluster does, for the tightest requests)."""
        # (called for every training candidate a device looks at: the conditions are pure,
        # so the cheap ones go first and the budget is computed only when a merge is possible)
        if not self.adaptive or not b.chunks or len(b.chunks[s]) <= 2:
            return 1
        left = left_on_stage(b, s)
        if left <= 1:
            return 1
        if not (node.train_wait or (self._training_waits is not None and self._training_waits())):
            return 1   # no training waits for the device time a merge saves: nothing to gain
        if not node.has_no_inference() or not self._fast_lane(node):
            return 1
        budget = self.merge_budget_s(s)
        bounds, j, fwd_done = b.chunks[s], b.chunk, b.fwd_done
        kind = OpKind.BWD if fwd_done else OpKind.FWD
        for m in range(left, 1, -1):   # the largest that fits
            rng = (bounds[j - m + 1], bounds[j + 1]) if fwd_done else (bounds[j], bounds[j + m])
            if self.lat.predict(kind, s, b.size, b.seq_tokens, layers=rng) <= budget:
                return m
        return 1

    def new_span(self, node: NodeState, s: int, task: Task) -> int:
        """span() of the first op of a training task about to be admitted on stage s."""
        plan = self.plan(task.batch_size, task.prompt_tokens)
        if not self.adaptive or not plan:
            return 1
        return self.span(node, s, Batch(-1, node.index, True, [task], task.prompt_tokens, node.num_stages,
                                        chunks=plan))

    def merge_budget_s(self, s: int) -> float:
        """The longest an op starting now on stage s of a node that serves nothing may last so
        that the tight request (the `_TIGHT_Q` quantile of recent requests, per blocking unit)
        arriving now still meets its SLO there (`_budget_s`)."""
        return self._budget_s(self._probe, s)

    def _budget_s(self, probe: tuple[float, int, int], s: int) -> float:
        """How long after now stage s may stay busy so that a request of this shape (SLO,
        prompt, output tokens) arriving now still meets its SLO on the node: it reaches stage s
        no earlier than now, and from there needs its forward on stages s..S-1 (a chain's end
        is the latest over its stages of when the stage is free plus the chain's rest from
        there), and each later stage may still run one chunk into its way (lookahead slack).
        In generate mode its decode iterations come after, each behind at most one chunk (the
        node is then not quiet: bounded chunks); with a TTFT limit the prefill must meet it."""
        slo, prompt, out = probe
        key = (prompt, out, slo, self.lat.version, self.target_s())   # (the slack is a chunk bound)
        hit = self._limits.get(key)
        if hit is None:
            if len(self._limits) > 64:
                self._limits.clear()
            S = len(self.lat.profile.stages)
            p = self.params
            limit = slo
            if p.generate and out > 1:
                it = sum(self.lat.predict(OpKind.DECODE, j, 1, 1, prompt + out // 2) for j in range(S))
                limit -= (out - 1) * (it + self.target_s())
                if p.slo_ttft_s is not None:
                    limit = min(limit, p.slo_ttft_s)
            slack = self.target_s() if self.lookahead_slack else 0.0
            hit = [0.0] * S
            rest = 0.0
            for j in range(S - 1, -1, -1):
                rest += self.lat.predict(OpKind.FWD, j, 1, prompt)
                hit[j] = limit - rest - (S - 1 - j) * slack
            self._limits[key] = hit
        return hit[s]

    def _fast_lane(self, node: NodeState) -> bool:
        """Another healthy serving node runs no op over several chunks: the bound still holds
        there, and placement sends a request where its response is predicted shortest."""
        for m in self._nodes:
            if m is not node and m.healthy and m.serves and not any(
                    b.running and b.span > 1 for b in m.batches.values()):
                return True
        return False

    def plan(self, batch: int, tokens: int) -> Plan:
        """Per stage, the layer boundaries of the fewest equal chunks that meet the bound (none
        on a quiet cluster)."""
        if not self.enabled or self.quiet():
            return ()
        target = self.target_s()
        key = (batch, tokens, target)
        hit = self._plans.get(key)
        if hit is not None and hit[0] == self.lat.version:   # made again at a new calibration epoch
            return hit[1]
        if len(self._plans) > 256:
            self._plans.clear()
        plan = self._make_plan(batch, tokens, target)
        self._plans[key] = (self.lat.version, plan)
        return plan

    def _make_plan(self, batch: int, tokens: int, target: float) -> Plan:
        lat = self.lat
        out, cut = [], False
        for s, st in enumerate(lat.profile.stages):
            L = st.layers
            n = L
            if L > 1:
                whole = max(lat.predict(OpKind.FWD, s, batch, tokens), lat.predict(OpKind.BWD, s, batch, tokens))
                if whole > target:
                    # the most layers per chunk whose predicted time fits (at least one)
                    n = 1
                    for m in range(L - 1, 1, -1):
                        rng = (0, m)
                        if max(lat.predict(OpKind.FWD, s, batch, tokens, layers=rng),
                               lat.predict(OpKind.BWD, s, batch, tokens, layers=rng)) <= target:
                            n = m
                            break
            k = max(1, math.ceil(L / n)) if L > 0 else 1
            if k == 1:
                out.append((0, max(L, 1)))
                continue
            cut = True
            base, extra = divmod(L, k)
            bounds, at = [0], 0
            for j in range(k):
                at += base + (1 if j < extra else 0)
                bounds.append(at)
            out.append(tuple(bounds))
        return tuple(out) if cut else ()

    # ------------------------------------------------------------------ forecasts
    def _chunk_durs(self, b_size: int, tokens: int, plan: Plan) -> tuple[list[list[float]], list[list[float]]]:
        key = (b_size, tokens, plan, self.lat.version)
        hit = self._durs.get(key)
        if hit is None:
            if len(self._durs) > 256:
                self._durs.clear()
            raw = self._raw_durs.get(key[:3])
            if raw is None:   # the uncalibrated model times (LatencyModel.predict = raw x correction)
                if len(self._raw_durs) > 256:
                    self._raw_durs.clear()
                prof = self.lat.profile.stages
                raw = ([], [])
                for s, bounds in enumerate(plan):
                    st = prof[s]
                    rngs = [(bounds[j], bounds[j + 1]) for j in range(len(bounds) - 1)]
                    if len(rngs) == 1:
                        rngs = [()]
                    raw[0].append([st.fwd.pass_s(b_size, tokens, layer_fraction(st, r)) for r in rngs])
                    raw[1].append([st.bwd.pass_s(b_size, tokens, layer_fraction(st, r)) for r in rngs])
                self._raw_durs[key[:3]] = raw
            corr = self.lat.correction
            fwd, bwd = [], []
            for s, ds in enumerate(raw[0]):   # (each stage's correction looked up once)
                c = corr(s, OpKind.FWD)
                fwd.append([d * c for d in ds])
            for s, ds in enumerate(raw[1]):
                c = corr(s, OpKind.BWD)
                bwd.append([d * c for d in ds])
            hit = self._durs[key] = (fwd, bwd)
        return hit

    def remaining_chain(self, b: Batch) -> list[tuple[int, list[float]]]:
        """The ops left of a chunked training micro-batch after what ran or runs, as runs
        (forecast.py): forward chunks ascending, stage by stage, then backward chunks descending
        (a suffix of the whole chunked chain of its shape, cached per calibration)."""
        runs = self._full_chain(b.size, b.seq_tokens, b.chunks)
        run = b.span if b.running else 0
        if not b.fwd_done:
            s = b.fwd_next
            skip = b.chunk + run           # forward chunks of stage s started
        else:
            s = b.bwd_next
            if s < 0:
                return []
            k = len(runs[s][1])            # its backward has as many chunks, run from chunk - run down
            skip = min(k, max(0, k - 1 - (b.chunk - run)))
            s = 2 * len(b.chunks) - 1 - s  # the run of stage s's backward
        if skip == 0:
            return runs[s:]
        durs = runs[s][1]
        if skip >= len(durs):
            return runs[s + 1:]
        return [(runs[s][0], durs[skip:])] + runs[s + 1:]

    def _full_chain(self, b_size: int, tokens: int, plan: Plan) -> list[tuple[int, list[float]]]:
        """The whole chunked chain of a shape as runs: run s holds stage s's forward chunks
        (ascending), run 2S-1-s its backward chunks (descending)."""
        key = (b_size, tokens, plan, self.lat.version, "full")
        hit = self._durs.get(key)
        if hit is None:
            fwd, bwd = self._chunk_durs(b_size, tokens, plan)
            S = len(fwd)
            hit = self._durs[key] = ([(s, fwd[s]) for s in range(S)]
                                     + [(s, bwd[s][::-1]) for s in range(S - 1, -1, -1)])
        return hit

    def task_chain(self, task: Task) -> list[tuple[int, tuple[float]]] | None:
        """The chain (as runs of one op) of a queued training task that would be chunked: one op
        per stage and direction lasting its chunks' total (a queued task's chunks are not modeled one by one:
        that made timeline rebuilds most of a run's cost); None when it would not be chunked."""
        plan = self.plan(task.batch_size, task.prompt_tokens)
        if not plan:
            return None
        key = (task.batch_size, task.prompt_tokens, plan, self.lat.version, "task")
        hit = self._durs.get(key)
        if hit is None:
            fwd, bwd = self._chunk_durs(task.batch_size, task.prompt_tokens, plan)
            ops = [(s, (sum(fwd[s]),)) for s in range(len(fwd))]
            ops += [(s, (sum(bwd[s]),)) for s in range(len(bwd) - 1, -1, -1)]
            hit = self._durs[key] = ops
        return hit
