"""Modeled presets against the real engine's bytes per stage (built-in model), and the
scheduler using them: a LoRA sync moves only adapter bytes; profiles record the mode."""
import pytest
import torch

from lemix.config import load_config
from lemix.engine.adapt import AdaptSpec, train_mode_of
from lemix.engine.messages import Backward, Forward, Memory, Step
from lemix.engine.model import load_model, split_stages
from lemix.engine.worker import StageWorker
from lemix.experiment import simulate
from lemix.profiling import load_profile, save_profile
from lemix.sched.presets import ARCHS, PRESETS, TrainMode, preset_profile, stage_memory
from lemix.types import OpKind

MODES = [(AdaptSpec(), TrainMode("float32")), (AdaptSpec(lora_rank=8), TrainMode("float32", 8)),
         (AdaptSpec(recompute=True), TrainMode("float32", recompute=True)),
         (AdaptSpec(dtype="bfloat16"), TrainMode("bfloat16")),
         (AdaptSpec(dtype="bfloat16", lora_rank=8), TrainMode("bfloat16", 8))]


def measured(adapt: AdaptSpec, stages: int = 2, C: int = 4, l: int = 128) -> list[dict]:
    """Weights, peak training state (gradients + optimizer) and stash per token, per stage."""
    model, _, _ = load_model("builtin-tiny", adapt=adapt)
    workers = [StageWorker(m, s, stages) for s, m in enumerate(split_stages(model, stages))]
    ids = torch.randint(0, 256, (C, l), generator=torch.Generator().manual_seed(0))
    out = []
    for step in range(2):       # the second backward finds the moments of the first step
        h = None
        for w in workers:
            h = w.handle(Forward(step, True, tuple(range(C)), (l,) * C, input_ids=ids if h is None else None,
                                 hidden=h, labels=ids if w.stage.is_last else None)).hidden
        act = [w.handle(Memory()).act_bytes / (C * l) for w in workers]
        g = None
        for w in reversed(workers):
            g = w.handle(Backward(step, g)).grad_input
        peak = [w.handle(Memory()).optim_bytes for w in workers]
        for w in workers:
            w.handle(Step())
    for s, w in enumerate(workers):
        out.append({"weight_bytes": w.handle(Memory()).weights_bytes, "train_state_bytes": peak[s],
                    "act_bytes_per_token": act[s], "mode": train_mode_of(w.stage),
                    "step_counters": 4 * len(w.trainable)})
    return out


@pytest.mark.parametrize("adapt,mode", MODES, ids=lambda x: getattr(x, "label", ""))
def test_memory_model_matches_the_engines_bytes_per_stage(adapt, mode):
    for s, got in enumerate(measured(adapt)):
        want = stage_memory(ARCHS["tiny"], mode, s, 2)
        assert got["mode"] == mode.label
        assert got["weight_bytes"] == want["weight_bytes"]
        # AdamW's per-tensor step counters are the only bytes the model leaves out
        assert got["train_state_bytes"] == want["train_state_bytes"] + got["step_counters"]
        assert got["act_bytes_per_token"] == pytest.approx(want["act_bytes_per_token"], rel=0.10)


def test_lora_preset_shrinks_training_state_and_sync_bytes():
    lora = preset_profile("7b-bf16-lora16-80gb", stages=2)
    full = preset_profile("7b-bf16-full-80gb", stages=2)
    rec = preset_profile("7b-bf16-lora16-recompute-80gb", stages=2)
    assert lora.capacity_bytes == 80 * 10**9 and lora.train_mode == "lora r=16 alpha=32 bfloat16"
    for lo, fu, re in zip(lora.stages, full.stages, rec.stages):
        assert fu.copy_bytes == pytest.approx(fu.weight_bytes, rel=1e-6)
        assert lo.copy_bytes < fu.copy_bytes / 100            # adapters only
        assert lo.train_state_bytes < fu.train_state_bytes / 100
        assert re.act_bytes_per_token < lo.act_bytes_per_token / 10
        assert re.bwd.b == pytest.approx(lo.bwd.b + lo.fwd.b)  # recompute pays one more forward
        assert lo.bwd.b < fu.bwd.b
    # 7B bf16 full AdamW: ~14 B/param of state next to ~2 B/param of weights
    assert sum(s.train_state_bytes for s in full.stages) == pytest.approx(14 * 6.74e9, rel=0.02)


def test_simulated_separate_syncs_move_adapter_bytes_with_a_lora_preset():
    syncs = {}
    for preset in ("7b-bf16-lora16-80gb", "7b-bf16-full-80gb"):
        cfg = load_config(overrides={"policy.names": "separate", "model.sim_preset": preset,
                                     "workload.duration_s": 20.0, "policy.sync_every": 2})
        (r,) = simulate(cfg)
        syncs[preset] = [op for op in r.ops if op.kind is OpKind.SYNC]
        assert syncs[preset], preset
    lora_bytes = {op.bytes for op in syncs["7b-bf16-lora16-80gb"]}
    want = {st.copy_bytes for st in preset_profile("7b-bf16-lora16-80gb", stages=2).stages}
    assert lora_bytes == want
    assert max(lora_bytes) * 100 < min(op.bytes for op in syncs["7b-bf16-full-80gb"])


def test_unknown_preset_is_a_config_error():
    with pytest.raises(ValueError, match="unknown preset 'nope'.*7b-bf16-lora16-80gb"):
        load_config(overrides={"model.sim_preset": "nope"})
    assert len(PRESETS) >= 6


def test_profile_file_keeps_mode_and_sync_bytes(tmp_path):
    prof = preset_profile("tiny-fp32-lora8-cpu", stages=2)
    save_profile(prof, tmp_path / "p.json")
    assert load_profile(tmp_path / "p.json", stages=2) == prof
    with pytest.raises(ValueError, match="training mode 'lora r=8 alpha=16 float32'"):
        load_profile(tmp_path / "p.json", stages=2, train_mode="full float32")
