"""Training modes on the split stages: LoRA (against peft on the unsplit model), half precision,
adapter-only optimizer state and weight moves, and stage recompute (against stashing)."""
import pytest
import torch

from engine_factories import make_workers, padded_batch, pipeline_backward, pipeline_forward, tiny_hf
from lemix.engine.adapt import AdaptSpec, prepare_model
from lemix.engine.messages import GetState, GetWeights, Memory, Offload, Reload, SetState, SetWeights, Step
from lemix.engine.model import build_builtin_tiny, load_model

MICRO_BATCHES = [[7, 5, 3], [6, 6, 2]]


def lora_model(family: str, rank: int = 4, dtype: str = "float32", **kw):
    """An HF model with peft LoRA adapters whose B is non-zero too (peft starts B at zero, which
    would make every A gradient zero and the comparison empty)."""
    base = build_builtin_tiny(seed=1) if family == "builtin" else tiny_hf(family)
    model = prepare_model(base, AdaptSpec(lora_rank=rank, **kw), "llama" if family == "builtin" else family, dtype)
    gen = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
    return model


def split_train(workers, batches):
    """GPipe order: all forwards, then all backwards, grads averaged over micro-batches."""
    losses = []
    for b, (ids, mask) in enumerate(batches):
        res = pipeline_forward(workers, b, ids, mask.sum(1).tolist(), train=True, labels=ids,
                               loss_scale=1 / len(batches))
        losses.append(res.loss)
    for b in range(len(batches)):
        pipeline_backward(workers, b)
    return losses


def reference_grads(model, batches):
    losses = []
    for ids, mask in batches:
        out = model(input_ids=ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100))
        (out.loss / len(batches)).backward()
        losses.append(out.loss.item())
    return losses, {n: p.grad for n, p in model.get_base_model().named_parameters() if p.requires_grad}


@pytest.mark.parametrize("family,stages", [("builtin", 2), ("qwen2", 3), ("gpt2", 2)])
def test_lora_grads_on_split_stages_equal_peft_on_unsplit_model(family, stages):
    batches = [padded_batch(lens, seed=i) for i, lens in enumerate(MICRO_BATCHES)]
    ref_losses, ref = reference_grads(lora_model(family), batches)
    workers = make_workers(lora_model(family), stages)
    assert split_train(workers, batches) == pytest.approx(ref_losses, abs=1e-5)
    seen = set()
    for w in workers:
        for key, p in w.stage.named_parameters():
            if "lora_" in key:
                torch.testing.assert_close(p.grad, ref[w.stage.hf_names[key]], atol=1e-6, rtol=1e-4)
                seen.add(w.stage.hf_names[key])
            else:
                assert not p.requires_grad and p.grad is None
    assert seen == set(ref) and len(seen) > 0     # every peft adapter lives on exactly one stage


def _adapter_params(workers):
    return sum(p.numel() for w in workers for n, p in w.stage.named_parameters() if "lora_" in n)


def test_lora_optimizer_state_and_weight_moves_hold_only_adapters():
    model = lora_model("builtin", rank=8)
    workers = make_workers(model, 2, lr=1e-2)
    base_before = {(w.stage_index, k): v.clone() for w in workers
                   for k, v in w.stage.state_dict().items() if "lora_" not in k}
    split_train(workers, [padded_batch([6, 4], seed=0)])
    # r=8 on q,k,v,o of 2 layers per stage: 8 * (2*(128+128) + 2*(128+64)) = 7168 per layer
    assert _adapter_params(workers) == 4 * 7168
    for w in workers:
        adapters = [p for n, p in w.stage.named_parameters() if "lora_" in n]
        assert w.trainable == adapters
        w.handle(Step())
        state = w.optimizer.state_dict()["state"]
        assert len(state) == len(adapters)              # one AdamW entry per adapter tensor
        n = sum(p.numel() for p in adapters)
        assert n == 2 * 7168
        # two float32 moments per value and AdamW's float32 step count per tensor; grads cleared
        assert w.handle(Memory()).optim_bytes == 8 * n + 4 * len(adapters)
        sent = w.handle(GetWeights()).state_dict
        assert set(sent) == {k for k, _ in w.stage.named_parameters() if "lora_" in k}
        assert sum(t.nbytes for t in sent.values()) == 4 * n
        assert set(w.handle(GetState()).weights) == set(sent)
    for w in workers:       # the base did not move
        for k, v in w.stage.state_dict().items():
            if "lora_" not in k:
                assert torch.equal(v, base_before[w.stage_index, k])
    # a copy of the adapters makes another node serve what this one trained
    other = make_workers(lora_model("builtin", rank=8), 2)
    for w, o in zip(workers, other):
        o.handle(SetWeights(w.handle(GetWeights()).state_dict))
        for (k, a), b in zip(w.stage.state_dict().items(), o.stage.state_dict().values()):
            assert torch.equal(a, b), k


def test_full_training_keeps_full_state_for_comparison():
    workers = make_workers(build_builtin_tiny(seed=1), 2)
    split_train(workers, [padded_batch([6, 4], seed=0)])
    for w in workers:
        w.handle(Step())
        n = sum(p.numel() for p in w.stage.parameters())
        assert w.handle(Memory()).optim_bytes == 8 * n + 4 * len(w.trainable)
        assert len(w.handle(GetWeights()).state_dict) == len(w.stage.state_dict())


def test_bfloat16_forward_within_tolerance_of_float32():
    ids, mask = padded_batch([12, 9, 5], seed=3)
    lengths = mask.sum(1)
    logits = {}
    for dtype in ("float32", "bfloat16"):
        model, _, _ = load_model("builtin-tiny", seed=2, adapt=AdaptSpec(dtype=dtype, lora_rank=4))
        workers = make_workers(model, 2)
        assert next(iter(workers[0].stage.embed.parameters())).dtype == getattr(torch, dtype)
        h = ids
        with torch.no_grad():
            for w in workers:
                h = w.stage(h, lengths)
        logits[dtype] = h.float()
        res = pipeline_forward(workers, 0, ids, lengths.tolist(), labels=ids)
        logits[dtype + "_nll"] = torch.tensor(res.seq_nll)
    valid = torch.arange(ids.shape[1])[None, :] < lengths[:, None]
    diff = (logits["bfloat16"] - logits["float32"]).abs()[valid]
    scale = logits["float32"].abs()[valid].max()
    assert diff.max() < 0.05 * scale             # bf16 keeps ~3 significant digits
    assert diff.max() > 0                        # it did compute in bf16
    torch.testing.assert_close(logits["bfloat16_nll"], logits["float32_nll"], atol=0.02, rtol=0)


def test_half_precision_full_training_steps_float32_masters():
    model, _, _ = load_model("builtin-tiny", seed=1, adapt=AdaptSpec(dtype="bfloat16"))
    workers = make_workers(model, 2, lr=1e-3)
    before = [p.detach().clone() for w in workers for p in w.stage.parameters()]
    split_train(workers, [padded_batch([6, 4], seed=0)])
    for w in workers:
        w.handle(Step())
        n = sum(p.numel() for p in w.stage.parameters())
        moments = [v for st in w.optimizer.state_dict()["state"].values() for k, v in st.items()
                   if k in ("exp_avg", "exp_avg_sq")]
        assert moments and all(m.dtype == torch.float32 for m in moments)
        # float32 master + two moments per value, a step count per tensor
        assert w.handle(Memory()).optim_bytes == 12 * n + 4 * len(w.trainable)
        for p, m in zip(w.trainable, w.optimizer.masters):
            assert p.dtype == torch.bfloat16 and torch.equal(p, m.to(torch.bfloat16))
    after = [p for w in workers for p in w.stage.parameters()]
    assert any(not torch.equal(a, b) for a, b in zip(after, before))


@pytest.mark.parametrize("lora", [False, True])
def test_recompute_gives_the_stashed_gradients_with_a_smaller_stash(lora):
    batches = [padded_batch(lens, seed=i) for i, lens in enumerate(MICRO_BATCHES)]
    runs = {}
    for recompute in (False, True):
        model = lora_model("builtin", recompute=recompute) if lora else \
            prepare_model(build_builtin_tiny(seed=1), AdaptSpec(recompute=recompute), "llama", "float32")
        workers = make_workers(model, 2)
        assert all(w.stage.adapt.recompute == recompute for w in workers)
        ids, mask = batches[0]
        pipeline_forward(workers, 9, ids, mask.sum(1).tolist(), train=True, labels=ids)
        act = [w.handle(Memory()).act_bytes for w in workers]
        if recompute:        # the stash moves to host and back like any other
            for w in workers:
                w.handle(Offload("act", (9,)))
                w.handle(Reload("act", (9,)))
        pipeline_backward(workers, 9)
        losses = split_train(workers, batches[1:])
        runs[recompute] = (act, losses, [(k, p.grad) for w in workers for k, p in w.stage.named_parameters()
                                         if p.grad is not None])
    (act0, loss0, g0), (act1, loss1, g1) = runs[False], runs[True]
    assert loss0 == loss1
    assert [k for k, _ in g0] == [k for k, _ in g1] and g0
    for (k, a), (_, b) in zip(g0, g1):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5, msg=k)
    T = max(MICRO_BATCHES[0])
    assert act1[0] == 3 * T * 8                    # stage 0 keeps the token ids only
    assert act1[1] == 3 * T * (128 * 4 + 8)        # the last stage: its hidden input + labels
    assert all(r < s / 10 for r, s in zip(act1, act0))


def test_checkpoint_state_restores_adapters_and_optimizer():
    workers = make_workers(lora_model("builtin"), 2, lr=1e-2)
    split_train(workers, [padded_batch([6, 4], seed=0)])
    for w in workers:
        w.handle(Step())
    fresh = make_workers(lora_model("builtin"), 2, lr=1e-2)
    for w, f in zip(workers, fresh):
        st = w.handle(GetState())
        assert st.meta["adapt"]["lora_rank"] == 4 and st.meta["base"]["model"] == "builtin-tiny"
        f.handle(SetState(st.weights, st.optimizer, st.version))
    batch = [padded_batch([5, 5], seed=1)]
    assert split_train(workers, batch) == split_train(fresh, batch)
    for w, f in zip(workers, fresh):
        w.handle(Step())
        f.handle(Step())
        for a, b in zip(w.handle(GetWeights()).state_dict.values(), f.handle(GetWeights()).state_dict.values()):
            torch.testing.assert_close(a, b)
