"""Check that a change to the scheduler or simulator leaves every simulated result identical.

    python benchmarks/check_identical.py --write base.json [--big]   # on the code before a change
    python benchmarks/check_identical.py --check base.json [--big]   # after it: exit 1 on a difference

Scenarios: the default table (every policy, 4 x 2 nodes, 16 tasks/s, half training, 120 s, seeds
0-2), generate mode, a training backlog, the Azure code trace (when `../shared/traces/` is there)
and, with `--big`, the 100,000-task 64 x 4 run of bench_simulator.py (lemix and luf). Per run it
keeps the summary without its wall-time fields and a SHA-256 digest of every record (requests,
training tasks and steps, ops, events), so a difference in any op's timing shows, not only in
the aggregates. Needs no GPU; the big run takes minutes.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
from pathlib import Path

from lemix.config import load_config
from lemix.experiment import build_tasks, sim_horizon_s, sim_profile
from lemix.metrics import summarize
from lemix.sim import simulate_policy

WALL_FIELDS = ("wall_s", "sched_decision_us_p50", "sched_decision_us_p99")
TRACE = Path(__file__).resolve().parents[1] / ".." / "shared" / "traces" / "azure_llm_code_2023.csv"
DEFAULT = {"cluster.nodes": 4, "cluster.stages": 2, "workload.rate": 16, "workload.train_share": 0.5,
           "workload.duration_s": 120}


def scenarios(big: bool, trace: Path = TRACE) -> list[tuple[str, dict, bool]]:
    """(name, config overrides, whether the run has a finite horizon as `lemix simulate`)."""
    out = [(f"default/seed{s}", {**DEFAULT, "policy.names": "all", "seed": s}, True) for s in (0, 1, 2)]
    out.append(("generate", {**DEFAULT, "workload.duration_s": 60, "workload.mode": "generate",
                             "policy.names": "all"}, True))
    out.append(("backlog", {**DEFAULT, "workload.duration_s": 60, "workload.rate": 23,
                            "workload.train_backlog": True, "policy.names": "lemix,separate,naivemix"}, True))
    if trace.exists():
        no_rate = {k: v for k, v in DEFAULT.items() if k != "workload.rate"}   # arrivals from the trace
        out.append(("trace", {**no_rate, "workload.trace": str(trace), "workload.trace_speedup": 2.5,
                              "workload.duration_s": 300, "policy.names": "lemix,separate,luf"}, True))
    if big:   # bench_simulator.py's run (it has no horizon)
        out.append(("64x4", {"cluster.nodes": 64, "cluster.stages": 4, "workload.rate": 256.0,
                             "workload.duration_s": 100_000 / 256.0, "seed": 0,
                             "policy.names": "lemix,luf"}, False))
    return out


def digest(result) -> str:
    h = hashlib.sha256()
    for rows in (result.requests, result.train_tasks, result.train_steps, result.ops, result.events):
        for r in rows:
            h.update(repr(r).encode())
        h.update(b"|")
    return h.hexdigest()


def run_all(big: bool, only: str | None = None, write: str | None = None, trace: Path = TRACE) -> dict:
    out = {}
    for name, sets, horizon in scenarios(big, trace):
        if only and not name.startswith(only):
            continue
        cfg = load_config(None, sets)
        tasks, profile = build_tasks(cfg), sim_profile(cfg)
        for policy in cfg.policy.names:
            c0 = time.process_time()
            result, _ = simulate_policy(cfg.sched_params(policy), profile, tasks,
                                        horizon_s=sim_horizon_s(cfg) if horizon else float("inf"))
            s = summarize(result)
            for k in WALL_FIELDS:
                s.pop(k, None)
            out[f"{name}/{policy}"] = {"summary": s, "digest": digest(result)}
            if write:   # as it goes: a long run leaves what it has
                Path(write).write_text(json.dumps(out, indent=1, sort_keys=True))
            print(f"{name}/{policy}: {len(tasks)} tasks, SLO {s['slo_attainment']}, "
                  f"cpu {time.process_time() - c0:.1f} s", flush=True)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    g = ap.add_mutually_exclusive_group(required=True)
    g.add_argument("--write", metavar="FILE")
    g.add_argument("--check", metavar="FILE")
    ap.add_argument("--big", action="store_true", help="also the 100,000-task 64 x 4 run (minutes)")
    ap.add_argument("--only", metavar="PREFIX", help="only the scenarios whose name starts so (e.g. default)")
    ap.add_argument("--trace", type=Path, default=TRACE, help="the Azure code trace (skipped if missing)")
    args = ap.parse_args()
    got = run_all(args.big, args.only, args.write, args.trace)
    if args.write:
        print(f"wrote {len(got)} runs to {args.write}")
        return 0
    want = json.loads(Path(args.check).read_text())
    bad = 0
    for key, run in got.items():
        if key not in want:
            print(f"{key}: not in {args.check}")
            continue
        ref = want[key]
        diffs = [k for k in set(ref["summary"]) | set(run["summary"])   # (json: NaN equals NaN)
                 if json.dumps(ref["summary"].get(k)) != json.dumps(run["summary"].get(k))]
        if diffs or ref["digest"] != run["digest"]:
            bad += 1
            print(f"{key}: DIFFERS in {sorted(diffs) or 'records only'}")
    print(f"{len(got) - bad} of {len(got)} runs identical")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
