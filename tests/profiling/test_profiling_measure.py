"""measure_profile on the built-in tiny model split into 2 stages (quick grid, CPU)."""
import pytest
import torch

from lemix.engine.messages import Forward, Free, GetWeights, Memory
from lemix.engine.model import load_model, split_stages
from lemix.engine.worker import StageWorker
from lemix.profiling import (ProfileError, grid_size, load_profile, measure_profile, plot_profile,
                             save_profile)

S = 2


def make_workers(hf_model, num_stages: int = S) -> list[StageWorker]:
    return [StageWorker(st, i, num_stages) for i, st in enumerate(split_stages(hf_model, num_stages))]


@pytest.fixture(scope="module")
def measured():
    """One quick profiling run (single intra-op thread, as the local backend gives 2 stages on
    2 cores): the workers, their weights before, the profile, samples and progress ticks."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        hf, _, _ = load_model("builtin-tiny")
        workers = make_workers(hf)
        before = [w.handle(GetWeights()) for w in workers]
        ticks = []
        profile, samples = measure_profile(workers, model_name="builtin-tiny", device="cpu",
                                           quick=True, capacity_bytes=10**9, progress=ticks.append)
    finally:
        torch.set_num_threads(threads)
    return dict(hf=hf, workers=workers, before=before, profile=profile, samples=samples, ticks=ticks)


def test_coefficients_positive(measured):
    p = measured["profile"]
    assert (p.model, p.device, p.dtype, p.num_stages) == ("builtin-tiny", "cpu", "float32", S)
    for st in p.stages:
        for k in (st.fwd, st.bwd, st.decode):
            assert min(k.a, k.b, k.c) >= 0
            assert k.a > 0 and k.b + k.c > 0          # a cost that grows with the shape
        assert st.optim.a > 0
    assert p.host_bandwidth_Bps > 0 and p.network_bandwidth_Bps == p.host_bandwidth_Bps
    for s in range(S):
        for op in ("fwd", "bwd", "decode", "optim", "fwd_train"):
            assert 0 <= p.fit_error[f"stage{s}.{op}"] < 10


def test_memory_figures(measured):
    p, hf, workers = measured["profile"], measured["hf"], measured["workers"]
    cfg = hf.config
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    for st, w in zip(p.stages, workers):
        layers = w.stage.num_layers
        assert st.kv_bytes_per_token == 2 * layers * cfg.num_key_value_heads * head_dim * 4
        param_bytes = sum(t.nbytes for t in w.stage.parameters())
        assert param_bytes <= st.weight_bytes <= param_bytes + 4096       # + rotary buffer
        assert st.train_state_bytes >= 3 * param_bytes                   # grads + 2 AdamW moments
        assert st.act_bytes_per_token > layers * cfg.hidden_size * 4     # at least a hidden per layer
        assert st.tmp_bytes_per_token > 0


def test_workers_left_unchanged_and_clean(measured):
    for w, before in zip(measured["workers"], measured["before"]):
        after = w.handle(GetWeights())
        assert after.version == before.version
        assert before.state_dict.keys() == after.state_dict.keys()
        for key, t in before.state_dict.items():
            assert torch.equal(t, after.state_dict[key]), key
        m = w.handle(Memory())
        assert (m.kv_bytes, m.act_bytes, m.host_bytes) == (0, 0, 0)
        assert not w.stashes and not w.kv.on_device and not w.kv.on_host
        assert all(p.grad is None for p in w.stage.parameters())
        assert not w.optimizer.state                                     # AdamW never stepped


def test_progress_and_samples(measured):
    assert sum(measured["ticks"]) == grid_size(quick=True, num_stages=S)
    samples = measured["samples"]
    assert len(samples["stages"]) == S
    assert all(len(st["fwd"]) == len(st["bwd"]) > 3 for st in samples["stages"])


def test_save_load_plot(measured, tmp_path):
    p, samples = measured["profile"], measured["samples"]
    save_profile(p, tmp_path / "p.json", samples)
    assert load_profile(tmp_path / "p.json", stages=S, model="builtin-tiny", device="cpu") == p
    png = plot_profile(p, samples, tmp_path / "p.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_busy_workers_refused(measured):
    workers = make_workers(measured["hf"])
    ids = torch.zeros(1, 4, dtype=torch.long)
    workers[0].handle(Forward(0, False, (7,), (4,), input_ids=ids, keep_kv=True))
    with pytest.raises(ProfileError, match="idle"):
        measure_profile(workers, model_name="m", device="cpu", quick=True, capacity_bytes=1)
    workers[0].handle(Free(seq_ids=(7,)))
