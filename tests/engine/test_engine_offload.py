"""Offload / reload of KV entries and stashed activations: bit-identical, same grads, honest bytes."""
import pytest
import torch

from engine_factories import padded_batch, pipeline_decode, pipeline_forward, make_workers
from lemix.engine.messages import Backward, Decode, Memory, Offload, Reload
from lemix.engine.model import build_builtin_tiny


@pytest.fixture(scope="module")
def model():
    return build_builtin_tiny(seed=2)


def _kv_snapshot(worker, sid):
    seq = worker.kv.on_device[sid]
    return seq.k[:, :, :seq.length].clone(), seq.v[:, :, :seq.length].clone()


def test_kv_offload_reload_bit_identical_and_accounted(model):
    workers, control = make_workers(model, 2), make_workers(model, 2)
    ids, _ = padded_batch([6, 4], seed=5)
    first = pipeline_forward(workers, 0, ids, [6, 4], keep_kv=True).next_tokens
    assert pipeline_forward(control, 0, ids, [6, 4], keep_kv=True).next_tokens == first
    w = workers[1]
    before = w.handle(Memory())
    snap = _kv_snapshot(w, 0)
    seq_device_bytes = w.kv.on_device[0].nbytes

    moved = w.handle(Offload("kv", (0,))).moved_bytes
    mid = w.handle(Memory())
    assert moved == snap[0].nbytes + snap[1].nbytes
    assert mid.kv_bytes == before.kv_bytes - seq_device_bytes
    assert mid.host_bytes == before.host_bytes + moved
    host = w.kv.on_host[0]
    assert host.k.data_ptr() != snap[0].data_ptr() and host.k.device.type == "cpu"
    with pytest.raises(KeyError, match="offloaded"):   # and the cache is left untouched
        w.handle(Decode(0, (0, 1), hidden=torch.zeros(2, 1, 128)))

    assert w.handle(Reload("kv", (0,))).moved_bytes == moved
    after = w.handle(Memory())
    assert (after.kv_bytes, after.host_bytes) == (before.kv_bytes, before.host_bytes)
    for got, expect in zip(_kv_snapshot(w, 0), snap):
        assert torch.equal(got, expect)
    # decoding continues exactly as in a pipeline that never offloaded
    for it in range(3):
        a = pipeline_decode(workers, it, [0, 1], list(first))
        b = pipeline_decode(control, it, [0, 1], list(first))
        assert a == b
        first = a


def test_activation_offload_reload_same_grads(model):
    ids, mask = padded_batch([8, 5, 3], seed=6)
    lengths = mask.sum(1).tolist()
    grads = []
    for offload in (False, True):
        workers = make_workers(model, 2)
        pipeline_forward(workers, 4, ids, lengths, train=True, labels=ids)
        if offload:
            _offload_and_check(workers[0], 4)
        grad = None
        for w in reversed(workers):
            grad = w.handle(Backward(4, grad)).grad_input
        grads.append({(w.stage_index, k): p.grad.clone() for w in workers
                      for k, p in w.stage.named_parameters()})
    assert grads[0].keys() == grads[1].keys()
    assert all(torch.equal(grads[0][k], grads[1][k]) for k in grads[0])


def _offload_and_check(w, batch_id):
    before = w.handle(Memory())
    # activations dominate: at least one [B,T,H] float per layer is stashed
    assert before.act_bytes > w.stage.num_layers * 3 * 8 * 128 * 4
    saved = [t.clone() for t in w.stashes[batch_id].saved]
    moved = w.handle(Offload("act", (batch_id,))).moved_bytes
    mid = w.handle(Memory())
    assert moved == before.act_bytes
    assert (mid.act_bytes, mid.host_bytes) == (0, before.host_bytes + moved)
    with pytest.raises(RuntimeError, match="offloaded"):
        w.handle(Backward(batch_id, torch.zeros(3, 8, 128)))
    w.handle(Reload("act", (batch_id,)))
    after = w.handle(Memory())
    assert (after.act_bytes, after.host_bytes) == (before.act_bytes, before.host_bytes)
    reloaded = w.stashes[batch_id].saved
    assert all(torch.equal(a, b) and a.stride() == b.stride() for a, b in zip(saved, reloaded))
