"""Factory helpers for the serve tests: a hand-made CPU profile, configs, and a live uvicorn
server on a free loopback port (in a thread, or as a `python -m lemix.cli serve` subprocess)."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import httpx

from lemix.config import load_config
from lemix.sched.latency import OpCoeffs, Profile, StageProfile
from lemix.serve.options import SERVE_DEFAULTS, ServeOptions

MODEL = "builtin-tiny"


def hand_profile(stages: int = 1) -> Profile:
    """Plausible CPU figures for builtin-tiny (online calibration corrects them); measuring a
    profile would take a minute on a busy 2-core machine."""
    st = StageProfile(fwd=OpCoeffs(2e-3, 2e-5, 0.0), bwd=OpCoeffs(4e-3, 4e-5, 0.0),
                      decode=OpCoeffs(3e-3, 1e-4, 1e-7), optim=OpCoeffs(5e-3),
                      weight_bytes=2_700_000 // stages, train_state_bytes=8_000_000 // stages,
                      act_bytes_per_token=44_000 // stages, tmp_bytes_per_token=12_000,
                      kv_bytes_per_token=2048 // stages)
    return Profile(MODEL, "cpu", "float32", (st,) * stages, 8 * 10**9, 5e9, 1e9)


def save_hand_profile(path: Path, stages: int = 1) -> Path:
    from lemix.profiling import save_profile
    save_profile(hand_profile(stages), path)
    return path


def make_cfg(stages: int = 1, **overrides):
    base = {"cluster.stages": stages, "model.lr": 1e-3}
    base.update(overrides)
    return load_config(None, base, SERVE_DEFAULTS)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def server_thread(tmp_path: Path, *, stages: int = 1, cfg_overrides: dict | None = None,
                  profile="hand", wait_ready: bool = True, **opts):
    """A live server in this process (ready to serve unless wait_ready=False); yields (base_url, app).
    profile: "hand" (the hand-made one), a Profile, a callable(progress) -> Profile, or None (the
    server's own choice: the cached one, else measure)."""
    import uvicorn

    from lemix.serve.app import create_app

    cfg = make_cfg(stages, **(cfg_overrides or {}))
    port = free_port()
    options = ServeOptions(host="127.0.0.1", port=port, state_dir=str(tmp_path / "state"),
                           log_level="warning", **opts)
    app = create_app(cfg, options, profile=hand_profile(stages) if profile == "hand" else profile)
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning",
                                           access_log=False))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("the server did not start")
        time.sleep(0.05)
    host = app.state.host
    if wait_ready:
        host.wait_ready(60)
        if not host.ready:
            server.should_exit = True
            thread.join(timeout=60)
            raise RuntimeError(f"the server did not become ready: {host.failure!r}")
    try:
        yield f"http://127.0.0.1:{port}", app
    finally:
        server.should_exit = True
        thread.join(timeout=60)


def start_subprocess(state_dir: Path, port: int, *extra: str, stages: int = 1) -> subprocess.Popen:
    """`python -m lemix.cli serve` with a hand-made profile file; output goes to <state_dir>.log."""
    profile = save_hand_profile(state_dir.parent / f"profile-{stages}.json", stages)
    cmd = [sys.executable, "-m", "lemix.cli", "serve", "--model", MODEL, "--stages", str(stages),
           "--profile", str(profile), "--port", str(port), "--state-dir", str(state_dir),
           "--lr", "1e-3", "--log-level", "warning", *extra]
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    log = open(state_dir.parent / f"{state_dir.name}.log", "a")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, text=True)
    proc.log_path = log.name
    log.close()
    return proc


def server_log(proc: subprocess.Popen) -> str:
    return Path(proc.log_path).read_text()


def wait_healthy(proc: subprocess.Popen, port: int, timeout_s: float = 120.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}:\n{server_log(proc)}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1.0).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    proc.kill()
    raise RuntimeError(f"server not healthy after {timeout_s} s:\n{server_log(proc)}")


def sse_events(text: str) -> list:
    """Parse an SSE body into JSON objects and the final '[DONE]' marker."""
    out = []
    for block in text.split("\n\n"):
        if not block.strip():
            continue
        assert block.startswith("data: "), block
        data = block[len("data: "):]
        out.append(data if data == "[DONE]" else json.loads(data))
    return out
