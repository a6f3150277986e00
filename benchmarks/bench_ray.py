"""What the Ray backend costs against the local one, and what a 4-node Ray run looks like.

    python benchmarks/bench_ray.py [--profile FILE] [--out DIR] [--skip-run] [--skip-four]

1. Per-hop latency: a Forward command carrying a [B,T,H] hidden to a middle stage and back,
   through a local worker thread vs through a Ray actor (same StageWorker class). Reported:
   round-trip p50, the worker's own compute time, and their difference (the transport cost).
2. The same short run (builtin-tiny, 2 nodes x 1 stage, lemix, the same tasks and profile) on
   the local and on the Ray backend: wall time, start-up, makespan, latency, throughput.
3. A 4-node run on Ray with 4 logical GPUs (one per stage bundle) on this CPU machine:
   placement description and summary.

Starts its own local Ray (2 CPUs, 4 logical GPUs, no dashboard). Writes bench_ray.json to --out.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from lemix.config import RUN_DEFAULTS, load_config
from lemix.api import engine_profile, engine_tasks, stage_devices, text_source
from lemix.engine.backend import LocalBackend
from lemix.engine.data import TaskTexts
from lemix.engine.messages import Forward, Memory
from lemix.engine.model import load_model, split_stages
from lemix.engine.runtime import Engine
from lemix.metrics import summarize
from lemix.profiling import load_profile, save_profile

SHAPES = [(1, 16), (4, 64), (8, 256)]     # (B, T) of the hidden sent to stage 1
KEYS = ("completed", "failed", "train_completed", "train_failed", "mean_e2el_ms", "p99_e2el_ms",
        "request_throughput", "train_samples_per_s", "train_steps", "idle_ratio", "makespan_s", "wall_s")


def _start(backend, model, nodes: int, stages: int):
    t0 = time.perf_counter()
    backend.start([split_stages(model, stages) for _ in range(nodes)], ["cpu"] * stages, lr=1e-4,
                  weight_decay=0.0, memory_budget_bytes=None)
    return time.perf_counter() - t0


def hop_latency(model, backend, repeats: int) -> list[dict]:
    """Forward round trips of a [B,T,H] hidden to stage 1 of a 2-stage node (and a Memory()
    round trip: the transport alone)."""
    H = model.config.hidden_size
    out = []
    empty = [(lambda t0: (backend.call(0, 1, Memory()), time.perf_counter() - t0)[1])(time.perf_counter())
             for _ in range(repeats)]
    out.append({"command": "Memory", "B": 0, "T": 0, "bytes": 0,
                "rtt_ms_p50": 1e3 * statistics.median(empty), "compute_ms_p50": 0.0})
    for B, T in SHAPES:
        hidden = torch.randn(B, T, H, generator=torch.Generator().manual_seed(B * T))   # [B,T,H]
        cmd = Forward(0, False, tuple(range(B)), (T,) * B, hidden=hidden)
        backend.call(0, 1, cmd)   # warm-up
        rtt, compute = [], []
        for _ in range(repeats):
            t0 = time.perf_counter()
            res = backend.call(0, 1, cmd)
            rtt.append(time.perf_counter() - t0)
            compute.append(res.compute_s)
        out.append({"command": "Forward", "B": B, "T": T, "bytes": hidden.nbytes,
                    "rtt_ms_p50": 1e3 * statistics.median(rtt), "compute_ms_p50": 1e3 * statistics.median(compute)})
    for row in out:
        row["transport_ms_p50"] = row["rtt_ms_p50"] - row["compute_ms_p50"]
    return out


def run_once(cfg, backend, profile, tasks, policy: str = "lemix") -> tuple[dict, float, dict]:
    """One engine run; (summary, backend start-up seconds, placement description)."""
    hf_model, tok, _ = load_model(cfg.model.name, seed=cfg.seed)
    texts = TaskTexts(tok, text_source(cfg), seed=cfg.seed)
    t0 = time.perf_counter()
    engine = Engine(cfg.sched_params(policy), profile, hf_model, tok, texts, backend,
                    devices=stage_devices(cfg), lr=cfg.model.lr,
                    memory_budget_bytes=int(cfg.cluster.device_memory_gb * 1e9))
    startup = time.perf_counter() - t0
    t1 = time.perf_counter()
    result = engine.run(tasks)
    result.wall_s = time.perf_counter() - t1
    s = summarize(result)
    return {k: s.get(k) for k in KEYS}, startup, backend.describe()


def _fmt(rows: list[dict]) -> str:
    cols = list(rows[0])
    lines = ["  ".join(f"{c:>16}" for c in cols)]
    for r in rows:
        lines.append("  ".join(f"{v:>16.4g}" if isinstance(v, float) else f"{str(v):>16}" for v in r.values()))
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--profile", help="profile JSON (default: measured once, saved to --out)")
    ap.add_argument("--out", default="runs/bench_ray")
    ap.add_argument("--repeats", type=int, default=50)
    ap.add_argument("--duration", type=float, default=10.0, help="seconds of arrivals of the runs")
    ap.add_argument("--skip-run", action="store_true")
    ap.add_argument("--skip-four", action="store_true")
    args = ap.parse_args()
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)

    import ray

    from lemix.engine.ray_backend import RayBackend

    t0 = time.perf_counter()
    ray.init(num_cpus=2, num_gpus=4, include_dashboard=False, object_store_memory=300 * 1024 * 1024,
             log_to_driver=False)
    report: dict = {"ray_init_s": time.perf_counter() - t0, "ray_version": ray.__version__}
    print(f"ray {ray.__version__} started in {report['ray_init_s']:.1f} s")
    model, _, _ = load_model("builtin-tiny", seed=0)

    # 1. per-hop latency ------------------------------------------------------------------------
    hops = {}
    for name, backend in (("local", LocalBackend()), ("ray", RayBackend())):
        start_s = _start(backend, model, nodes=1, stages=2)
        try:
            hops[name] = {"start_s": start_s, "rows": hop_latency(model, backend, args.repeats)}
        finally:
            backend.shutdown()
        print(f"\n[{name}] 1 node x 2 stages started in {start_s:.2f} s; Forward to stage 1, H={model.config.hidden_size}")
        print(_fmt(hops[name]["rows"]))
    report["hop_latency"] = hops

    # 2. the same run on both backends ----------------------------------------------------------
    cfg = load_config(None, {"cluster.nodes": 2, "cluster.stages": 1, "workload.duration_s": args.duration,
                             "workload.request_rate": 2.0, "workload.max_prompt_tokens": 64,
                             "workload.train_seq_tokens": 64, "workload.max_output_tokens": 8,
                             "workload.mode": "generate", "policy.names": "lemix"}, dict(RUN_DEFAULTS))
    if args.profile:
        profile = load_profile(args.profile, stages=1)
    else:
        t1 = time.perf_counter()
        profile = engine_profile(cfg, model)
        save_profile(profile, out_dir / "profile_1stage.json")
        print(f"\nmeasured a 1-stage profile in {time.perf_counter() - t1:.0f} s -> {out_dir}/profile_1stage.json")
    if not args.skip_run:
        tasks = engine_tasks(cfg)
        runs = {}
        for name, make in (("local", LocalBackend), ("ray", RayBackend)):
            summary, startup, placement = run_once(cfg, make(), profile, tasks)
            runs[name] = {"startup_s": startup, "summary": summary, "placement": placement}
            print(f"\n[{name}] 2 nodes x 1 stage, {len(tasks)} tasks over {args.duration:g} s: start-up {startup:.1f} s")
            print(json.dumps(summary, indent=None))
        report["run"] = runs

    # 3. four nodes, logical GPUs ---------------------------------------------------------------
    if not args.skip_four:
        cfg4 = cfg.model_copy(deep=True)
        cfg4.cluster.nodes = 4
        tasks4 = engine_tasks(cfg4)
        summary, startup, placement = run_once(cfg4, RayBackend(num_gpus_per_stage=1), profile, tasks4)
        report["four_nodes"] = {"startup_s": startup, "summary": summary, "placement": placement}
        print(f"\n[ray, 4 logical GPUs] 4 nodes x 1 stage, {len(tasks4)} tasks: start-up {startup:.1f} s")
        for p in placement["nodes"]:
            print(f"  node {p['node']}: {p['strategy']} placement group {p['placement_group_id'][:12]}..., "
                  f"bundles {p['bundles']}")
        print(json.dumps(summary, indent=None))

    (out_dir / "bench_ray.json").write_text(json.dumps(report, indent=2))
    print(f"\nwrote {out_dir}/bench_ray.json")
    ray.shutdown()


if __name__ == "__main__":
    main()
