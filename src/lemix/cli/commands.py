"""What each `lemix` command does, given its validated config: thin shells over the library
(lemix.experiment, lemix.api, lemix.sweep, lemix.serve, lemix.export, lemix.profiling)."""
from __future__ import annotations

import time
from pathlib import Path
from typing import Callable

from lemix.config import ConfigError, LemixConfig


def run_dir(cfg: LemixConfig, command: str) -> Path:
    return Path(cfg.out or f"runs/{command}-{time.strftime('%Y%m%d-%H%M%S')}")


def check_devices(cfg: LemixConfig) -> None:
    """Real-engine commands: every stage's device exists here (before a model is loaded)."""
    from lemix.api import stage_devices

    stage_devices(cfg)


class Progress:
    """One tqdm bar per policy run over its tasks, advanced as tasks finish or fail (not as they
    arrive: a run goes on well past its last arrival). `make(name, total)` is the factory that
    lemix.experiment.simulate and lemix.api.run_engine take; `close()` ends the last bar."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self._bar = None

    def make(self, name: str, total: int) -> Callable[[int], None]:
        from tqdm import tqdm

        self.close()
        bar = self._bar = tqdm(total=total, desc=f"{name:>22}", unit="task", leave=True, dynamic_ncols=True,
                               disable=None, mininterval=0.5)

        def tick(n: int) -> None:
            bar.update(min(n, total - bar.n))
        return tick

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    @property
    def factory(self):
        return self.make if self.enabled else None


def _compare(cfg: LemixConfig, command: str, header: str, execute) -> int:
    """Run every chosen policy (simulated or real), write the run directory, print the table."""
    from lemix.experiment import write_results
    from lemix.metrics import format_table, summarize

    out = run_dir(cfg, command)
    print(f"lemix {command}: {header}, policies: {', '.join(cfg.policy.names)}")
    bars = Progress(cfg.progress)
    try:
        results = execute(cfg, progress=bars.factory)
    finally:
        bars.close()
    write_results(cfg, results, out, f"lemix {command}")
    print(format_table({r.policy: summarize(r) for r in results}))
    print(f"results in {out}/ (summary.json, requests.csv, timeline.json, *.png)")
    return 0


def _load(w) -> str:
    if w.arrival == "trace":
        return "trace arrivals"
    burst = f", burstiness {1 / w.cv2:g}" if w.arrival == "gamma" else ""
    train = (f" + {w.train_rate:g} training tasks/s" if w.train_rate is not None
             else f", training share {w.arrival_train_share:g}" if w.arrival_train_share else "")
    return f"{w.arrival} arrivals at {w.requests_per_s:g} requests/s{train}{burst}"


def cmd_simulate(cfg: LemixConfig) -> int:
    from lemix.experiment import simulate

    c, w = cfg.cluster, cfg.workload
    return _compare(cfg, "simulate", f"{c.nodes} nodes x {c.stages} stages, {_load(w)} for {w.duration_s:g} s",
                    simulate)


def cmd_run(cfg: LemixConfig) -> int:
    from lemix.api import run_engine

    check_devices(cfg)
    c, w = cfg.cluster, cfg.workload
    modeled = f"profile {cfg.model.profile}" if cfg.model.profile else f"modeled {cfg.model.sim_model}"
    clock = f"virtual clock: {modeled} cluster" if c.clock == "virtual" else "wall clock"
    return _compare(cfg, "run", f"model {cfg.model.name}, {c.nodes} nodes x {c.stages} stages on {c.device} "
                    f"({c.backend} backend, {clock}), {_load(w)} for {w.duration_s:g} s", run_engine)


def cmd_profile(cfg: LemixConfig) -> int:
    from lemix.api import set_threads_per_worker, stage_devices
    from lemix.engine.adapt import spec_from_config
    from lemix.engine.model import load_model, split_stages
    from lemix.engine.worker import StageWorker
    from lemix.profiling import measure_profile, plot_profile, save_profile
    from lemix.profiling.measure import grid_size

    S, quick = cfg.cluster.stages, cfg.profiler.quick
    devices = stage_devices(cfg)
    hf_model, _, _ = load_model(cfg.model.name, seed=cfg.seed, tokenizer=cfg.model.tokenizer,
                                byte_tokenizer=cfg.model.byte_tokenizer, adapt=spec_from_config(cfg.model))
    set_threads_per_worker(S)
    workers = [StageWorker(m, s, S, devices[s], lr=cfg.model.lr) for s, m in enumerate(split_stages(hf_model, S))]
    print(f"lemix profile: {cfg.model.name}, {S} stages on {cfg.cluster.device}{' (quick)' if quick else ''}")
    bar = None
    if cfg.progress:
        from tqdm import tqdm

        bar = tqdm(total=grid_size(quick=quick, num_stages=S), desc="profiling", unit="point",
                   disable=None, mininterval=0.5)
    try:
        profile, samples = measure_profile(workers, model_name=cfg.model.name, device=cfg.cluster.device,
                                           quick=quick, capacity_bytes=int(cfg.cluster.device_memory_gb * 1e9),
                                           progress=bar.update if bar is not None else None, seed=cfg.seed)
    finally:
        if bar is not None:
            bar.close()
    out = Path(cfg.out or "profile.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    save_profile(profile, out, samples)
    plot = plot_profile(profile, samples, out.with_suffix(".png"))
    for key, err in sorted(profile.fit_error.items()):
        print(f"  {key:<18} fit MAPE {100 * err:5.1f}%")
    print(f"profile written to {out} (plot: {plot})")
    return 0


def cmd_validate(cfg: LemixConfig) -> int:
    from lemix.api import engine_tasks, run_engine
    from lemix.profiling import load_profile
    from lemix.sim import simulate_policy
    from lemix.validate import compare, plot_validation, write_validation

    if not cfg.model.profile:
        raise ConfigError("lemix validate needs --profile FILE (model.profile; make one with `lemix profile`)")
    check_devices(cfg)
    profile = load_profile(cfg.model.profile, stages=cfg.cluster.stages, force=cfg.model.force_profile,
                           capacity_bytes=int(cfg.cluster.device_memory_gb * 1e9), model=cfg.model.name,
                           device=cfg.cluster.device)
    policy = cfg.policy.names[0]
    cfg.policy.names = [policy]
    tasks = engine_tasks(cfg)
    print(f"lemix validate: {len(tasks)} tasks, policy {policy}: real engine, then simulator")
    bars = Progress(cfg.progress)
    try:
        (real,) = run_engine(cfg, profile=profile, tasks=tasks, progress=bars.factory)
    finally:
        bars.close()
    sim, _ = simulate_policy(cfg.sched_params(policy), profile, tasks, noise=0.0)
    report = compare(real, sim, profile)
    for name in ("op", "e2e", "ttft"):
        r = report[name]
        if r["mape"] is not None:
            print(f"  {name:<5} MAPE {100 * r['mape']:5.1f}%   |err| p50 {1e3 * r['abs_err_p50_s']:7.2f} ms"
                  f"   p90 {1e3 * r['abs_err_p90_s']:7.2f} ms   (n={r['n']})")
    for kind, r in report["op_by_kind"].items():
        print(f"    {kind:<7} MAPE {100 * r['mape']:5.1f}%  (n={r['n']})")
    if cfg.out:
        out = Path(cfg.out)
        write_validation(report, out)
        plot_validation(real, sim, profile, out / "validation.png")
        print(f"report in {out}/ (validation.json, validation.png)")
    return 0


def cmd_serve(cfg: LemixConfig) -> int:
    from lemix.serve import run_server
    from lemix.serve.options import options_from_config

    opts = options_from_config(cfg.serve)
    check_devices(cfg)
    c = cfg.cluster
    print(f"lemix serve: model {cfg.model.name}, {c.nodes} nodes x {c.stages} stages on {c.device}, "
          f"policy {', '.join(cfg.policy.names)}, http://{opts.host}:{opts.port}/v1, "
          f"state in {opts.state_dir}{' (resuming)' if opts.resume else ''}", flush=True)
    run_server(cfg, opts)   # every failure to start or to shut down cleanly is a ServeError
    return 0


def cmd_export(cfg: LemixConfig) -> int:
    from lemix.export import export_state_dir, latest_checkpoint

    if not cfg.out:
        raise ConfigError("lemix export needs --out DIR (out)")
    state, node, adapter = cfg.serve.state_dir, cfg.export.node, cfg.export.adapter
    ckpt = latest_checkpoint(state, node)
    print(f"lemix export: {ckpt} -> {cfg.out} ({'PEFT adapter + base reference' if adapter else 'full weights'})")
    out = export_state_dir(state, cfg.out, node=node, adapter=adapter)
    print(f"written {out}/ (load it with transformers.AutoModelForCausalLM.from_pretrained"
          f"{' + peft.PeftModel.from_pretrained' if adapter else ''})")
    return 0
