"""Staggered merges (policy.merge_stagger): one node at a time takes the merge's copy, requests
go to the other nodes meanwhile and the ones already on the merging node pass first."""
from __future__ import annotations

from sched_factory import infer, make_params, make_profile, simulate, train

from lemix.types import OpKind


def _run(stagger: bool):
    # a weight copy of a stage takes 100 ms (SLO of a 10-token request: 100 ms); every
    # optimizer step merges both nodes, and requests arrive every 13 ms throughout
    params = make_params(average_every=1, merge_stagger=stagger, train_share=None)
    tasks = [train(i, 0.001 * i, tokens=20) for i in range(8)]
    tasks += [infer(100 + i, 0.013 * i, tokens=10) for i in range(120)]
    r = simulate(params, tasks, make_profile(2, weight_bytes=100_000))
    syncs = [(o.node, o.start_s, o.end_s) for o in r.ops if o.kind is OpKind.SYNC]
    during = [q for q in r.requests if any(s <= q.arrival_s < e for _, s, e in syncs)]
    return r, syncs, during


def test_requests_arriving_during_a_staggered_merge_meet_their_slo():
    r, syncs, during = _run(True)
    assert len({n for n, _, _ in syncs}) == 2 and len(syncs) >= 8   # both nodes merged, repeatedly
    for n, s, e in syncs:   # never two nodes copying at once
        assert not any(m != n and s2 < e and s < e2 for m, s2, e2 in syncs)
    assert len(during) >= 20 and all(q.slo_met for q in during)
    assert all(q.slo_met for q in r.requests) and len(r.requests) == 120
    assert not any(q.failed for q in r.requests)
    assert {t.node for t in r.train_steps} == {0, 1} and sum(t.samples for t in r.train_steps) == 8


def test_merging_every_node_at_once_makes_them_miss():
    r, syncs, during = _run(False)
    assert any(m != n and s2 < e and s < e2 for n, s, e in syncs for m, s2, e2 in syncs)
    # (20 of 25 with the optimizer step ahead of waiting requests, `step_first`; after them,
    # the default, the unstaggered merges overlap less and 4 of 16 miss)
    assert sum(not q.slo_met for q in during) >= 4


def test_a_stages_copy_waits_for_the_step_its_backwards_lead_to():
    # with gradients on a stage and the node's micro-batches still running backward, the copy
    # would hold the step back for its whole length (and merge the older weights): the step
    # goes first, so no copy comes between a stage's backward and that stage's next step
    r, syncs, _ = _run(True)
    assert syncs and sum(t.samples for t in r.train_steps) == 8
    by_dev: dict[tuple[int, int], list] = {}
    for o in sorted(r.ops, key=lambda o: o.start_s):
        by_dev.setdefault((o.node, o.stage), []).append(o)
    checked = 0
    for ops in by_dev.values():
        since_bwd = None   # the kinds run since the stage's last backward not yet stepped
        for o in ops:
            if o.kind is OpKind.BWD:
                since_bwd = []
            elif o.kind is OpKind.OPTIM and since_bwd is not None:
                assert OpKind.SYNC not in since_bwd
                checked += 1
                since_bwd = None
            elif since_bwd is not None:
                since_bwd.append(o.kind)
    assert checked >= 6
