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
    ("--train-chunk-ms", "policy.train_chunk_ms", float, "lemix: longest predicted training chunk (ms); "
                                                          "default chunk_frac x the tightest SLO"),
    ("--train-queue-depth", "policy.train_queue_depth", int, "lemix late binding: training tasks queued per node"),
    ("--chunk-frac", "policy.chunk_frac", float, "lemix: a chunk's predicted time under this x the tightest SLO"),
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
    ("--no-chunking", "policy.no_chunking", "lemix without bounded blocking (one training op per stage)"),
    ("--train-backlog", "workload.train_backlog", "training data always waiting (simulator): a training task "
                                                  "is drawn whenever a policy would place one"),
    ("--no-lookahead-slack", "policy.no_lookahead_slack", "lemix: the lookahead never lets a training chunk "
                                                          "delay inference on its way"),
    ("--eq4-inference-only", "policy.eq4_inference_only", "lemix: Eq. 4 forecasts queued inference only, "
                                                          "not the training ahead of it"),
    ("--no-late-binding", "policy.no_late_binding", "lemix places training at arrival, not when a node has room"),
    ("--force-profile", "model.force_profile", "accept a profile made for another model/stages/device"),
]
_ENGINE_FLAGS = [
    ("--byte-tokenizer", "model.byte_tokenizer", "byte-level tokenizer for a checkpoint without tokenizer files"),
    ("--recompute", "model.recompute", "gradient checkpointing per stage"),
]
_SIM = [("--sim-model", "model.sim_model", str, "modeled model of the built-in profile: tiny | 3b | 7b"),
        ("--sim-preset", "model.sim_preset", str, "e.g. 7b-bf16-lora16-80gb (lemix.sched.presets)")]
_ENGINE = [
    ("--model", "model.name", str, ""),
    ("--device", "cluster.device", str, ""),
    ("--backend", "cluster.backend", str, "local | ray"),
    ("--ray-address", "cluster.ray_address", str, "default: start a local Ray; 'auto' joins a cluster"),
    ("--dataset", "workload.dataset", str, ""),
    ("--tokenizer", "model.tokenizer", str, ""),
    ("--lr", "model.lr", float, ""),
    ("--dtype", "model.dtype", str, "auto | float32 | bfloat16 | float16"),
    ("--lora-rank", "model.lora_rank", int, ""),
    ("--lora-alpha", "model.lora_alpha", float, ""),
    ("--lora-targets", "model.lora_targets", str, "e.g. q_proj,v_proj"),
]
_RUN = [("--clock", "cluster.clock", str, "wall | virtual")]
_RUN_FLAGS = [("--ignore-eos", "workload.ignore_eos", "")]


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
        desc = desc or _describe(dotted)
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


def _compare(args: argparse.Namespace, command: str, cfg: LemixConfig, header: str, execute) -> int:
    """Run every chosen policy (simulated or real), write the run directory, print the table."""
    from lemix.experiment import write_results
    from lemix.metrics import format_table, summarize

    run_dir = _run_dir(args, command)
    print(f"lemix {command}: {header}, policies: {', '.join(cfg.policy.names)}")
    results = execute(cfg, progress=_progress(not args.no_progress))
    write_results(cfg, results, run_dir, f"lemix {command}")
    print(format_table({r.policy: summarize(r) for r in results}))
    print(f"results in {run_dir}/ (summary.json, requests.csv, timeline.json, *.png)")
    return 0


def cmd_simulate(args: argparse.Namespace) -> int:
    from lemix.experiment import simulate

    cfg = _config(args)
    c, w = cfg.cluster, cfg.workload
    rate = "" if w.arrival == "trace" else f" at {w.rate}/s"
    return _compare(args, "simulate", cfg, f"{c.nodes} nodes x {c.stages} stages, {w.arrival} arrivals"
                    f"{rate} for {w.duration_s:g} s", simulate)


def cmd_run(args: argparse.Namespace) -> int:
    from lemix.api import run_engine

    cfg = _config(args, RUN_DEFAULTS)
    c, w = cfg.cluster, cfg.workload
    modeled = f"profile {cfg.model.profile}" if cfg.model.profile else f"modeled {cfg.model.sim_model}"
    clock = f"virtual clock: {modeled} cluster" if c.clock == "virtual" else "wall clock"
    return _compare(args, "run", cfg, f"model {cfg.model.name}, {c.nodes} nodes x {c.stages} stages on "
                    f"{c.device} ({c.backend} backend, {clock}), {w.arrival} arrivals for {w.duration_s:g} s",
                    run_engine)


def cmd_profile(args: argparse.Namespace) -> int:
    from lemix.api import set_threads_per_worker, stage_devices
    from lemix.engine.model import load_model, split_stages
    from lemix.engine.worker import StageWorker
    from lemix.profiling import measure_profile, plot_profile, save_profile
    from lemix.profiling.measure import grid_size
    from lemix.engine.adapt import spec_from_config

    cfg = _config(args, RUN_DEFAULTS)
    S = cfg.cluster.stages
    hf_model, _, _ = load_model(cfg.model.name, seed=cfg.seed, tokenizer=cfg.model.tokenizer,
                                byte_tokenizer=cfg.model.byte_tokenizer, adapt=spec_from_config(cfg.model))
    devices = stage_devices(cfg)
    set_threads_per_worker(S)
    workers = [StageWorker(m, s, S, devices[s], lr=cfg.model.lr) for s, m in enumerate(split_stages(hf_model, S))]
    print(f"lemix profile: {cfg.model.name}, {S} stages on {cfg.cluster.device}"
          f"{' (quick)' if args.quick else ''}")
    tick = None
    bar = None
    if not args.no_progress:
        from tqdm import tqdm

        bar = tqdm(total=grid_size(quick=args.quick, num_stages=S), desc="profiling", unit="point",
                   disable=None, mininterval=0.5)
        tick = bar.update
    profile, samples = measure_profile(workers, model_name=cfg.model.name, device=cfg.cluster.device,
                                       quick=args.quick, capacity_bytes=int(cfg.cluster.device_memory_gb * 1e9),
                                       progress=tick, seed=cfg.seed)
    if bar is not None:
        bar.close()
    out = Path(args.out or "profile.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    save_profile(profile, out, samples)
    plot = plot_profile(profile, samples, out.with_suffix(".png"))
    for key, err in sorted(profile.fit_error.items()):
        print(f"  {key:<18} fit MAPE {100 * err:5.1f}%")
    print(f"profile written to {out} (plot: {plot})")
    return 0


def cmd_validate(args: argparse.Namespace) -> int:
    from lemix.api import engine_tasks, run_engine
    from lemix.profiling import load_profile
    from lemix.sim import simulate_policy
    from lemix.validate import compare, plot_validation, write_validation

    cfg = _config(args, {**RUN_DEFAULTS, "policy.names": ["lemix"]})
    if not cfg.model.profile:
        raise ConfigError("lemix validate needs --profile FILE (make one with `lemix profile`)")
    profile = load_profile(cfg.model.profile, stages=cfg.cluster.stages, force=cfg.model.force_profile,
                           capacity_bytes=int(cfg.cluster.device_memory_gb * 1e9), model=cfg.model.name,
                           device=cfg.cluster.device)
    policy = cfg.policy.names[0]
    cfg.policy.names = [policy]
    tasks = engine_tasks(cfg)
    print(f"lemix validate: {len(tasks)} tasks, policy {policy}: real engine, then simulator")
    (real,) = run_engine(cfg, profile=profile, tasks=tasks, progress=_progress(not args.no_progress))
    sim, _ = simulate_policy(cfg.sched_params(policy), profile, tasks, noise=0.0)
    report = compare(real, sim, profile)
    for name in ("op", "e2e", "ttft"):
        r = report[name]
        if r["mape"] is not None:
            print(f"  {name:<5} MAPE {100 * r['mape']:5.1f}%   |err| p50 {1e3 * r['abs_err_p50_s']:7.2f} ms"
                  f"   p90 {1e3 * r['abs_err_p90_s']:7.2f} ms   (n={r['n']})")
    for kind, r in report["op_by_kind"].items():
        print(f"    {kind:<7} MAPE {100 * r['mape']:5.1f}%  (n={r['n']})")
    if args.out:
        out = Path(args.out)
        write_validation(report, out)
        plot_validation(real, sim, profile, out / "validation.png")
        print(f"report in {out}/ (validation.json, validation.png)")
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from lemix.serve import SERVE_DEFAULTS, run_server
    from lemix.serve.options import options_from_args

    cfg = _config(args, SERVE_DEFAULTS)
    opts = options_from_args(args)
    c = cfg.cluster
    print(f"lemix serve: model {cfg.model.name}, {c.nodes} nodes x {c.stages} stages on {c.device}, "
          f"policy {', '.join(cfg.policy.names)}, http://{opts.host}:{opts.port}/v1, "
          f"state in {opts.state_dir}{' (resuming)' if opts.resume else ''}", flush=True)
    run_server(cfg, opts)   # every failure to start or to shut down cleanly is a ServeError
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from lemix.export import export_state_dir, latest_checkpoint

    ckpt = latest_checkpoint(args.state_dir, args.node)
    print(f"lemix export: {ckpt} -> {args.out} ({'PEFT adapter + base reference' if args.adapter else 'full weights'})")
    out = export_state_dir(args.state_dir, args.out, node=args.node, adapter=args.adapter)
    print(f"written {out}/ (load it with transformers.AutoModelForCausalLM.from_pretrained"
          f"{' + peft.PeftModel.from_pretrained' if args.adapter else ''})")
    return 0


# `lemix sweep` grid axes: (flag, lemix.sweep axis, help); each sets the field in brackets per point.
_GRID = [
    ("--rates", "rates", "total task arrival rates (tasks/s) [workload.rate]"),
    ("--train-shares", "train_shares", "training shares of the tasks [workload.train_share]"),
    ("--nodes-grid", "nodes", "node counts [cluster.nodes]"),
    ("--stages-grid", "stages", "pipeline stages per node [cluster.stages]"),
    ("--arrivals", "arrivals", "arrival processes: poisson, gamma, trace [workload.arrival]"),
    ("--burstiness-grid", "burstiness", "Gamma CV^2 values, gamma points only [workload.burstiness]"),
    ("--modes", "modes", "prefill, generate [workload.mode]"),
    ("--trace-speedups", "trace_speedups", "trace speedups, trace points only [workload.trace_speedup]"),
    ("--seeds", "seeds", "seeds, each a separate point [seed]"),
]


def _bar(enabled: bool, total: int, desc: str):
    """A tqdm bar over `total` runs and the callback that advances it, or (None, None)."""
    if not enabled:
        return None, None
    from tqdm import tqdm

    bar = tqdm(total=total, desc=desc, unit="run", dynamic_ncols=True, disable=None, mininterval=0.5)

    def tick(row: dict) -> None:
        bar.update(1)
        bar.set_postfix_str(f"{row['policy']}", refresh=False)
    return bar, tick


def cmd_sweep(args: argparse.Namespace) -> int:
    from lemix.metrics import sweep_report as rep
    from lemix.sweep import SweepGrid, capacity, capacity_plan, check_jobs, sweep, sweep_points

    # Phase 1: validate everything (grid, capacity search, jobs) before anything runs.
    cfg = _config(args)
    grid = SweepGrid.parse(**{axis: getattr(args, axis) for _, axis, _ in _GRID})
    points = sweep_points(cfg, grid)
    check_jobs(args.jobs)
    lo, hi = _capacity_range(args.capacity_range)
    plan = (capacity_plan(cfg, grid, target=args.target, lo=lo, hi=hi, tol=args.capacity_tol)
            if args.target is not None else [])
    run_dir = _run_dir(args, "sweep")
    total = len(points) * len(cfg.policy.names)
    print(f"lemix sweep: {len(points)} points x {len(cfg.policy.names)} policies = {total} runs "
          f"({cfg.workload.duration_s:g} s each), policies: {', '.join(cfg.policy.names)}, jobs {args.jobs}")
    bar, tick = _bar(not args.no_progress, total, "sweep")
    rows = sweep(cfg, points, jobs=args.jobs, on_row=tick)
    if bar is not None:
        bar.close()
    # Phase 2: the sweep's files first (kept if the capacity search is interrupted), then capacity.
    target = args.target if args.target is not None else 0.9   # the frontier plot's target
    rep.write_sweep_dir(run_dir, rows, config_yaml=cfg.to_yaml(), target=target,
                        grid={a: list(v) for a, v in vars(grid).items() if v},
                        title=f"lemix sweep, {cfg.workload.duration_s:g} s per run")
    print(rep.format_sweep_table(rows))
    best = rep.frontier_best(rows, target)
    print(f"best training samples/s at SLO attainment >= {100 * target:g}%: "
          + ", ".join(f"{p} {'none' if v is None else f'{v:.2f}'}" for p, v in best.items()))
    if plan:
        bar, tick = _bar(not args.no_progress, len(plan), "capacity")
        caps = capacity(cfg, grid, target=args.target, lo=lo, hi=hi, tol=args.capacity_tol,
                        jobs=args.jobs, on_done=tick)
        if bar is not None:
            bar.close()
        rep.write_capacity(run_dir, caps)
        print(rep.format_capacity_table(caps))
    print(f"results in {run_dir}/ (sweep.csv, {'capacity.csv, ' if plan else ''}config.yaml, grid.yaml, "
          f"sweep.txt, *.png)")
    return 0


def _capacity_range(text: str | None) -> tuple[float | None, float | None]:
    if text is None:
        return None, None
    try:
        lo, hi = (float(x) for x in text.split(","))
    except ValueError:
        raise ConfigError(f"--capacity-range: give LO,HI (two numbers), got {text!r}") from None
    return lo, hi


def _defaults_text(defaults: dict) -> str:
    """A command's own defaults for its --help: `nodes=2, policy=lemix,separate, ...`."""
    return ", ".join(f"{k.split('.')[-1]}={','.join(v) if isinstance(v, list) else v}"
                     for k, v in defaults.items())


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
    p = sub.add_parser("sweep", help="simulate policies over a grid of loads and configurations",
                       description="Simulates every chosen policy at every point of a grid (the product "
                                   "of the grid flags; the other flags fix the rest, as in `simulate`), "
                                   "every policy on the same tasks per point; writes sweep.csv (one row "
                                   "per point x policy), config.yaml, grid.yaml and plots (SLO attainment "
                                   "and training throughput vs load, the SLO/training frontier). With "
                                   "--target it also finds, per policy, the highest load keeping SLO "
                                   "attainment >= target, by bisection (capacity.csv).")
    _add_options(p, _COMMON + _SIM, _FLAGS)
    for flag, axis, desc in _GRID:
        p.add_argument(flag, dest=axis, default=None, metavar="LIST", help=f"comma list: {desc}")
    p.add_argument("--target", type=float, default=None, metavar="FLOAT",
                   help="SLO attainment target in (0, 1]: find each policy's capacity by bisection "
                        "(the frontier plot uses it too; default 0.9 there)")
    p.add_argument("--capacity-range", default=None, metavar="LO,HI",
                   help="bisection range of the load axis (rate, or trace speedup for traces); "
                        "default: [min/4, 2 x max] of the grid's values")
    p.add_argument("--capacity-tol", type=float, default=None, metavar="FLOAT",
                   help="stop bisecting when the range is this narrow (default: 1%% of HI)")
    p.add_argument("--jobs", type=int, default=1, metavar="N", help="worker processes (results are identical for any)")
    p.set_defaults(func=cmd_sweep)
    p = sub.add_parser("run", help="run policies on real model stages (serving + training)",
                       description="Run every chosen policy on real model stages (the built-in tiny "
                                   "model or a local Hugging Face checkpoint) on the same workload from "
                                   "the same initial weights; same outputs as `simulate` plus "
                                   f"inference loss. --clock virtual times every op on the modeled cluster "
                                   "(the tasks, profile and op durations of `lemix simulate` with the same "
                                   "flags) while computing it for real: reproducible learning outcomes. "
                                   f"Defaults differ from simulate: {_defaults_text(RUN_DEFAULTS)}.")
    _add_options(p, _COMMON + _ENGINE + _RUN + _SIM, _FLAGS + _ENGINE_FLAGS + _RUN_FLAGS)
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("profile", help="measure per-stage op latencies and memory of a model",
                       description="Runs the real stages over a grid of batch sizes and lengths (and KV "
                                   "lengths for decode), fits t = a + b*C*l + c*C*l^2 (forward, backward), "
                                   "a + b*C + c*K (decode) and the optimizer step per stage, measures "
                                   "memory per token and host copy bandwidth, and writes a versioned "
                                   "JSON profile plus a plot of measured points against the fits.")
    for flag, dotted, typ, extra in [t for t in _COMMON + _ENGINE
                                     if t[0] in ("--stages", "--device-memory", "--seed", "--model",
                                                 "--device", "--lr", "--dtype", "--lora-rank",
                                                 "--lora-alpha", "--lora-targets")]:
        p.add_argument(flag, dest=dotted, type=typ, default=None, metavar=typ.__name__.upper(),
                       help=f"{_describe(dotted)} [{dotted}]")
    for flag, dotted, desc in _ENGINE_FLAGS:
        p.add_argument(flag, dest=dotted, action="store_const", const=True, default=None,
                       help=f"{desc} [{dotted}]")
    p.add_argument("--quick", action="store_true", help="a small grid (under a minute on 2 cores)")
    p.add_argument("--config", help="YAML config file")
    p.add_argument("--out", help="profile JSON path (default profile.json; the plot goes beside it)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_profile)

    p = sub.add_parser("validate", help="compare a profile's predictions with the real engine",
                       description="Runs the same workload (same seed, same arrivals) on the real engine "
                                   "and in the simulator with --profile, and reports the error of per-op "
                                   "durations and of per-request E2E/TTFT (MAPE, p50/p90 absolute error). "
                                   "With --out DIR writes validation.json and validation.png.")
    _add_options(p, _COMMON + _ENGINE, _FLAGS + _ENGINE_FLAGS)
    p.set_defaults(func=cmd_validate)

    from lemix.serve.options import SERVE_DEFAULTS, SERVE_WORKLOAD_FLAGS, add_serve_flags
    p = sub.add_parser("serve", help="OpenAI-compatible server that keeps training on /v1/train",
                       description="Serves /v1/completions and /v1/chat/completions (OpenAI API, SSE "
                                   "streaming), takes training samples on /v1/train (journaled in SQLite "
                                   "before the reply, applied exactly once), exposes /metrics "
                                   "(Prometheus) and /health; checkpoints weights and optimizer state. "
                                   f"Defaults differ from simulate: {_defaults_text(SERVE_DEFAULTS)}.")
    _add_options(p, [t for t in _COMMON if not t[1].startswith("workload.") or t[0] in SERVE_WORKLOAD_FLAGS]
                 + [t for t in _ENGINE if t[0] != "--dataset"], _FLAGS + _ENGINE_FLAGS)
    add_serve_flags(p)
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("export", help="write a served model's latest checkpoint as a Hugging Face dir",
                       description="Reads the newest checkpoint under --state-dir (written by `lemix serve`) "
                                   "and writes a Hugging Face directory (config.json, model.safetensors, "
                                   "tokenizer) that transformers loads: the full weights (LoRA merged in), "
                                   "or with --adapter a PEFT adapter directory plus the base reference.")
    p.add_argument("--state-dir", required=True, help="the --state-dir of `lemix serve`")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--node", type=int, default=None, help="which node's checkpoint (default: the newest)")
    p.add_argument("--adapter", action="store_true", help="LoRA runs: write the PEFT adapter and a "
                   "reference to the base instead of merged weights")
    p.set_defaults(func=cmd_export)
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
