"""Served inference loss of co-located (lemix, naivemix) vs separate serving/training, on the real
model with the modeled cluster's clock, under a drifting workload.

    python benchmarks/bench_learning.py [--seeds 0,1,2] [--lrs 3e-4,3e-3] [--ks 4,8,32,128]
                                        [--out runs/bench-learning] [--quick]

Every run is `lemix run --clock virtual` on the modeled 4 nodes x 2 stages cluster (the paper's
setting; op durations from the built-in modeled GPU profile of --sim-model), the real compute is
the built-in tiny model: the text of requests and training samples drifts through the built-in
corpus's topic groups (shifts marked in the plot). Policies: lemix and naivemix (co-located,
merged every 4 steps, run's default) and separate with sync interval K in --ks; each on the same
tasks, seeds and learning rates. Prints per learning rate and policy the mean +- std over seeds
of served inference loss, its ratio to separate at K=8 (per seed, then averaged), adaptation
lag after a shift (until the served loss is back within 5% of its level before the shift),
staleness (steps, seconds), training steps and SLO attainment; writes table.json and
served_loss_lr*.png (served loss over time per policy, seed 0, shifts dotted) to --out.
Deterministic: the same command prints the same table on any machine under any load.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from lemix.config import RUN_DEFAULTS, load_config
from lemix.api import run_engine
from lemix.metrics import summarize
from lemix.metrics.adaptation import served_loss_curve

FIELDS = (("inference_loss_mean", "served loss", "{:.3f}"), ("ratio_vs_separate_k8", "/ sep K=8", "{:.3f}"),
          ("adaptation_lag_s_mean", "lag s", "{:.2f}"), ("adaptation_unrecovered", "unrec.", "{:.1f}"),
          ("staleness_steps_mean", "stale steps", "{:.2f}"), ("staleness_s_mean", "stale s", "{:.2f}"),
          ("train_steps", "steps", "{:.0f}"), ("slo_attainment", "SLO", "{:.3f}"))


def scenario(args, seed: int, lr: float, policy: str, k: int) -> dict:
    """The dotted overrides of one run (what `lemix run --clock virtual ...` flags would set)."""
    return {"cluster.nodes": 4, "cluster.stages": 2, "cluster.clock": "virtual",
            "model.sim_model": args.sim_model, "model.lr": lr,
            "workload.request_rate": args.request_rate, "workload.duration_s": args.duration,
            "workload.drift_groups": args.groups, "workload.train_seq_tokens": args.tokens,
            "workload.max_prompt_tokens": args.tokens, "policy.names": policy,
            "policy.sync_every": k, "seed": seed}


def variants(ks: list[int]) -> list[tuple[str, str, int]]:
    """(label, policy, K); K matters only to separate."""
    return [("lemix", "lemix", 8), ("naivemix", "naivemix", 8)] + [(f"separate K={k}", "separate", k) for k in ks]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--lrs", default="3e-4,3e-3")
    ap.add_argument("--ks", default="4,8,32,128")
    ap.add_argument("--request-rate", type=float, default=6.0,
                    help="requests per second (plus as many training tasks)")
    ap.add_argument("--duration", type=float, default=24.0, help="seconds of modeled arrivals")
    ap.add_argument("--groups", type=int, default=3, help="topic groups (shifts = groups - 1)")
    ap.add_argument("--tokens", type=int, default=32, help="training sample and max prompt length")
    ap.add_argument("--sim-model", default="3b", help="modeled GPU profile: tiny | 3b | 7b")
    ap.add_argument("--drift", choices=("topics", "strong"), default="topics",
                    help="topics: the built-in corpus's topic groups; strong: a dataset with segments "
                         "made from the corpus (as is, UPPER CASE, each line reversed): a shift no "
                         "byte statistic survives")
    ap.add_argument("--out", default="runs/bench-learning")
    ap.add_argument("--quick", action="store_true", help="one seed, one learning rate, K in 8,128")
    args = ap.parse_args()
    if args.quick:
        args.seeds, args.lrs, args.ks = "0", args.lrs.split(",")[-1], "8,128"
    seeds = [int(x) for x in args.seeds.split(",")]
    lrs = [float(x) for x in args.lrs.split(",")]
    ks = [int(x) for x in args.ks.split(",")]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    dataset = strong_drift_dataset(out / "strong_drift.jsonl") if args.drift == "strong" else None
    runs: dict[tuple[float, str], list[dict]] = {}
    curves: dict[float, dict[str, tuple]] = {}
    shifts: list[float] = []
    t0 = time.perf_counter()
    for lr in lrs:
        for seed in seeds:
            for label, policy, k in variants(ks):
                cfg = load_config(None, {**scenario(args, seed, lr, policy, k), "workload.dataset": dataset},
                                  RUN_DEFAULTS)
                (result,) = run_engine(cfg)
                s = summarize(result)
                s["seed"] = seed
                runs.setdefault((lr, label), []).append(s)
                shifts = s.get("drift_shifts_s") or []
                if seed == seeds[0]:
                    curves.setdefault(lr, {})[label] = served_loss_curve(result.requests)
                print(f"lr {lr:g} seed {seed} {label:<16} served loss {s['inference_loss_mean']:.4f} "
                      f"({result.wall_s:.0f} s wall, {time.perf_counter() - t0:.0f} s so far)", flush=True)
    for lr in lrs:   # ratio to separate K=8 of the same seed, then averaged over seeds
        ref = {r["seed"]: r["inference_loss_mean"] for r in runs.get((lr, "separate K=8"), [])}
        for (lr2, _), rs in runs.items():
            if lr2 == lr:
                for r in rs:
                    r["ratio_vs_separate_k8"] = (r["inference_loss_mean"] / ref[r["seed"]]
                                                 if r["seed"] in ref else None)

    header = (f"modeled {args.sim_model} on 4 nodes x 2 stages, virtual clock, builtin-tiny model; "
              f"{args.request_rate:g} requests/s + as many training tasks for {args.duration:g} s, "
              f"{'3 dataset segments' if dataset else f'{args.groups} topic groups'} (shifts at "
              f"{', '.join(f'{x:g}' for x in shifts)} s), {args.tokens} tokens; seeds {args.seeds}; "
              f"mean +- std over seeds")
    lines = [header, f"{'lr':>7} {'policy':<16}" + "".join(f"{title:>17}" for _, title, _ in FIELDS)]
    table = []
    for (lr, label), rs in runs.items():
        row = {"lr": lr, "policy": label}
        cells = []
        for key, _, fmt in FIELDS:
            vals = np.array([r[key] for r in rs if r.get(key) is not None], dtype=float)
            row[key] = [r.get(key) for r in rs]
            cells.append(f"{fmt.format(vals.mean())} +- {fmt.format(vals.std())}" if len(vals) else "-")
        table.append(row)
        lines.append(f"{lr:>7g} {label:<16}" + "".join(f"{c:>17}" for c in cells))
    text = "\n".join(lines)
    print(text)
    (out / "table.txt").write_text(text + "\n")
    (out / "table.json").write_text(json.dumps({"header": header, "rows": table, "runs": {
        f"{lr:g} {label}": rs for (lr, label), rs in runs.items()}}, indent=1) + "\n")
    for lr, per in curves.items():
        plot(per, shifts, out / f"served_loss_lr{lr:g}.png", f"served loss, lr {lr:g}, seed {seeds[0]}")
    print(f"written to {out}/ (table.txt, table.json, served_loss_lr*.png)")


def strong_drift_dataset(path: Path) -> str:
    """JSONL with segments 'plain', 'upper', 'reversed': paragraphs of the built-in corpus, as
    is, in upper case, and with every line reversed (generated here, never committed)."""
    from lemix.workload import builtin_corpus

    paras = [p.strip() for t in builtin_corpus() for p in t.text.split("\n\n") if len(p.strip()) >= 200]
    forms = {"plain": lambda x: x, "upper": str.upper,
             "reversed": lambda x: "\n".join(line[::-1] for line in x.splitlines())}
    with path.open("w") as f:
        for label, form in forms.items():
            for i, p in enumerate(paras[:400]):
                if i % 3 == list(forms).index(label):   # disjoint paragraphs per segment
                    f.write(json.dumps({"text": form(p), "segment": label}) + "\n")
    return str(path)


def plot(per_policy: dict[str, tuple], shifts: list[float], path: Path, title: str) -> None:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(8.0, 4.5), dpi=110)
    ax = fig.subplots()
    for label, (t, loss) in per_policy.items():
        ax.plot(t, loss, label=label, linewidth=1.2)
    for i, s in enumerate(shifts):
        ax.axvline(s, color="grey", linestyle=":", label="drift shift" if i == 0 else None)
    ax.set_xlabel("request arrival (modeled s)")
    ax.set_ylabel("served inference loss (nats/token, mean of 20 requests)")
    ax.set_title(title)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)


if __name__ == "__main__":
    main()
