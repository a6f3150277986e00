"""A backward that fails inside a stage worker while the server trains (issue 9's reproduction):
the server keeps answering, and every accepted sample is still applied (trained again)."""
from __future__ import annotations

import threading
import time

import httpx

from lemix.engine.worker import StageWorker
from serve_factory import MODEL, server_thread


def test_failed_backward_keeps_the_server_answering_and_applies_every_sample(tmp_path, monkeypatch):
    original = StageWorker._backward
    failed = threading.Event()

    def flaky(self, cmd):
        if self.stage_index == 1 and not failed.is_set():
            failed.set()
            raise RuntimeError("injected backward failure on stage 1")
        return original(self, cmd)

    monkeypatch.setattr(StageWorker, "_backward", flaky)
    with server_thread(tmp_path, stages=2, train_batch_wait_s=0.1) as (url, _):
        samples = [{"text": f"sample number {i} of a small training set"} for i in range(16)]
        r = httpx.post(f"{url}/v1/train", json=samples, timeout=60)
        assert r.status_code == 200 and r.json()["accepted"] == 16
        deadline = time.monotonic() + 90
        while (status := httpx.get(f"{url}/v1/train/status", timeout=30).json())["applied"] < 16:
            assert time.monotonic() < deadline, status
            time.sleep(0.2)
        assert failed.is_set()
        r = httpx.post(f"{url}/v1/completions", json={"model": MODEL, "prompt": "def f(x):", "max_tokens": 4},
                       timeout=60)
        assert r.status_code == 200, r.text
        assert httpx.get(f"{url}/health", timeout=30).status_code == 200
