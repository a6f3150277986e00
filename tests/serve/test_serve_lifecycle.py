"""Start-up and shutdown of `lemix serve` (issue 12): every start-up error is one `lemix:` line
and a non-zero exit, the port is bound and checked before anything slow, /health says
"starting" while the profile is measured (and a measured profile is cached), the key comes from
a file or the environment, SIGTERM cuts streams with an error event and [DONE], writes the final
checkpoint and exits 0, and a full disk is reported with its cause."""
from __future__ import annotations

import json
import resource
import signal
import socket
import subprocess
import sys
import threading
import time

import httpx
import pytest

from lemix.cli import build_parser, config_of, main
from lemix.serve.journal import Journal
from lemix.serve.options import ServeOptionError, ServeOptions, options_from_config
from lemix.serve.state import ProfileKey, cached_profile, store_profile
from serve_factory import (MODEL, free_port, hand_profile, make_cfg, server_log, server_thread,
                           start_subprocess, wait_healthy)


def lemix_serve(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "lemix.cli", "serve", "--model", MODEL, *args],
                          capture_output=True, text=True, timeout=timeout)


def assert_one_line_error(proc: subprocess.CompletedProcess, *needles: str) -> None:
    assert proc.returncode != 0, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("lemix:")]
    assert len(lines) == 1, proc.stderr
    for n in needles:
        assert n in lines[0], lines[0]


def test_start_up_errors_are_one_lemix_line(tmp_path):
    profile = tmp_path / "p.json"
    from lemix.profiling import save_profile
    save_profile(hand_profile(), profile)
    common = ["--profile", str(profile), "--port", "0"]
    blocker = tmp_path / "file"
    blocker.write_text("x")
    assert_one_line_error(lemix_serve(*common, "--state-dir", str(blocker / "s")), "cannot create the state dir")
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "journal.sqlite").write_bytes(b"garbage" * 500)
    assert_one_line_error(lemix_serve(*common, "--state-dir", str(bad), "--resume"), "cannot open the journal")
    missing = tmp_path / "missing"
    j = Journal(missing / "journal.sqlite")
    j.add([({"text": "a"}, 2)], 0)
    j.add_checkpoint(0, 7, missing / "checkpoints/node0/v00000007")
    j.close()
    assert_one_line_error(lemix_serve(*common, "--state-dir", str(missing), "--resume"),
                          "no checkpoint the journal records can be restored", "v7")
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    t0 = time.monotonic()
    # no --profile: a taken port must fail before any profiling starts
    assert_one_line_error(lemix_serve("--port", str(taken.getsockname()[1]), "--state-dir", str(tmp_path / "p")),
                          "cannot listen", "in use")
    assert time.monotonic() - t0 < 60
    taken.close()
    assert_one_line_error(lemix_serve("--port", "99999", "--state-dir", str(tmp_path / "q")), "--port", "99999")


def test_log_level_and_port_are_validated(capsys):
    assert main(["serve", "--log-level", "verbose"]) == 2
    assert capsys.readouterr().err == ("lemix: invalid config: --log-level (serve.log_level): Input should be "
                                       "'debug', 'info', 'warning', 'error' or 'critical' (got 'verbose')\n")
    with pytest.raises(ServeOptionError, match="--log-level"):
        ServeOptions(log_level="verbose")
    with pytest.raises(ServeOptionError, match="--port"):
        ServeOptions(port=99999)


def test_the_key_comes_from_a_file_or_the_environment(tmp_path):
    parser = build_parser()
    key_file = tmp_path / "key"
    key_file.write_text("from-file\n")
    serve = config_of(parser.parse_args(["serve", "--api-key-file", str(key_file)])).serve
    assert options_from_config(serve, environ={"LEMIX_API_KEY": "from-env"}).api_key == "from-file"
    serve = config_of(parser.parse_args(["serve"])).serve
    assert options_from_config(serve, environ={"LEMIX_API_KEY": "from-env"}).api_key == "from-env"
    assert options_from_config(serve, environ={}).api_key is None
    key_file.write_text("")
    with pytest.raises(ServeOptionError, match="empty"):
        options_from_config(config_of(parser.parse_args(["serve", "--api-key-file", str(key_file)])).serve,
                            environ={})


def test_health_says_starting_while_profiling_then_ok(tmp_path):
    release = threading.Event()

    def slow_profile(progress):
        for _ in range(3):
            progress(1)
        release.wait(60)
        return hand_profile()
    with server_thread(tmp_path, profile=slow_profile, wait_ready=False) as (url, app):
        deadline = time.monotonic() + 30
        while (r := httpx.get(f"{url}/health", timeout=10)).json().get("profiling", {}).get("done") != 3:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        assert r.status_code == 503 and r.json()["status"] == "starting"
        r = httpx.get(f"{url}/v1/models", timeout=10)
        assert r.status_code == 503 and r.json()["error"]["code"] == "starting" and r.headers["Retry-After"]
        assert httpx.get(f"{url}/metrics", timeout=10).status_code == 200
        release.set()
        app.state.host.wait_ready(30)
        assert httpx.get(f"{url}/health", timeout=10).json() == {"status": "ok"}


def test_a_measured_profile_is_cached_by_model_device_and_stages(tmp_path):
    cfg1, cfg2 = make_cfg(1), make_cfg(2)
    assert ProfileKey.of(cfg1).filename() != ProfileKey.of(cfg2).filename()
    assert cached_profile(str(tmp_path), cfg1) is None
    store_profile(str(tmp_path), cfg1, hand_profile(1))
    assert cached_profile(str(tmp_path), cfg1).stages == hand_profile(1).stages
    assert cached_profile(str(tmp_path), cfg2) is None
    with server_thread(tmp_path / "a", profile=None, profile_cache_dir=str(tmp_path)) as (url, app):
        assert app.state.host.progress is None and app.state.host.ready    # the cached one, not measured


def test_sigterm_cuts_streams_with_an_error_event_writes_the_final_checkpoint_and_exits_0(tmp_path):
    state, port = tmp_path / "state", free_port()
    (state).mkdir()
    url = f"http://127.0.0.1:{port}"
    proc = start_subprocess(state, port, "--drain-timeout", "1", "--train-batch-size", "4",
                            "--train-batch-wait", "0.05", "--checkpoint-every", "1000",
                            "--max-output-tokens", "1500")
    try:
        wait_healthy(proc, port)
        r = httpx.post(f"{url}/v1/train", json=[{"text": f"drain sample {i}"} for i in range(8)], timeout=60)
        assert r.status_code == 200
        lines: list[str] = []

        def stream():
            body = {"model": MODEL, "prompt": "a long answer", "max_tokens": 1500, "temperature": 0,
                    "stream": True}
            with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=120) as s:
                lines.extend(ln for ln in s.iter_lines() if ln)
        t = threading.Thread(target=stream)
        t.start()
        deadline = time.monotonic() + 30
        while not lines:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)
        t.join(60)
        assert proc.wait(timeout=120) == 0, server_log(proc)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert lines[-1] == "data: [DONE]"
    err = json.loads(lines[-2].removeprefix("data: "))["error"]
    assert err["code"] == "server_shutting_down" and err["status"] == 503
    journal = Journal(state / "journal.sqlite")
    counts, latest = journal.counts(), journal.latest_checkpoints()
    with journal._db() as db:
        applied_version = db.execute("SELECT MAX(version) FROM samples").fetchone()[0]
    journal.close()
    assert counts == {"queued": 0, "applied": 8}
    assert latest[0][0] == applied_version >= 1     # the final checkpoint holds every applied sample


def _limit_file_size() -> None:
    resource.setrlimit(resource.RLIMIT_FSIZE, (3_000_000, 3_000_000))


def test_a_full_disk_is_reported_with_its_cause_and_nothing_accepted_is_lost(tmp_path):
    """Files over 3 MB cannot be written (RLIMIT_FSIZE, as a full disk would): checkpoints
    (~8 MB) fail and a 3.7 MB training post cannot be journaled; small posts still work."""
    state, port = tmp_path / "state", free_port()
    state.mkdir()
    url = f"http://127.0.0.1:{port}"
    from lemix.profiling import save_profile
    save_profile(hand_profile(), tmp_path / "p.json")
    cmd = [sys.executable, "-m", "lemix.cli", "serve", "--model", MODEL, "--profile", str(tmp_path / "p.json"),
           "--port", str(port), "--state-dir", str(state), "--checkpoint-every", "1", "--train-batch-size", "4",
           "--train-batch-wait", "0.05", "--log-level", "warning"]
    log = open(tmp_path / "log", "w")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, preexec_fn=_limit_file_size)
    proc.log_path = log.name
    try:
        wait_healthy(proc, port)
        assert httpx.post(f"{url}/v1/train", json=[{"text": f"full {i}"} for i in range(4)], timeout=60).status_code == 200
        deadline = time.monotonic() + 60
        while (h := httpx.get(f"{url}/health", timeout=10)).status_code == 200:
            assert time.monotonic() < deadline
            time.sleep(0.1)
        assert h.status_code == 503 and h.json()["status"] == "degraded"
        assert "checkpoint" in h.json()["problems"] and "too large" in h.json()["problems"]["checkpoint"]
        assert not list((state / "checkpoints").glob("node0/*.tmp"))
        big = [{"text": "b" * 60_000} for _ in range(62)]    # 3.7 MB: under the body limit, over the file limit
        r = httpx.post(f"{url}/v1/train", json=big, timeout=60)
        assert r.status_code in (503, 507), r.text
        assert "journal" in r.json()["error"]["message"] and "cannot rollback" not in r.json()["error"]["message"]
        ok = httpx.post(f"{url}/v1/train", json=[{"text": "small again"}], timeout=60)
        assert ok.status_code == 200
        status = httpx.get(f"{url}/v1/train/status", timeout=30).json()
        assert status["queued"] + status["applied"] == 5
        assert httpx.post(f"{url}/v1/completions", json={"model": MODEL, "prompt": "still", "max_tokens": 2},
                          timeout=60).status_code == 200
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            rc = proc.wait(timeout=120)
        except subprocess.TimeoutExpired:
            proc.kill()
            raise
    assert rc != 0     # the final checkpoint could not be written either: said, not hidden
    assert "final checkpoint" in server_log(proc)
