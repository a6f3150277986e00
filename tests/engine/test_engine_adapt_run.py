"""`lemix run --lora-rank 8 --dtype bfloat16` end to end: the built-in model and saved
Llama / Qwen2 checkpoints, every task completed, adapters trained, the base untouched."""
from __future__ import annotations

import json

import pytest

from engine_factories import tiny_hf
from lemix.cli import main
from lemix.profiling import save_profile
from test_engine_run import cpu_profile

ARGS = ["--duration", "3", "--request-rate", "3", "--max-prompt-tokens", "96", "--train-seq-tokens", "64",
        "--max-output-tokens", "8", "--no-progress", "--force-profile"]


@pytest.mark.filterwarnings("ignore:using profile")
@pytest.mark.parametrize("model", ["builtin-tiny", "llama", "qwen2"])
def test_lemix_run_lora_bfloat16(tmp_path, model):
    policies = "lemix,separate" if model == "builtin-tiny" else "lemix"
    extra = [] if model == "builtin-tiny" else ["--byte-tokenizer"]
    if model != "builtin-tiny":
        d = tmp_path / model
        tiny_hf(model).save_pretrained(d)
        model = str(d)
    profile = tmp_path / "profile.json"
    save_profile(cpu_profile(2), profile)
    out = tmp_path / "run"
    rc = main(["run", "--model", model, "--lora-rank", "8", "--dtype", "bfloat16", "--policy", policies,
               "--profile", str(profile), "--out", str(out), *ARGS, *extra])
    assert rc == 0
    summary = json.loads((out / "summary.json").read_text())
    for policy, s in summary.items():
        assert s["failed"] == s["train_failed"] == 0, policy
        assert s["train_steps"] > 0 and s["train_loss_last"] is not None, policy
        assert s["inference_loss_mean"] is not None and s["inference_loss_mean"] > 0
    cfg = (out / "config.yaml").read_text()
    assert "lora_rank: 8" in cfg and "dtype: bfloat16" in cfg


def test_bad_training_mode_flags_are_config_errors(capsys):
    assert main(["run", "--dtype", "float8", "--no-progress"]) == 2
    assert "model.dtype" in capsys.readouterr().err
    assert main(["run", "--lora-rank", "-1", "--no-progress"]) == 2
    assert "model.lora_rank" in capsys.readouterr().err
    assert main(["run", "--lora-rank", "4", "--lora-targets", "nothing_here", "--no-progress",
                 "--duration", "1"]) == 2
    assert "match no module" in capsys.readouterr().err
