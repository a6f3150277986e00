"""Staggered merges on real stage weights: the first member's copy is the sample-weighted
average of every member's snapshot; a later member keeps what it trained since the snapshot
and gains (average - its snapshot); the SYNC ops of a round never overlap across nodes."""
from __future__ import annotations

import torch
from engine_factories import make_workers, tiny_hf
from test_engine_virtual import virtual_cfg

from lemix.api import run_engine
from lemix.engine.merges import StaggeredMerges
from lemix.engine.messages import GetWeights, SetWeights
from lemix.types import Op, OpKind, SyncSpec


def _sync_op(op_id: int, node: int, spec: SyncSpec, stage: int = 0) -> Op:
    return Op(op_id, OpKind.SYNC, node, stage, -1, (), False, sync=spec)


def test_staggered_merge_is_the_weighted_average_plus_each_later_members_own_training():
    # three nodes' copies of stage 0 (different random inits), a mix by samples trained
    nodes = [make_workers(tiny_hf("llama", seed=s), 2)[0] for s in range(3)]
    get = lambda n: nodes[n].handle(GetWeights()).state_dict   # noqa: E731
    snap = [{k: v.clone() for k, v in get(n).items()} for n in range(3)]
    mix = (0.5, 0.25, 0.25)
    spec = SyncSpec(-1, mix, 7, round=1, members=(0, 1, 2))
    merges = StaggeredMerges()

    first = _sync_op(1, 2, spec)
    assert merges.sources(first) == (0, 1, 2)   # the first member snapshots everyone
    avg = merges.result(first, {n: get(n) for n in merges.sources(first)})
    nodes[2].handle(SetWeights(avg))
    for k in snap[0]:
        want = (0.5 * snap[0][k] + 0.25 * snap[1][k] + 0.25 * snap[2][k])
        torch.testing.assert_close(get(2)[k], want)

    # node 0 "trains" between the snapshot and its turn: its update survives the merge
    trained = {k: v + 0.01 * torch.randn_like(v) for k, v in get(0).items()}
    nodes[0].handle(SetWeights(trained))
    later = _sync_op(2, 0, spec)
    assert merges.sources(later) == (0,)        # only its own current weights are read
    nodes[0].handle(SetWeights(merges.result(later, {0: get(0)})))
    for k in snap[0]:
        torch.testing.assert_close(get(0)[k], trained[k] + (avg[k] - snap[0][k]))
        assert not torch.equal(get(0)[k], avg[k]) or torch.equal(trained[k], snap[0][k])

    # node 1 did not train: it gets the average itself
    nodes[1].handle(SetWeights(merges.result(_sync_op(3, 1, spec), {1: get(1)})))
    for k in snap[0]:
        torch.testing.assert_close(get(1)[k], avg[k])
    # the round is over: a new round on this stage snapshots again
    spec2 = SyncSpec(-1, mix, 8, round=2, members=(0, 1, 2))
    assert merges.sources(_sync_op(4, 1, spec2)) == (0, 1, 2)


def test_a_member_lost_before_the_snapshot_is_left_out_of_the_average():
    nodes = [make_workers(tiny_hf("gpt2", seed=s), 2)[1] for s in range(3)]
    get = lambda n: nodes[n].handle(GetWeights()).state_dict   # noqa: E731
    spec = SyncSpec(-1, (0.5, 0.3, 0.2), 3, round=1, members=(0, 1, 2))
    merges = StaggeredMerges()
    op = _sync_op(1, 0, spec, stage=1)
    copies = {0: get(0), 1: get(1)}             # node 2 died: its copy never came
    avg = merges.result(op, copies)
    for k in avg:
        torch.testing.assert_close(avg[k], (0.5 * copies[0][k] + 0.3 * copies[1][k]) / 0.8)


def _sync_windows(result):
    """Per merge round's sync ops: (node, start, end)."""
    return [(o.node, o.start_s, o.end_s) for o in result.ops if o.kind is OpKind.SYNC]


def test_virtual_staggered_merges_never_sync_two_nodes_at_once():
    cfg = virtual_cfg(**{"policy.names": "lemix", "policy.average_every": 1, "workload.duration_s": 4.0})
    (r,) = run_engine(cfg)
    syncs = _sync_windows(r)
    assert len({n for n, _, _ in syncs}) == 2   # both nodes took merges
    for n, s, e in syncs:
        assert not any(m != n and s2 < e and s < e2 for m, s2, e2 in syncs)
    assert all(q.inference_loss is not None for q in r.requests)

    cfg = virtual_cfg(**{"policy.names": "lemix", "policy.average_every": 1, "workload.duration_s": 4.0,
                         "policy.merge_stagger": False})
    (r,) = run_engine(cfg)
    syncs = _sync_windows(r)   # all at once: some node's copy overlaps another's
    assert any(m != n and s2 < e and s < e2 for n, s, e in syncs for m, s2, e2 in syncs)


def test_wall_clock_engine_takes_staggered_merges_on_local_threads():
    # correctness only (no timing decides anything): the runtime's gather path writes the
    # staggered merges, every task completes, and no two nodes copy at once
    cfg = virtual_cfg(**{"cluster.clock": "wall", "policy.names": "lemix", "policy.average_every": 1,
                         "workload.duration_s": 3.0})
    (r,) = run_engine(cfg)
    syncs = _sync_windows(r)
    assert len({n for n, _, _ in syncs}) == 2
    for n, s, e in syncs:
        assert not any(m != n and s2 < e and s < e2 for m, s2, e2 in syncs)
    assert not any(q.failed for q in r.requests) and r.train_steps
