"""The speed-ups of issue 15 give the same floats as what they replaced.

- LatencyModel.predict caches the profile's time per op shape: after any calibration it still
  equals the uncached formula (raw time x the stage's correction);
- a chunked batch's remaining chain (a slice of its shape's whole chain) equals the walk over its
  chunks from where it stands, at every step of its life, running or not;
- NodeTimeline.chain / chain_runs (runs of ops per stage: appended without a search when nothing
  on the stage ends later, inserted without one after the previous op of the run took a gap)
  place every op where the plain per-op timeline (timeline_reference.py) does, running ops
  first, ties and zero-length ops included.
"""
from __future__ import annotations

import random

import pytest
from sched_factory import make_params
from timeline_reference import PlainTimeline

from lemix.sched.chunking import Chunker, advance_bwd, advance_fwd, start_bwd
from lemix.sched.forecast import NodeTimeline, build_from_runs
from lemix.sched.latency import LatencyModel, _raw, default_profile
from lemix.sched.state import Batch
from lemix.types import Op, OpKind, Task, TaskKind


def test_cached_predictions_equal_the_formula_under_calibration():
    prof = default_profile(stages=2)
    lat = LatencyModel(prof)
    rng = random.Random(3)
    shapes = [(k, s, b, q, kv, nb, ly) for k in (OpKind.FWD, OpKind.BWD, OpKind.DECODE) for s in (0, 1)
              for b, q, kv, nb, ly in ((1, 128, 0, 0, ()), (4, 512, 0, 0, (0, 3)), (2, 1, 900, 0, ()))]
    for i in range(300):
        k, s, b, q, kv, nb, ly = shapes[rng.randrange(len(shapes))]
        got = lat.predict(k, s, b, q, kv, nb, ly)
        want = _raw(prof, k, s, b, q, kv, nb, ly) * lat.correction(s, k)
        assert got == want
        op = Op(i, k, 0, s, 0, (), k is OpKind.BWD, b, q, kv, nb, got, None, ly)
        lat.observe(op, got * rng.uniform(0.5, 1.5))   # the correction moves after every op


def flat(runs):
    """Runs (stage, durations) as (stage, duration) ops."""
    return [(s, d) for s, ds in runs for d in ds]


def walk_remaining(fwd, bwd, b: Batch):
    """The reference: forward chunks left on the current stage, the later stages, then every
    backward chunk descending (what Chunker.remaining_chain returned before the slice)."""
    S, run, ops = b.num_stages, 1 if b.running else 0, []
    if not b.fwd_done:
        for s in range(b.fwd_next, S):
            j0 = b.chunk + run if s == b.fwd_next else 0
            ops.extend((s, d) for d in fwd[s][j0:])
        top, first = S - 1, None
    else:
        top, first = b.bwd_next, b.chunk - run
    for s in range(top, -1, -1):
        j0 = first if (s == top and first is not None) else len(bwd[s]) - 1
        ops.extend((s, bwd[s][j]) for j in range(j0, -1, -1))
    return ops


@pytest.mark.parametrize("stages", [1, 2, 4])
def test_remaining_chain_is_the_walk_over_the_chunks_left(stages):
    prof = default_profile(stages=stages)
    lat = LatencyModel(prof)
    ch = Chunker(make_params(stages=stages, policy="lemix"), lat, lambda t: 0.02, enabled=True)
    task = Task(0, TaskKind.TRAIN, 0.0, 512, 1, batch_size=4)
    plan = ch.plan(4, 512)
    assert plan and max(len(p) for p in plan) > 2   # cut into chunks on some stage
    b = Batch(0, 0, True, [task], 512, stages, chunks=plan)
    fwd, bwd = ch._chunk_durs(4, 512, plan)
    steps = 0
    while True:
        for running in (False, True):
            b.running = running
            assert flat(ch.remaining_chain(b)) == walk_remaining(fwd, bwd, b)
        b.running = False
        steps += 1
        if not b.fwd_done:   # what completion.py does as each chunk ends
            if advance_fwd(b):
                b.fwd_next += 1
                if b.fwd_done:
                    b.bwd_next = stages - 1
                    start_bwd(b, b.bwd_next)
        else:
            if b.bwd_next < 0:
                break
            if advance_bwd(b):
                b.bwd_next -= 1
                start_bwd(b, b.bwd_next)
    assert ch.remaining_chain(b) == [] and steps == 2 * sum(len(p) - 1 for p in plan) + 1


def reference_chain(tl: PlainTimeline, ops, ready, train):
    for stage, dur in ops:
        start, _ = tl.earliest(stage, ready, dur, False)
        ready = start + dur
        tl.add(stage, start, ready, train)
    return ready


@pytest.mark.parametrize("seed", range(6))
def test_chain_places_ops_where_the_plain_scan_does(seed):
    rng = random.Random(seed)
    S = 3
    fast, slow = NodeTimeline(S, 0.0), PlainTimeline(S)
    for _ in range(40):
        n = rng.randint(1, 6)
        ops = [(rng.randrange(S), round(rng.uniform(0.0, 2.0), 1)) for _ in range(n)]
        ready = round(rng.uniform(0.0, 20.0), 1)
        train = rng.random() < 0.5
        assert fast.chain(ops, ready, train) == reference_chain(slow, ops, ready, train)
    assert fast.iv == slow.iv


@pytest.mark.parametrize("seed", range(8))
def test_chained_runs_place_ops_where_the_plain_scan_does(seed):
    """Runs of chunks (several ops on one stage, back to back), on a coarse grid (ties and
    zero-length ops), with durations too small to move a large start (start + dur == start),
    and running ops first: chain_runs (tail appends, inserts into gaps) agrees with the scan."""
    rng = random.Random(100 + seed)
    S = rng.randint(1, 4)
    now = rng.choice([0.0, 3.0, 1e6])
    durs = [0.0, 0.5, 1.0, 2.0, 1e-12, 0.25]
    running = [(s, now - rng.choice([0.0, 1.0]), now + rng.choice([0.0, 1.0, 4.0]), rng.random() < 0.5)
               for s in range(S) if rng.random() < 0.6]
    chains = []
    for _ in range(rng.randint(1, 12)):
        runs = [(rng.randrange(S), [rng.choice(durs) for _ in range(rng.randint(1, 7))])
                for _ in range(rng.randint(1, 2 * S))]
        chains.append((now + rng.choice([0.0, 0.5, 2.0, 10.0]), runs, rng.random() < 0.7))
    fast = build_from_runs(S, now, running, chains)
    slow = PlainTimeline(S)
    for stage, start, end, train in running:
        slow.add(stage, start, max(now, end), train)
    for ready, runs, train in chains:
        reference_chain(slow, [(s, d) for s, ds in runs for d in ds], max(now, ready), train)
    assert fast.iv == slow.iv
