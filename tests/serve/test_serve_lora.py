"""`lemix serve --lora-rank 8 --dtype bfloat16`: serves base + live adapter, trains the adapter,
checkpoints only the adapter, and `lemix export` turns the state dir into a PEFT adapter."""
from __future__ import annotations

import json
import time

import httpx
import torch

from lemix.cli import main
from serve_factory import MODEL, server_thread


def test_lora_server_trains_checkpoints_and_exports_the_adapter(tmp_path):
    texts = [f"adapter sample {i}: low-rank updates are cheap to ship." for i in range(8)]
    with server_thread(tmp_path, stages=2, cfg_overrides={"model.lora_rank": 8, "model.dtype": "bfloat16",
                                                          "workload.train_batch_size": 4},
                       checkpoint_every=1, train_batch_wait_s=0.1) as (url, _):
        assert httpx.post(f"{url}/v1/train", json=[{"text": t} for t in texts], timeout=60).json()["accepted"] == 8
        deadline = time.monotonic() + 120
        while httpx.get(f"{url}/v1/train/status", timeout=30).json()["applied"] < 8:
            assert time.monotonic() < deadline
            time.sleep(0.2)
        r = httpx.post(f"{url}/v1/completions", json={"model": MODEL, "prompt": "low-rank", "max_tokens": 4,
                                                      "temperature": 0}, timeout=60)
        assert r.status_code == 200, r.text
    ckpts = sorted((tmp_path / "state" / "checkpoints").glob("node*/v*/stage*.pt"))
    assert ckpts
    for f in ckpts:
        blob = torch.load(f, weights_only=True)
        assert blob["weights"] and all(".lora_" in k for k in blob["weights"])      # adapters only
        assert blob["meta"]["base"] == {"model": MODEL, "seed": 0}
        assert blob["meta"]["adapt"]["dtype"] == "bfloat16"
    out = tmp_path / "export"
    assert main(["export", "--state-dir", str(tmp_path / "state"), "--out", str(out), "--adapter"]) == 0
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["r"] == 8 and sorted(config["target_modules"]) == ["k_proj", "o_proj", "q_proj", "v_proj"]
    assert (out / "base" / "config.json").is_file()
