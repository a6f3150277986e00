"""Training through /v1/train lowers the served model's loss on held-out text of the same
topic (measured through the API: the `lemix.inference_loss` of a completion's prompt), while
inference keeps answering; status and metrics follow the applied samples."""
from __future__ import annotations

import threading
import time

import httpx

from lemix.workload import builtin_corpus
from serve_factory import MODEL, server_thread


def topic_chunks(name: str, size: int = 128) -> tuple[list[str], list[str]]:
    text = next(t.text for t in builtin_corpus() if t.name == name)
    chunks = [text[i:i + size] for i in range(0, len(text) - size, size)]
    cut = int(len(chunks) * 0.8)
    return chunks[:cut], chunks[cut:]


def heldout_loss(url: str, texts: list[str]) -> tuple[float, int]:
    losses, version = [], None
    for t in texts:
        r = httpx.post(f"{url}/v1/completions", json={"model": MODEL, "prompt": t, "max_tokens": 1,
                                                       "temperature": 0}, timeout=60)
        assert r.status_code == 200, r.text
        losses.append(r.json()["lemix"]["inference_loss"])
        version = r.json()["lemix"]["weight_version"]
    return sum(losses) / len(losses), version


def test_training_lowers_heldout_loss_while_serving(tmp_path):
    train, held = topic_chunks("formatstrings")
    held = held[:6]
    with server_thread(tmp_path, train_batch_wait_s=0.2,
                       cfg_overrides={"model.lr": 3e-3, "workload.train_seq_tokens": 130}) as (url, app):
        before, v0 = heldout_loss(url, held)
        assert v0 == 0

        codes: list[int] = []
        stop = threading.Event()

        def keep_asking():
            with httpx.Client(base_url=url, timeout=60) as c:
                while not stop.is_set():
                    codes.append(c.post("/v1/completions", json={"model": MODEL, "prompt": "def f(x):",
                                                                 "max_tokens": 8}).status_code)
                    stop.wait(0.05)
        asker = threading.Thread(target=keep_asking)
        asker.start()
        samples = [{"text": t} for t in train[:64]]
        try:
            for i in range(0, len(samples), 16):
                r = httpx.post(f"{url}/v1/train", json=samples[i:i + 16], timeout=60)
                assert r.status_code == 200 and r.json()["accepted"] == 16
            deadline = time.monotonic() + 90
            while (status := httpx.get(f"{url}/v1/train/status", timeout=30).json())["applied"] < 64:
                assert time.monotonic() < deadline, status
                time.sleep(0.2)
        finally:
            stop.set()
            asker.join()

        after, v1 = heldout_loss(url, held)
        assert codes and set(codes) == {200}
        assert status["queued"] == 0 and status["weight_version"] >= 64 // 8
        assert status["recent_train_loss"] is not None and status["recent_lag_s"] is not None
        assert v1 == status["weight_version"]
        assert after < before - 0.5, (before, after)
        metrics = httpx.get(f"{url}/metrics").text
        assert "lemix:train_samples_applied_total 64.0" in metrics
