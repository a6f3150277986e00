"""Journal durability and exactly-once training across a SIGKILL, and checkpoints across a
graceful restart, with the server as a real subprocess (`python -m lemix.cli serve`)."""
from __future__ import annotations

import signal
import sqlite3
import time

import httpx

from lemix.serve.journal import Journal
from serve_factory import MODEL, free_port, server_log, server_thread, start_subprocess, wait_healthy


def wait_applied(url: str, n: int, timeout_s: float = 90.0) -> dict:
    deadline = time.monotonic() + timeout_s
    while (status := httpx.get(f"{url}/v1/train/status", timeout=30).json())["applied"] < n:
        assert time.monotonic() < deadline, status
        time.sleep(0.2)
    return status


def probe(url: str) -> dict:
    r = httpx.post(f"{url}/v1/completions", json={"model": MODEL, "prompt": "a fixed probe prompt",
                                                   "max_tokens": 1, "temperature": 0}, timeout=60)
    assert r.status_code == 200, r.text
    return r.json()["lemix"]


def test_sigkill_then_resume_trains_every_accepted_sample_exactly_once(tmp_path):
    state = tmp_path / "state"
    state.mkdir()
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    texts = [f"sample number {i}: the journal keeps it safe." for i in range(13)]

    # 1. 8 samples fill a micro-batch and are applied (no checkpoint yet); 5 more wait for a batch
    #    that will not fill in 10 minutes. Then the process dies without any chance to clean up.
    proc = start_subprocess(state, port, "--train-batch-size", "8", "--train-batch-wait", "600",
                            "--checkpoint-every", "1000")
    try:
        wait_healthy(proc, port)
        assert httpx.post(f"{url}/v1/train", json=[{"text": t} for t in texts[:8]], timeout=60).json()["accepted"] == 8
        wait_applied(url, 8)
        r = httpx.post(f"{url}/v1/train", json={"samples": [{"prompt": t, "completion": " ok"} for t in texts[8:]]},
                       timeout=60)
        assert r.status_code == 200 and r.json()["accepted"] == 5
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    journal = Journal(state / "journal.sqlite")
    assert journal.counts() == {"queued": 5, "applied": 8}
    assert journal.latest_checkpoints() == {}
    journal.close()

    # 2. Resume: the 8 applications no checkpoint holds are rolled back; all 13 are trained.
    #    SIGTERM then drains, checkpoints and exits.
    proc = start_subprocess(state, port, "--resume", "--train-batch-wait", "0.1")
    try:
        wait_healthy(proc, port)
        status = wait_applied(url, 13)
        assert status["queued"] == 0
        before = probe(url)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) in (0, -signal.SIGTERM), server_log(proc)
    finally:
        if proc.poll() is None:
            proc.kill()
    journal = Journal(state / "journal.sqlite")
    assert journal.audit() == {"samples": 13, "applied": 13, "not_exactly_once": 0}
    (version, path), = journal.latest_checkpoints().values()
    assert version == status["weight_version"] == before["weight_version"] >= 2
    journal.close()
    with sqlite3.connect(state / "journal.sqlite") as db:
        assert db.execute("SELECT COUNT(*) FROM applications WHERE rolled_back=1").fetchone()[0] == 8
        assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"

    # 3. Resume again (in process): the weights and version come back from the checkpoint.
    with server_thread(tmp_path, resume=True) as (url2, app):
        after = probe(url2)
        assert after["weight_version"] == version
        assert abs(after["inference_loss"] - before["inference_loss"]) < 1e-5
        assert httpx.get(f"{url2}/v1/train/status").json()["queued"] == 0


def test_a_state_dir_with_a_journal_needs_resume(tmp_path):
    journal = Journal(tmp_path / "state" / "journal.sqlite")
    journal.add([({"text": "x"}, 2)], version=0)
    journal.close()
    import pytest

    from lemix.serve.host import ServeError
    with pytest.raises(ServeError, match="--resume"):
        with server_thread(tmp_path):
            pass


def test_periodic_checkpoints_are_taken_while_serving_and_pruned(tmp_path):
    with server_thread(tmp_path, checkpoint_every=1, train_batch_wait_s=0.05) as (url, app):
        host = app.state.host
        for i in range(4):    # 4 separate bursts: at least 4 steps, each followed by a checkpoint
            httpx.post(f"{url}/v1/train", json=[{"text": f"burst {i} sample {k}"} for k in range(4)], timeout=60)
            wait_applied(url, 4 * (i + 1))
        deadline = time.monotonic() + 30
        while host.metrics.registry.get_sample_value("lemix:checkpoints_total") < 2:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        final_version = host.version[0]
    journal = Journal(tmp_path / "state" / "journal.sqlite")
    ckpts = journal.checkpoints(0)
    journal.close()
    assert len(ckpts) == 2 and ckpts[-1][0] == final_version
    on_disk = sorted(p.name for p in (tmp_path / "state" / "checkpoints" / "node0").iterdir())
    assert on_disk == [f"v{v:08d}" for v, _ in ckpts]
