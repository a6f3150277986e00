"""`lemix sweep`: every chosen policy over a grid of loads and configurations (lemix.sweep)."""
from __future__ import annotations

from lemix.cli.commands import run_dir
from lemix.config import LemixConfig


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


def cmd_sweep(cfg: LemixConfig) -> int:
    from lemix.metrics import sweep_report as rep
    from lemix.sweep import SweepGrid, capacity, capacity_plan, default_jobs, sweep, sweep_points

    # Phase 1: validate everything (grid, capacity search) before anything runs.
    sw = cfg.sweep
    grid = SweepGrid(**sw.grid_axes())
    points = sweep_points(cfg, grid)
    lo, hi = sw.capacity_range or (None, None)
    plan = (capacity_plan(cfg, grid, target=sw.target, lo=lo, hi=hi, tol=sw.capacity_tol)
            if sw.target is not None else [])
    out = run_dir(cfg, "sweep")
    total = len(points) * len(cfg.policy.names)
    jobs = sw.jobs or default_jobs(total)
    print(f"lemix sweep: {len(points)} points x {len(cfg.policy.names)} policies = {total} runs "
          f"({cfg.workload.duration_s:g} s each), policies: {', '.join(cfg.policy.names)}, jobs {jobs}")
    bar, tick = _bar(cfg.progress, total, "sweep")
    try:
        rows = sweep(cfg, points, jobs=jobs, on_row=tick)
    finally:
        if bar is not None:
            bar.close()
    # Phase 2: the sweep's files first (kept if the capacity search is interrupted), then capacity.
    target = sw.target if sw.target is not None else 0.9   # the frontier plot's target
    rep.write_sweep_dir(out, rows, config_yaml=cfg.to_yaml(), target=target,
                        grid={a: list(v) for a, v in vars(grid).items() if v},
                        title=f"lemix sweep, {cfg.workload.duration_s:g} s per run")
    print(rep.format_sweep_table(rows))
    best = rep.frontier_best(rows, target)
    print(f"best training samples/s at SLO attainment >= {100 * target:g}%: "
          + ", ".join(f"{p} {'none' if v is None else f'{v:.2f}'}" for p, v in best.items()))
    if plan:
        bar, tick = _bar(cfg.progress, len(plan), "capacity")
        try:
            caps = capacity(cfg, grid, target=sw.target, lo=lo, hi=hi, tol=sw.capacity_tol,
                            jobs=sw.jobs or default_jobs(len(plan)),
                            on_done=tick)
        finally:
            if bar is not None:
                bar.close()
        rep.write_capacity(out, caps)
        print(rep.format_capacity_table(caps))
    print(f"results in {out}/ (sweep.csv, {'capacity.csv, ' if plan else ''}config.yaml, grid.yaml, "
          f"sweep.txt, *.png)")
    return 0
