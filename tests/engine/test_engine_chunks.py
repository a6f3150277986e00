"""Chunked training ops (bounded blocking) on real stage workers: gradients equal a
single-process reference, memory follows the chunks, and an engine run with chunking on
completes every task."""
import dataclasses

import pytest
import torch

from engine_factories import make_workers, padded_batch, tiny_hf
from lemix.api import run_engine
from lemix.engine.messages import Backward, Forward, Memory, Offload, Reload
from lemix.engine.model import build_builtin_tiny
from lemix.engine.stage import layer_ranges
from lemix.metrics import summarize

from test_engine_run import cpu_profile, make_cfg
from test_engine_training import MICRO_BATCHES, _reference_step

LR, WD = 1e-2, 0.1


def _chunks(n_layers: int, size: int) -> list[tuple[int, int]]:
    return [(lo, min(n_layers, lo + size)) for lo in range(0, n_layers, size)]


def _assert_matches_reference(workers, losses, ref_grads, ref_losses) -> None:
    """Every stage's accumulated gradients and the losses equal the single-process reference."""
    assert losses == pytest.approx(ref_losses, abs=1e-5)
    for w in workers:
        for key, p in w.stage.named_parameters():
            torch.testing.assert_close(p.grad, ref_grads[w.stage.hf_names[key]], atol=1e-6, rtol=1e-4)


def _chunked_step(workers, batches, size: int, offload_between: bool = False, of_layers: int = 0):
    """GPipe order, every stage op cut into chunks of `size` layers (backward in reverse); with
    `of_layers`, chunks of a stage of that many layers (the worker maps them onto its own)."""
    losses = []
    for b, (ids, mask) in enumerate(batches):
        lengths = tuple(mask.sum(1).tolist())
        hidden = None
        for w in workers:
            L = of_layers or w.stage.num_layers
            for lo, hi in _chunks(L, size):
                first = lo == 0
                res = w.handle(Forward(b, True, tuple(range(len(lengths))), lengths,
                                       input_ids=ids if first and w.stage_index == 0 else None,
                                       hidden=hidden if first and w.stage_index > 0 else None,
                                       labels=ids if w.stage.is_last else None,
                                       loss_scale=1 / len(batches), layers=(lo, hi), of_layers=of_layers))
                assert (res.hidden is None) == (hi < L or w.stage.is_last)
            hidden = res.hidden
        losses.append(res.loss)
        if offload_between:   # a whole stage's stash moves to host and back, chunks and all
            for w in workers:
                w.handle(Offload("act", (b,)))
                w.handle(Reload("act", (b,)))
    for b in range(len(batches)):
        grad = None
        for w in reversed(workers):
            L = of_layers or w.stage.num_layers
            for lo, hi in reversed(_chunks(L, size)):
                top = hi == L
                res = w.handle(Backward(b, grad if top else None, layers=(lo, hi), of_layers=of_layers))
                if lo > 0:
                    assert res.grad_input is None
            grad = res.grad_input
            assert b not in w.stashes
    return losses


@pytest.mark.parametrize("family,num_stages,layers,size,offload", [
    ("builtin", 2, 4, 1, False), ("llama", 2, 5, 2, True), ("gpt2", 1, 3, 2, False),
    ("qwen2", 3, 6, 1, False)])
def test_chunked_grads_match_reference(family, num_stages, layers, size, offload):
    make = (lambda: build_builtin_tiny(seed=1, num_layers=layers)) if family == "builtin" \
        else (lambda: tiny_hf(family, layers=layers))
    ref_model, model = make(), make()
    batches = [padded_batch(lens, seed=i) for i, lens in enumerate(MICRO_BATCHES)]
    ref_grads, ref_losses = _reference_step(ref_model, batches)
    workers = make_workers(model, num_stages, lr=LR, weight_decay=WD)
    assert [w.stage.num_layers for w in workers] == [hi - lo for lo, hi in layer_ranges(layers, num_stages)]
    losses = _chunked_step(workers, batches, size, offload)
    _assert_matches_reference(workers, losses, ref_grads, ref_losses)


@pytest.mark.parametrize("of_layers", [5, 13])
def test_chunks_planned_on_another_layer_count_map_onto_the_stage(of_layers):
    # the virtual clock plans chunks on a modeled profile (13 layers a stage) for a real stage of
    # 2 layers: most chunks then cover no real layer and pass their input on; gradients still match
    ref_model, model = build_builtin_tiny(seed=1), build_builtin_tiny(seed=1)
    batches = [padded_batch(lens, seed=i) for i, lens in enumerate(MICRO_BATCHES)]
    ref_grads, ref_losses = _reference_step(ref_model, batches)
    workers = make_workers(model, 2, lr=LR, weight_decay=WD)
    losses = _chunked_step(workers, batches, 1, of_layers=of_layers)
    _assert_matches_reference(workers, losses, ref_grads, ref_losses)


def test_chunk_memory_follows_the_chunks_and_order_is_checked():
    (w,) = make_workers(build_builtin_tiny(seed=1, num_layers=4), 1, lr=LR)
    ids, mask = padded_batch([9, 7], seed=3)
    lengths = tuple(mask.sum(1).tolist())
    fwd = lambda lo, hi: w.handle(Forward(0, True, (0, 1), lengths, input_ids=ids if lo == 0 else None,  # noqa: E731
                                          labels=ids, layers=(lo, hi)))
    act = lambda: w.handle(Memory()).act_bytes   # noqa: E731
    with pytest.raises(ValueError, match="out of order"):
        fwd(2, 4)
    sizes = []
    for lo in range(4):
        fwd(lo, lo + 1)
        sizes.append(act())
    assert sizes == sorted(sizes) and sizes[0] > 0 and len(set(sizes)) == 4   # grows chunk by chunk
    with pytest.raises(ValueError, match="out of order"):
        w.handle(Backward(0, None, layers=(0, 1)))     # the top chunk goes first
    freed = []
    for lo in (3, 2, 1, 0):
        w.handle(Backward(0, None, layers=(lo, lo + 1)))
        freed.append(act())
    assert freed[-1] == 0 and freed == sorted(freed, reverse=True) and len(set(freed)) == 4


def test_engine_run_with_chunking_completes_every_task():
    cfg = make_cfg(**{"policy.names": "lemix", "policy.train_chunk_ms": 0.5})
    prof = cpu_profile(cfg.cluster.stages)
    prof = dataclasses.replace(prof, stages=tuple(dataclasses.replace(st, layers=2) for st in prof.stages))
    (r,) = run_engine(cfg, profile=prof)
    s = summarize(r)
    assert s["failed"] == s["train_failed"] == 0
    assert (s["completed"], s["train_completed"]) == (len(r.requests), len(r.train_tasks))
    chunked = [o for o in r.ops if o.layers]
    assert chunked and all(o.train for o in chunked)
    assert s["train_steps"] > 0 and s["train_loss_last"] is not None


def _runs(bounds: list[int], sizes: list[int]) -> list[tuple[int, int, tuple[int, ...]]]:
    """Ops over runs of consecutive chunks (chunk boundaries `bounds`, ascending): per op
    (lo, hi, the chunk boundaries strictly inside it)."""
    assert sum(sizes) == len(bounds) - 1
    out, j = [], 0
    for m in sizes:
        out.append((bounds[j], bounds[j + m], tuple(bounds[j + 1:j + m])))
        j += m
    return out


def _merged_step(workers, batches, bounds, fwd_sizes, bwd_sizes, of_layers=0):
    """GPipe order; on every stage the forward runs the chunks `bounds` as ops over runs of
    `fwd_sizes` chunks (with their cuts), the backward over runs of `bwd_sizes` chunks from the
    top down: a different grouping of the same chunks."""
    losses = []
    for b, (ids, mask) in enumerate(batches):
        lengths = tuple(mask.sum(1).tolist())
        hidden = None
        for w in workers:
            for lo, hi, cuts in _runs(bounds, fwd_sizes):
                first = lo == 0
                res = w.handle(Forward(b, True, tuple(range(len(lengths))), lengths,
                                       input_ids=ids if first and w.stage_index == 0 else None,
                                       hidden=hidden if first and w.stage_index > 0 else None,
                                       labels=ids if w.stage.is_last else None, loss_scale=1 / len(batches),
                                       layers=(lo, hi), of_layers=of_layers, cuts=cuts))
            hidden = res.hidden
        losses.append(res.loss)
    top_down = [(lo, hi) for lo, hi, _ in _runs(bounds, bwd_sizes[::-1])][::-1]   # sizes listed top first
    for b in range(len(batches)):
        grad = None
        for w in reversed(workers):
            for lo, hi in top_down:
                res = w.handle(Backward(b, grad if hi == bounds[-1] else None, layers=(lo, hi),
                                        of_layers=of_layers))
                assert (res.grad_input is None) == (lo > 0 or w.stage_index == 0)
            grad = res.grad_input
            assert b not in w.stashes
    return losses


@pytest.mark.parametrize("family,layers,of_layers,bounds,fwd_sizes,bwd_sizes", [
    ("builtin", 8, 0, [0, 1, 2, 3, 4], [3, 1], [1, 3]),             # per-layer chunks, merged both ways
    ("llama", 8, 0, [0, 2, 4], [2], [1, 1]),                         # one forward op, backward chunk by chunk
    ("qwen2", 8, 0, [0, 1, 2, 3, 4], [1, 1, 1, 1], [4]),             # forward chunk by chunk, one backward op
    ("builtin", 4, 13, list(range(14)), [5, 8], [2, 6, 5]),          # planned on 13 layers, 2 real ones
])
def test_merged_chunk_ops_grads_match_reference(family, layers, of_layers, bounds, fwd_sizes, bwd_sizes):
    # adaptive chunks: forward and backward group the same chunks into ops independently
    make = (lambda: build_builtin_tiny(seed=1, num_layers=layers)) if family == "builtin" \
        else (lambda: tiny_hf(family, layers=layers))
    ref_model, model = make(), make()
    batches = [padded_batch(lens, seed=i) for i, lens in enumerate(MICRO_BATCHES)]
    ref_grads, ref_losses = _reference_step(ref_model, batches)
    workers = make_workers(model, 2, lr=LR, weight_decay=WD)
    losses = _merged_step(workers, batches, bounds, fwd_sizes, bwd_sizes, of_layers)
    _assert_matches_reference(workers, losses, ref_grads, ref_losses)


def test_merged_chunk_memory_and_a_backward_must_be_a_run_of_the_forwards_chunks():
    (w,) = make_workers(build_builtin_tiny(seed=1, num_layers=4), 1, lr=LR)
    ids, mask = padded_batch([9, 7], seed=3)
    lengths = tuple(mask.sum(1).tolist())
    fwd = lambda lo, hi, cuts: w.handle(Forward(0, True, (0, 1), lengths, labels=ids,  # noqa: E731
                                                input_ids=ids if lo == 0 else None, layers=(lo, hi), cuts=cuts))
    act = lambda: w.handle(Memory()).act_bytes   # noqa: E731
    with pytest.raises(ValueError, match="not ascending"):
        fwd(0, 2, (2,))
    fwd(0, 2, ())          # chunk [0, 2)
    one = act()
    fwd(2, 4, (3,))        # chunks [2, 3) and [3, 4) as one op
    assert act() > one > 0
    with pytest.raises(ValueError, match="not a run of the forward's chunks"):
        w.handle(Backward(0, None, layers=(1, 4)))   # 1 is inside the chunk [0, 2)
    w.handle(Backward(0, None, layers=(3, 4)))
    after_top = act()
    w.handle(Backward(0, None, layers=(0, 3)))      # [2, 3) and [0, 2) as one op
    assert 0 < after_top and act() == 0 and 0 not in w.stashes
