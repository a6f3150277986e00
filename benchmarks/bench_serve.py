"""Benchmark `lemix serve` on loopback: throughput and TTFT under a bounded concurrent load, with
and without concurrent training traffic, and the lag between a training sample's acceptance and
its effect on serving.

    python benchmarks/bench_serve.py                      # 200 requests, 16 clients, both scenarios
    python benchmarks/bench_serve.py --profile prof.json --out runs/bench_serve.json

The server runs as a subprocess (`python -m lemix.cli serve`, builtin-tiny, 1 node x 1 stage on
CPU unless told otherwise); the clients are asyncio + httpx in this process, streaming every
request so TTFT is measured where a user sees it (send -> first content chunk). Traffic goes only
to 127.0.0.1 and is bounded: `--requests` per scenario, `--train-posts` training posts.

Lag: for each sample, acceptance = the client's time when POST /v1/train answered; its effect on
serving = the first later response served with weight_version >= the version that applied it
(from the journal). Version lag = applied version - served version at acceptance.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np

MODEL = "builtin-tiny"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(state: Path, port: int, args) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "lemix.cli", "serve", "--model", MODEL, "--port", str(port),
           "--state-dir", str(state), "--stages", str(args.stages), "--log-level", "warning",
           "--train-batch-wait", str(args.train_batch_wait), "--checkpoint-every", "0",
           "--max-output-tokens", str(max(args.max_tokens, 16))]
    if args.profile:
        cmd += ["--profile", args.profile]
    cmd += ["--policy", args.policy, *args.server_args.split()]
    log = open(state.parent / f"{state.name}.log", "w")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=dict(os.environ, PYTHONUNBUFFERED="1"))
    return wait_healthy(proc, port, args.startup_timeout, Path(log.name))


def wait_healthy(proc: subprocess.Popen, port: int, timeout_s: float, log: Path) -> subprocess.Popen:
    """Poll /health until 200; the server's log if it exits, a kill if it never gets there."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited: {log.read_text()}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    proc.kill()
    raise RuntimeError("server did not become healthy")


def corpus_texts(seed: int) -> tuple[list[str], list[str]]:
    """Prompts (varied lengths) and training texts (one topic) from the built-in corpus."""
    from lemix.workload import builtin_corpus
    rng = np.random.default_rng(seed)
    topics = builtin_corpus()
    text = " ".join(t.text for t in topics[:10])
    prompts = []
    for _ in range(2000):
        n = int(rng.integers(16, 192))
        i = int(rng.integers(0, len(text) - n))
        prompts.append(text[i:i + n])
    train_text = next(t.text for t in topics if t.name == "formatstrings")
    train = [train_text[i:i + 128] for i in range(0, len(train_text) - 128, 128)]
    return prompts, train


async def one_request(c: httpx.AsyncClient, prompt: str, max_tokens: int, seed: int) -> dict:
    body = {"model": MODEL, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0.8,
            "seed": seed, "stream": True}
    t0 = time.time()
    first = None
    final = None
    async with c.stream("POST", "/v1/completions", json=body) as r:
        if r.status_code != 200:
            return {"status": r.status_code, "t0": t0, "t1": time.time()}
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            obj = json.loads(line[6:])
            if first is None:
                first = time.time()
            if obj["choices"][0]["finish_reason"] is not None:
                final = obj
    t1 = time.time()
    return {"status": 200, "t0": t0, "ttft": (first or t1) - t0, "e2e": t1 - t0, "t1": t1,
            "version": final["lemix"]["weight_version"] if final else None,
            "server_ttft": final["lemix"]["ttft_s"] if final else None}


async def inference_load(url: str, prompts: list[str], n: int, clients: int, max_tokens: int) -> list[dict]:
    sem = asyncio.Semaphore(clients)
    async with httpx.AsyncClient(base_url=url, timeout=300, limits=httpx.Limits(max_connections=clients)) as c:
        async def run(i):
            async with sem:
                try:
                    return await one_request(c, prompts[i % len(prompts)], max_tokens, i)
                except httpx.HTTPError as exc:
                    return {"status": -1, "error": repr(exc)}
        return await asyncio.gather(*(run(i) for i in range(n)))


async def training_load(url: str, train: list[str], posts: int, per_post: int, every_s: float,
                        stop: asyncio.Event) -> list[dict]:
    out = []
    async with httpx.AsyncClient(base_url=url, timeout=60) as c:
        for k in range(posts):
            if stop.is_set():
                break
            batch = [{"text": train[(k * per_post + j) % len(train)]} for j in range(per_post)]
            r = await c.post("/v1/train", json=batch)
            t = time.time()
            if r.status_code == 200:
                out.append({"t": t, "ids": r.json()["sample_ids"]})
            try:
                await asyncio.wait_for(stop.wait(), every_s)
            except asyncio.TimeoutError:
                pass
    return out


async def scenario(url: str, args, prompts, train, with_training: bool) -> tuple[list[dict], list[dict], float]:
    stop = asyncio.Event()
    t0 = time.time()
    trainer = (asyncio.create_task(training_load(url, train, args.train_posts, args.train_per_post,
                                                 args.train_every, stop)) if with_training else None)
    results = await inference_load(url, prompts, args.requests, args.clients, args.max_tokens)
    wall = time.time() - t0
    stop.set()
    posts = await trainer if trainer else []
    return results, posts, wall


def pct(xs, q):
    return float(np.percentile(xs, q)) if xs else None


def summarize(results: list[dict], wall: float) -> dict:
    ok = [r for r in results if r["status"] == 200]
    ttft = [r["ttft"] for r in ok]
    e2e = [r["e2e"] for r in ok]
    return {
        "requests": len(results), "ok": len(ok),
        "errors_5xx": sum(1 for r in results if r["status"] >= 500 or r["status"] < 0),
        "wall_s": wall, "request_throughput": len(ok) / wall,
        "p50_ttft_ms": 1e3 * pct(ttft, 50), "p99_ttft_ms": 1e3 * pct(ttft, 99),
        "mean_ttft_ms": 1e3 * float(np.mean(ttft)) if ttft else None,
        "p50_server_ttft_ms": 1e3 * pct([r["server_ttft"] for r in ok if r["server_ttft"] is not None], 50),
        "p50_e2el_ms": 1e3 * pct(e2e, 50), "p99_e2el_ms": 1e3 * pct(e2e, 99),
    }


def lag_stats(state: Path, posts: list[dict], served: list[dict]) -> dict:
    """Acceptance -> first response served with weights that include the sample."""
    db = sqlite3.connect(state / "journal.sqlite")
    rows = dict((i, (v, av)) for i, v, av in db.execute(
        "SELECT id, version, accepted_version FROM samples WHERE state='applied'"))
    total = db.execute("SELECT COUNT(*) FROM samples").fetchone()[0]
    db.close()
    served = sorted((r["t1"], r["version"]) for r in served if r.get("version") is not None)
    lags, vlags, unseen = [], [], 0
    for post in posts:
        for sid in post["ids"]:
            if sid not in rows:
                continue
            version, accepted_version = rows[sid]
            vlags.append(version - accepted_version)
            seen = next((t for t, v in served if t >= post["t"] and v >= version), None)
            if seen is None:
                unseen += 1
            else:
                lags.append(seen - post["t"])
    return {"samples_accepted": total, "samples_applied": len(rows),
            "applied_but_not_yet_served": unseen,
            "lag_to_serving_p50_s": pct(lags, 50), "lag_to_serving_p99_s": pct(lags, 99),
            "version_lag_mean": float(np.mean(vlags)) if vlags else None}


def metric(url: str, name: str) -> float | None:
    for line in httpx.get(f"{url}/metrics", timeout=30).text.splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            return float(line.rsplit(" ", 1)[1])
    return None


def run_one(args, root: Path, name: str, with_training: bool, prompts, train) -> dict:
    state = root / name
    if args.cached_profile and (root / "profile.json").is_file() and not args.profile:
        state.mkdir(parents=True)
        shutil.copy(root / "profile.json", state / "profile.json")
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    proc = start_server(state, port, args)
    try:
        asyncio.run(inference_load(url, prompts[-50:], 16, 4, 4))     # warm-up
        results, posts, wall = asyncio.run(scenario(url, args, prompts, train, with_training))
        out = {"scenario": name, **summarize(results, wall)}
        if with_training:
            # let the last samples apply, then probe what serving sees (bounded wait)
            deadline = time.time() + 60
            while time.time() < deadline and httpx.get(f"{url}/v1/train/status").json()["queued"]:
                time.sleep(0.2)
            probes = asyncio.run(inference_load(url, prompts[:8], 8, 1, 1))
            out.update(lag_stats(state, posts, results + probes))
            out["train_samples_per_s"] = out["samples_applied"] / (wall + 1e-9)
            out["deprioritized_training_tasks"] = metric(url, "lemix:deprioritized_training_tasks_total")
            out["weight_version"] = metric(url, "lemix:weight_version")
            out["recent_train_loss"] = httpx.get(f"{url}/v1/train/status").json()["recent_train_loss"]
        out["slo_attainment"] = metric(url, "lemix:slo_attainment")
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=90)
        except subprocess.TimeoutExpired:
            proc.kill()
    if (state / "profile.json").is_file() and not (root / "profile.json").is_file():
        shutil.copy(state / "profile.json", root / "profile.json")
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--requests", type=int, default=200)
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--stages", type=int, default=1)
    ap.add_argument("--policy", default="lemix", help="scheduling policy of the server")
    ap.add_argument("--server-args", default="", help="more `lemix serve` flags, one string")
    ap.add_argument("--profile", help="profile JSON (default: the server measures a quick one, reused)")
    ap.add_argument("--train-posts", type=int, default=400, help="at most this many training posts")
    ap.add_argument("--train-per-post", type=int, default=4)
    ap.add_argument("--train-every", type=float, default=0.5, help="seconds between training posts")
    ap.add_argument("--train-batch-wait", type=float, default=1.0)
    ap.add_argument("--startup-timeout", type=float, default=600)
    ap.add_argument("--workdir", help="state dirs here (default: a temporary dir)")
    ap.add_argument("--out", help="write the results as JSON here")
    args = ap.parse_args()
    args.cached_profile = True
    prompts, train = corpus_texts(0)
    root = Path(args.workdir or tempfile.mkdtemp(prefix="bench-serve-"))
    root.mkdir(parents=True, exist_ok=True)
    rows = [run_one(args, root, "inference", False, prompts, train),
            run_one(args, root, "inference+training", True, prompts, train)]
    cols = ["scenario", "ok", "errors_5xx", "request_throughput", "p50_ttft_ms", "p99_ttft_ms",
            "p50_e2el_ms", "p99_e2el_ms"]
    print(" | ".join(cols))
    for r in rows:
        print(" | ".join(f"{r[c]:.2f}" if isinstance(r[c], float) else str(r[c]) for c in cols))
    t = rows[1]
    print(f"training: {t['samples_applied']}/{t['samples_accepted']} samples applied "
          f"({t['train_samples_per_s']:.1f}/s during the load), weight version {t['weight_version']}, "
          f"deferred tasks {t['deprioritized_training_tasks']}; lag acceptance -> serving "
          f"p50 {t['lag_to_serving_p50_s']} s, p99 {t['lag_to_serving_p99_s']} s, "
          f"version lag {t['version_lag_mean']}")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps({"args": vars(args), "results": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
