"""The `lemix` command: a thin shell over the library (lemix.experiment, lemix.engine, ...).

Every flag maps to one config field (`--rate` -> workload.rate); flags override `--config FILE`.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any, Callable

from lemix import __version__
from lemix.config import RUN_DEFAULTS, ConfigError, LemixConfig, load_config

# (flag, dotted config field, type, extra help). Help text comes from the schema's descriptions.
_COMMON = [
    ("--nodes", "cluster.nodes", int, ""),
    ("--stages", "cluster.stages", int, ""),
    ("--device-memory", "cluster.device_memory_gb", float, ""),
    ("--policy", "policy.names", str, "one name, a comma list, 'all' or 'ablations'"),
    ("--arrival", "workload.arrival", str, "poisson | gamma | trace"),
    ("--rate", "workload.rate", float, ""),
    ("--burstiness", "workload.burstiness", float, ""),
    ("--duration", "workload.duration_s", float, "seconds of arrivals"),
    ("--trace", "workload.trace", str, "Azure-format CSV: TIMESTAMP,ContextTokens,GeneratedTokens"),
    ("--trace-speedup", "workload.trace_speedup", float, "divide trace times by this"),
    ("--train-share", "workload.train_share", float, ""),
    ("--train-rate", "workload.train_rate", float, ""),
    ("--train-batch-size", "workload.train_batch_size", int, ""),
    ("--train-seq-tokens", "workload.train_seq_tokens", int, ""),
    ("--max-prompt-tokens", "workload.max_prompt_tokens", int, ""),
    ("--max-output-tokens", "workload.max_output_tokens", int, ""),
    ("--mode", "workload.mode", str, "prefill (one forward per request) | generate (prefill + decode)"),
    ("--priority-share", "workload.priority_share", float, "fraction of requests with priority 1"),
    ("--lambda1", "policy.lambda1", float, ""),
    ("--lambda2", "policy.lambda2", float, ""),
    ("--tau", "policy.tau", float, ""),
    ("--tau-r", "policy.tau_r", float, ""),
    ("--t-max", "policy.t_max_s", float, ""),
    ("--kappa", "policy.kappa", float, ""),
    ("--min-train-share", "policy.min_train_share", float, ""),
    ("--max-batch", "policy.max_batch", int, ""),
    ("--max-wait", "policy.max_wait_s", float, ""),
    ("--pipeline", "policy.pipeline", str, "apipe | gpipe | 1f1b"),
    ("--microbatches", "policy.microbatches", int, ""),
    ("--sync-every", "policy.sync_every", int, ""),
    ("--average-every", "policy.average_every", int, ""),
    ("--slo-scale", "slo.scale", float, ""),
    ("--slo-ttft", "slo.ttft_s", float, ""),
    ("--slo-e2e", "slo.e2e_s", float, ""),
    ("--profile", "model.profile", str, ""),
    ("--seed", "seed", int, ""),
]
_FLAGS = [
    ("--no-profile", "policy.no_profile", "start from a generic latency model and calibrate online"),
    ("--no-prioritization", "policy.no_prioritization", "lemix without SLO-aware deprioritization"),
    ("--no-memory-check", "policy.no_memory_check", "lemix without the wait-or-offload memory gate"),
    ("--force-profile", "model.force_profile", "accept a profile made for another model/stages/device"),
]
_SIM = [("--sim-model", "model.sim_model", str, "modeled model of the built-in profile: tiny | 3b | 7b")]
_ENGINE = [
    ("--model", "model.name", str, ""),
    ("--device", "cluster.device", str, ""),
    ("--backend", "cluster.backend", str, "local | ray"),
    ("--ray-address", "cluster.ray_address", str, "default: start a local Ray; 'auto' joins a cluster"),
    ("--dataset", "workload.dataset", str, ""),
    ("--lr", "model.lr", float, ""),
]


def _describe(dotted: str) -> str:
    model: Any = LemixConfig
    field = None
    for part in dotted.split("."):
        field = model.model_fields[part]
        model = field.annotation if isinstance(field.annotation, type) else model
    return (field.description or "") if field else ""


def _add_options(p: argparse.ArgumentParser, table, flags=()) -> None:
    for flag, dotted, typ, extra in table:
        desc = "; ".join(x for x in (_describe(dotted), extra) if x)
        p.add_argument(flag, dest=dotted, type=typ, default=None, metavar=typ.__name__.upper(),
                       help=f"{desc} [{dotted}]" if desc else f"[{dotted}]")
    for flag, dotted, desc in flags:
        p.add_argument(flag, dest=dotted, action="store_const", const=True, default=None,
                       help=f"{desc} [{dotted}]")
    p.add_argument("--config", help="YAML file with any of the sections cluster, model, workload, "
                   "policy, slo; flags override it")
    p.add_argument("--out", help="run directory (default: runs/<command>-<time>)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def _config(args: argparse.Namespace, base: dict | None = None) -> LemixConfig:
    overrides = {k: v for k, v in vars(args).items() if "." in k or k == "seed"}
    return load_config(args.config, overrides, base)


def _run_dir(args: argparse.Namespace, command: str) -> Path:
    return Path(args.out or f"runs/{command}-{time.strftime('%Y%m%d-%H%M%S')}")


def _progress(enabled: bool) -> Callable[[str, int], Callable[[int], None]] | None:
    if not enabled:
        return None
    from tqdm import tqdm

    def make(name: str, total: int) -> Callable[[int], None]:
        bar = tqdm(total=total, desc=f"{name:>22}", unit="task", leave=True, dynamic_ncols=True,
                   disable=None, mininterval=0.5)

        def tick(n: int) -> None:
            bar.update(n)
            if bar.n >= total:
                bar.close()
        return tick
    return make


def cmd_simulate(args: argparse.Namespace) -> int:
    from lemix.experiment import simulate, write_results
    from lemix.metrics import format_table, summarize

    cfg = _config(args)
    run_dir = _run_dir(args, "simulate")
    c, w = cfg.cluster, cfg.workload
    print(f"lemix simulate: {c.nodes} nodes x {c.stages} stages, {w.arrival} arrivals"
          f"{'' if w.arrival == 'trace' else f' at {w.rate}/s'} for {w.duration_s:g} s, "
          f"policies: {', '.join(cfg.policy.names)}")
    results = simulate(cfg, progress=_progress(not args.no_progress))
    write_results(cfg, results, run_dir, "lemix simulate")
    print(format_table({r.policy: summarize(r) for r in results}))
    print(f"results in {run_dir}/ (summary.json, requests.csv, timeline.json, *.png)")
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    from lemix.engine.api import run_engine
    from lemix.experiment import write_results
    from lemix.metrics import format_table, summarize

    cfg = _config(args, RUN_DEFAULTS)
    run_dir = _run_dir(args, "run")
    c, w = cfg.cluster, cfg.workload
    print(f"lemix run: model {cfg.model.name}, {c.nodes} nodes x {c.stages} stages on {c.device} "
          f"({c.backend} backend), {w.arrival} arrivals for {w.duration_s:g} s, "
          f"policies: {', '.join(cfg.policy.names)}")
    results = run_engine(cfg, progress=_progress(not args.no_progress))
    write_results(cfg, results, run_dir, "lemix run")
    print(format_table({r.policy: summarize(r) for r in results}))
    print(f"results in {run_dir}/ (summary.json, requests.csv, timeline.json, *.png)")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lemix",
        description="LeMix: serve an LLM and keep fine-tuning it on the same GPUs, scheduled jointly. "
                    "`simulate` plans on a modeled cluster; `run` executes real model stages.",
    )
    parser.add_argument("--version", action="version", version=f"lemix {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    p = sub.add_parser("simulate", help="simulate policies on a modeled multi-GPU cluster",
                       description="Discrete-event simulation of every chosen policy on the same "
                                   "workload; writes summary.json, requests.csv, train_steps.csv, "
                                   "timeline.json (Perfetto) and plots to the run directory.")
    _add_options(p, _COMMON + _SIM, _FLAGS)
    p.set_defaults(func=cmd_simulate)
    shown = ", ".join(f"{k.split('.')[-1]}={v if not isinstance(v, list) else ','.join(v)}"
                      for k, v in RUN_DEFAULTS.items())
    p = sub.add_parser("run", help="run policies on real model stages (serving + training)",
                       description="Run every chosen policy on real model stages (the built-in tiny "
                                   "model or a local Hugging Face checkpoint) on the same workload from "
                                   "the same initial weights; same outputs as `simulate` plus "
                                   f"inference loss. Defaults differ from simulate: {shown}.")
    _add_options(p, _COMMON + _ENGINE, _FLAGS)
    p.set_defaults(func=cmd_run)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except ValueError as e:
        # our own error types (ConfigError, TraceError, DatasetError, CheckpointError, ProfileError)
        # carry a message for the user; anything else is a bug and keeps its traceback
        if not type(e).__module__.startswith("lemix."):
            raise
        print(f"lemix: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("lemix: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
