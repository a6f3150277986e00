"""The scheduler's fast paths agree with their plain references.

- NodeTimeline.earliest (bisect; inference-only walk when jumping training) vs a plain scan
  over every interval, on timelines built by chain() and on overlapping direct add()s;
- a timeline rebuilt anywhere before its horizon is the same timeline;
- lemix's bound-and-prune placement (idle nodes scored once, busy nodes visited best bound first)
  picks the node that scoring every node picks, on the same timelines.
"""
from __future__ import annotations

import random

import pytest
from sched_factory import make_params, make_tasks, simulate

from lemix.sched.forecast import NodeTimeline, build_timeline
from lemix.sched.policies.lemix import Lemix


def reference_earliest(iv, ready, dur, jump):
    t, prev_end = ready, -1.0
    for start, end, train in iv:
        if end <= t:
            prev_end = max(prev_end, end)
            continue
        if jump and train and start >= t:
            continue
        if start >= t + dur:
            break
        prev_end = max(prev_end, end)
        t = end
    return t, prev_end


def rounded(rng: random.Random, grid: float | None):
    def r(a: float, b: float) -> float:
        x = rng.uniform(a, b)
        return round(x / grid) * grid if grid else x   # a grid makes ties and touching ends
    return r


@pytest.mark.parametrize("seed", range(4))
def test_earliest_matches_a_plain_scan(seed):
    rng = random.Random(seed)
    for trial in range(1500):
        stages = rng.randint(1, 3)
        r = rounded(rng, rng.choice([1.0, 0.5, None]))
        tl = NodeTimeline(stages, 0.0)
        for _ in range(rng.randint(0, 10)):
            if trial % 3 == 0 and rng.random() < 0.3:   # a direct add may overlap: plain scan
                s, start = rng.randrange(stages), r(0, 50)
                tl.add(s, start, start + r(0, 10), rng.random() < 0.5)
            else:
                ops = [(rng.randrange(stages), r(0, 10)) for _ in range(rng.randint(1, 4))]
                tl.chain(ops, r(0, 50), rng.random() < 0.5)
        for _ in range(8):
            s, ready, dur, jump = rng.randrange(stages), r(0, 80), r(0, 10), rng.random() < 0.5
            assert tl.earliest(s, ready, dur, jump) == reference_earliest(tl.iv[s], ready, dur, jump)


def test_rebuild_before_the_horizon_gives_the_same_timeline():
    rng = random.Random(3)
    checked = 0
    for _ in range(5000):
        stages, t1 = rng.randint(1, 4), rng.choice([0.0, 2.0, 5.0])
        r = rounded(rng, rng.choice([1.0, 0.5, None]))
        running = [(s, r(0, t1), r(0, 20), rng.random() < 0.5) for s in range(stages) if rng.random() < 0.5]
        chains = [(r(0, 20), [(rng.randrange(stages), r(0.1, 8)) for _ in range(rng.randint(1, 5))],
                   rng.random() < 0.5) for _ in range(rng.randint(0, 6))]
        a = build_timeline(stages, t1, running, chains)
        if a.horizon_s <= t1:
            continue
        t2 = min(a.horizon_s, rng.uniform(t1, t1 + 30))
        assert build_timeline(stages, t2, running, chains).iv == a.iv
        checked += 1
    assert checked > 1000


class _Checked(Lemix):
    """Scores every node first (building every timeline), then places with the pruned visit."""

    decisions = 0

    def place(self, task, view, force=False):
        nodes = view.candidate_nodes(task)
        screen = task.is_train and self.prioritize and not force
        full = self._place_scan(task, view, nodes, screen)
        assert super().place(task, view, force) == full
        type(self).decisions += 1
        return full


@pytest.mark.parametrize("stages, generate", [(1, False), (3, False), (2, True)])
def test_pruned_lemix_placement_equals_scoring_every_node(monkeypatch, stages, generate):
    monkeypatch.setattr(_Checked, "decisions", 0)
    tasks = make_tasks(120, seed=stages, gap_s=0.002, max_tokens=60)
    params = make_params(policy="lemix", nodes=6, stages=stages, max_batch=3, generate=generate)
    from lemix.sched import scheduler as scheduler_module

    real = scheduler_module.make_policy
    monkeypatch.setattr(scheduler_module, "make_policy", lambda name, p: _Checked(name, p))
    try:
        result = simulate(params, tasks, noise=0.2)
    finally:
        monkeypatch.setattr(scheduler_module, "make_policy", real)
    assert _Checked.decisions >= len(tasks)
    assert len(result.requests) + len(result.train_tasks) == len(tasks)
