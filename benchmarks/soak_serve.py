"""Soak `lemix serve`: a long run of small requests against one server, reporting the server's
resident memory as the request count grows, and the latency percentiles.

    python benchmarks/soak_serve.py                          # 20,000 requests, 8 clients
    python benchmarks/soak_serve.py --requests 5000 --out runs/soak.json

Memory must stay flat with uptime: a finished request's record goes to <state>/requests.csv
and into the /metrics aggregates, nothing per request stays in memory. The first `--warmup`
requests are not counted (allocator pools, caches and the first CSV flushes settle there).
RSS is read from /proc/<pid>/status (Linux) every `--every` requests; the report gives RSS at
each 10,000 and the growth per 10,000 after warm-up. Training posts (4 samples every 250
requests) run alongside, so training-task records flow too. Traffic goes only to 127.0.0.1.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from bench_serve import MODEL, free_port, wait_healthy  # noqa: E402


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


def start(state: Path, port: int, args) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "lemix.cli", "serve", "--model", MODEL, "--port", str(port),
           "--state-dir", str(state), "--log-level", "warning", "--checkpoint-every", "0",
           "--train-batch-wait", "0.2", "--max-queued", "1024"]
    if args.profile:
        cmd += ["--profile", args.profile]
    log = open(state.parent / "server.log", "w")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
    return wait_healthy(proc, port, args.startup_timeout, state.parent / "server.log")


async def soak(url: str, pid: int, args) -> dict:
    total = args.warmup + args.requests
    lat, codes, rss = [], {}, []
    done = 0
    lock = asyncio.Lock()
    async with httpx.AsyncClient(base_url=url, timeout=120,
                                 limits=httpx.Limits(max_connections=args.clients)) as c:
        queue = iter(range(total))

        async def client():
            nonlocal done
            for i in queue:
                body = {"model": MODEL, "prompt": f"soak request {i % 97} " * (1 + i % 5),
                        "max_tokens": args.max_tokens, "temperature": 0.7, "seed": i}
                t0 = time.perf_counter()
                r = await c.post("/v1/completions", json=body)
                dt = time.perf_counter() - t0
                if i % 250 == 0:
                    await c.post("/v1/train", json=[{"text": f"soak sample {i} {k}"} for k in range(4)])
                async with lock:
                    codes[r.status_code] = codes.get(r.status_code, 0) + 1
                    done += 1
                    if done > args.warmup:
                        lat.append(dt)
                    n = done - args.warmup
                    if n >= 0 and n % args.every == 0:
                        rss.append((n, rss_mb(pid)))
        await asyncio.gather(*(client() for _ in range(args.clients)))
    return {"latency_s": lat, "codes": codes, "rss": rss}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--requests", type=int, default=20_000)
    ap.add_argument("--warmup", type=int, default=2_000)
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--max-tokens", type=int, default=2)
    ap.add_argument("--every", type=int, default=2_000, help="sample RSS every this many requests")
    ap.add_argument("--profile", help="profile JSON (default: the cached or a measured one)")
    ap.add_argument("--startup-timeout", type=float, default=600)
    ap.add_argument("--out", help="write the results as JSON here")
    args = ap.parse_args()
    root = Path(tempfile.mkdtemp(prefix="soak-serve-"))
    state, port = root / "state", free_port()
    proc = start(state, port, args)
    try:
        t0 = time.time()
        out = asyncio.run(soak(f"http://127.0.0.1:{port}", proc.pid, args))
        wall = time.time() - t0
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=120)
        except subprocess.TimeoutExpired:
            proc.kill()
    lat = np.array(out["latency_s"]) * 1e3
    rss = out["rss"]
    base = rss[0][1]
    per10k = (rss[-1][1] - base) / (rss[-1][0] - rss[0][0]) * 10_000 if len(rss) > 1 else None
    csv_path = state / "requests.csv"
    rows = csv_path.read_text().count("\n") - 1 if csv_path.is_file() else None
    report = {"requests": args.requests, "warmup": args.warmup, "clients": args.clients, "wall_s": wall,
              "codes": out["codes"], "p50_ms": float(np.percentile(lat, 50)), "p90_ms": float(np.percentile(lat, 90)),
              "p99_ms": float(np.percentile(lat, 99)), "rss_mb": rss, "rss_growth_mb_per_10k": per10k,
              "requests_csv_rows": rows, "exit_code": proc.returncode}
    print(f"{args.requests} requests (+{args.warmup} warm-up) from {args.clients} clients in {wall:.0f} s; "
          f"status codes {out['codes']}; server exit {proc.returncode}")
    print(f"latency ms: p50 {report['p50_ms']:.1f}  p90 {report['p90_ms']:.1f}  p99 {report['p99_ms']:.1f}")
    print("RSS MB after n requests (past warm-up): " + ", ".join(f"{n}: {m:.1f}" for n, m in rss))
    for n, m in rss:
        if n % 10_000 == 0:
            print(f"  at {n:>6}: {m:.1f} MB")
    growth = "n/a (too few samples)" if per10k is None else f"{per10k:+.2f} MB"
    print(f"RSS growth: {growth} per 10,000 requests; requests.csv holds {rows} rows")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
