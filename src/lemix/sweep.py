"""Library API behind `lemix sweep`: every chosen policy over a grid of workload/cluster points.

    cfg = load_config(overrides={"policy.names": "lemix,separate", "workload.duration_s": 60})
    grid = SweepGrid.parse(request_rates="4,8,16", train_shares="0.2,0.5")
    rows = sweep(cfg, grid, jobs=2)                    # one plain dict per point x policy
    caps = capacity(cfg, grid, target=0.9)             # highest load with SLO attainment >= 0.9

A point is the base config with one value of each given axis (the cartesian product). Axes that
do not apply to a point's arrival process are dropped for that point: the request and training
rates and the burstiness for trace replay (the trace sets its times), the trace speedup for
anything but trace replay; their columns are empty there. A burstiness other than 1 makes a
Poisson point Gamma (vLLM's rule). Every policy at a point runs the same
task list (built from the point's config and seed), and a run depends on nothing but its config,
so the rows are the same for any number of worker processes (`jobs`); only the host timings
(`wall_s`, `sched_decision_us_*`) differ from run to run.

Load (`load_per_s`, the x axis of the plots): the configured request rate for Poisson/Gamma
arrivals (the deprecated total task rate where `--rates` is the axis), the offered tasks per
second (tasks / duration) for trace replay.

Capacity (Vidur-Search's question): per series (a point without its load axis) and policy, the
highest load at which SLO attainment stays >= target, by bisection over the request rate
(`workload.request_rate`; the deprecated total `workload.rate` where the grid gives `--rates`; the
trace speedup for traces) in [lo, hi] down to `tol`. SLO attainment is not strictly monotone in
load (finite samples, noise), so the answer is one crossing of the target, bracketed within tol.
"""
from __future__ import annotations

import enum
import itertools
import math
import multiprocessing as mp
import os
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, fields
from typing import Any, Callable, Sequence

from lemix.config import ConfigError, LemixConfig, with_overrides
from lemix.experiment import simulate
from lemix.metrics import summarize

__all__ = ["AXES", "SweepGrid", "SweepPoint", "Bound", "sweep_points", "point_columns", "sweep",
           "capacity", "capacity_plan", "capacity_range", "load_axis", "series_axis", "bisect_capacity", "bisection_evaluations",
           "check_jobs", "check_target", "default_jobs"]


@dataclass(frozen=True)
class Axis:
    name: str          # SweepGrid field
    flag: str          # `lemix sweep` flag
    field: str         # dotted config field it sets
    column: str        # sweep.csv column
    kind: type         # float, int or str
    arrivals: tuple[str, ...] = ("poisson", "gamma", "trace")   # arrival processes it applies to


AXES: tuple[Axis, ...] = (
    Axis("arrivals", "--arrivals", "workload.arrival", "arrival", str),
    Axis("modes", "--modes", "workload.mode", "mode", str),
    Axis("nodes", "--nodes-grid", "cluster.nodes", "nodes", int),
    Axis("stages", "--stages-grid", "cluster.stages", "stages", int),
    Axis("train_shares", "--train-shares", "workload.train_share", "train_share", float),
    Axis("train_rates", "--train-rates", "workload.train_rate", "train_rate", float, ("poisson", "gamma")),
    Axis("burstiness", "--burstiness-grid", "workload.burstiness", "burstiness", float, ("poisson", "gamma")),
    Axis("request_rates", "--request-rates", "workload.request_rate", "request_rate", float, ("poisson", "gamma")),
    Axis("rates", "--rates", "workload.rate", "rate", float, ("poisson", "gamma")),   # deprecated
    Axis("trace_speedups", "--trace-speedups", "workload.trace_speedup", "trace_speedup", float, ("trace",)),
    Axis("seeds", "--seeds", "seed", "seed", int),
)
_BY_NAME = {a.name: a for a in AXES}
# The load axis of each arrival process: what the plots' x axis and the capacity search vary.
LOAD_AXIS = {"poisson": _BY_NAME["request_rates"], "gamma": _BY_NAME["request_rates"],
             "trace": _BY_NAME["trace_speedups"]}


def load_axis(cfg: LemixConfig) -> Axis:
    """The load axis of a point: the deprecated total rate where the config uses it."""
    if cfg.workload.arrival != "trace" and cfg.workload.rate is not None:
        return _BY_NAME["rates"]
    return LOAD_AXIS[cfg.workload.arrival]
# Summary fields left out of sweep.csv: repeated by the point columns, or lists (not one cell).
_SKIP = {"policy", "nodes", "stages", "idle_ratio_per_stage"}


@dataclass(frozen=True)
class SweepGrid:
    """The values of each axis; an empty axis keeps the base config's value."""
    arrivals: tuple[str, ...] = ()
    modes: tuple[str, ...] = ()
    nodes: tuple[int, ...] = ()
    stages: tuple[int, ...] = ()
    train_shares: tuple[float, ...] = ()
    train_rates: tuple[float, ...] = ()
    burstiness: tuple[float, ...] = ()
    request_rates: tuple[float, ...] = ()
    rates: tuple[float, ...] = ()          # deprecated: total task rates (see WorkloadConfig.rate)
    trace_speedups: tuple[float, ...] = ()
    seeds: tuple[int, ...] = ()

    @classmethod
    def parse(cls, **texts: str | None) -> "SweepGrid":
        """Comma lists per axis name (`rates="8,16"`); a bad value is a ConfigError naming the flag."""
        values = {}
        for name, text in texts.items():
            if name not in _BY_NAME:
                raise ConfigError(f"unknown sweep axis {name!r}; allowed: {', '.join(_BY_NAME)}")
            if text is not None:
                values[name] = _parse_list(_BY_NAME[name], text)
        return cls(**values)

    def given(self) -> list[tuple[Axis, tuple]]:
        return [(_BY_NAME[f.name], getattr(self, f.name)) for f in fields(self) if getattr(self, f.name)]

    def without(self, *names: str) -> "SweepGrid":
        return SweepGrid(**{f.name: () if f.name in names else getattr(self, f.name) for f in fields(self)})


def _parse_list(axis: Axis, text: str) -> tuple:
    parts = [p.strip() for p in str(text).split(",")]
    if not any(parts):
        raise ConfigError(f"{axis.flag}: give a comma list of values, got {text!r}")
    out: list = []
    for p in parts:
        if not p:
            raise ConfigError(f"{axis.flag}: empty value in {text!r}")
        try:
            v = axis.kind(p)
        except ValueError:
            what = {int: "an integer", float: "a number"}.get(axis.kind, "a value")
            raise ConfigError(f"{axis.flag}: {p!r} is not {what}") from None
        if isinstance(v, float) and not math.isfinite(v):
            raise ConfigError(f"{axis.flag}: {p!r} is not a finite number")
        if v not in out:
            out.append(v)
    return tuple(out)


@dataclass(frozen=True, eq=False)
class SweepPoint:
    index: int
    cfg: LemixConfig

    @property
    def columns(self) -> dict[str, Any]:
        return point_columns(self.cfg)


def point_columns(cfg: LemixConfig) -> dict[str, Any]:
    """The axis values in force for a config; None where an axis does not apply to its arrival."""
    w = cfg.workload
    applies = {a.column: w.arrival in a.arrivals for a in AXES}
    raw = {"arrival": w.arrival, "mode": w.mode, "nodes": cfg.cluster.nodes, "stages": cfg.cluster.stages,
           "train_share": w.effective_train_share, "train_rate": w.train_rate, "burstiness": 1.0 / w.cv2,
           "request_rate": w.requests_per_s, "rate": w.rate, "trace_speedup": w.trace_speedup, "seed": cfg.seed}
    return {a.column: raw[a.column] if applies[a.column] else None for a in AXES}


def _overrides(cfg: LemixConfig, chosen: Sequence[tuple[Axis, Any]]) -> dict[str, Any]:
    """Dotted overrides for one combination of axis values, dropping axes that do not apply."""
    arrival = next((v for a, v in chosen if a.name == "arrivals"), cfg.workload.arrival)
    out: dict[str, Any] = {}
    for axis, value in chosen:
        if axis.name == "arrivals" or arrival in axis.arrivals:
            out[axis.field] = value
    if arrival != "trace":
        out["workload.trace"] = None     # else the config would turn the point back into trace replay
    elif cfg.workload.rate is None:
        out["workload.request_rate"] = None   # the trace sets the request rate
    if arrival == "poisson" and "workload.burstiness" not in out:
        out["workload.burstiness"] = 1.0     # else a bursty base would make the point Gamma
        out["workload.burstiness_cv2"] = None
    if arrival == "trace" and "workload.burstiness" not in out:
        out["workload.burstiness"], out["workload.burstiness_cv2"] = 1.0, None
    return out


def sweep_points(cfg: LemixConfig, grid: SweepGrid) -> list[SweepPoint]:
    """Every distinct point of the grid, in axis order (the last axis varies fastest)."""
    given = grid.given()
    for axis, values in given:          # each value alone first, so the error names its flag
        for v in values:
            over = _overrides(cfg, [(axis, v)]) if axis.name == "arrivals" else {axis.field: v}
            if axis.name != "arrivals" and cfg.workload.arrival == "trace" and "trace" not in axis.arrivals:
                over.update({"workload.arrival": "poisson", "workload.trace": None})   # where it applies
            try:
                with_overrides(cfg, over)
            except ConfigError as e:
                raise ConfigError(f"{axis.flag} {v}: {str(e).removeprefix('invalid config: ')}") from None
    points: list[SweepPoint] = []
    seen: set = set()
    used: set[str] = set()
    for combo in itertools.product(*[[(a, v) for v in vals] for a, vals in given]):
        over = _overrides(cfg, combo)
        arrival = over.get("workload.arrival", cfg.workload.arrival)
        used.update(a.name for a, _ in combo if a.name == "arrivals" or arrival in a.arrivals)
        try:
            point = with_overrides(cfg, over)
        except ConfigError as e:
            desc = ", ".join(f"{a.flag} {v}" for a, v in combo)
            raise ConfigError(f"sweep point ({desc}): {str(e).removeprefix('invalid config: ')}") from None
        key = point.model_dump_json()     # e.g. a Poisson point with burstiness 0.5 is the Gamma one
        if key not in seen:
            seen.add(key)
            points.append(SweepPoint(len(points), point))
    for axis, _ in given:
        if axis.name not in used:
            raise ConfigError(f"{axis.flag}: applies to {' or '.join(axis.arrivals)} arrivals only, "
                              f"and no point of the sweep has them")
    return points


# ---- running ----------------------------------------------------------------------------------

def _single(cfg: LemixConfig, policy: str, load: dict[str, Any] | None = None) -> dict:
    """Simulate one policy on cfg (optionally with its load replaced) and summarize it."""
    one = with_overrides(cfg, {"policy.names": [policy], **(load or {})})
    (result,) = simulate(one)           # op-duration noise as `lemix simulate` runs it
    return summarize(result)


def _row(point_index: int, cfg: LemixConfig, policy: str) -> dict:
    s = _single(cfg, policy)
    cols = point_columns(cfg)
    offered = (s["requests_total"] + s["train_tasks_total"]) / cfg.workload.duration_s
    load = offered if cfg.workload.arrival == "trace" else getattr(cfg.workload, load_axis(cfg).field.split(".")[1])
    row = {"point": point_index, **cols, "policy": policy, "load_per_s": load,
           "offered_tasks_per_s": offered}
    row.update((k, v) for k, v in s.items() if k not in _SKIP)
    return row


def _run_job(job: tuple) -> dict:
    fn, args = job
    return fn(*args)


def default_jobs(runs: int) -> int:
    """Worker processes when none are asked for: one per CPU this process may use, at most one
    per run (results are the same for any number)."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:          # not on Linux
        cpus = os.cpu_count() or 1
    return max(1, min(cpus, runs))


def _cost(cfg: LemixConfig, policy: str) -> float:
    """A rough relative cost of simulating one run, only to start long runs first (it orders the
    work, never changes a result): arrivals x duration, lemix's policies ~4x the others (its
    forecasts and chunked training ops)."""
    w = cfg.workload
    rate = w.requests_per_s or w.trace_speedup or 1.0
    share = w.arrival_train_share
    rate += w.train_rate or (rate * share / (1.0 - share) if share is not None and share < 1 else 0.0)
    return rate * w.duration_s * (4.0 if policy.startswith("lemix") else 1.0)


def _map(jobs: list[tuple], n_procs: int, on_done: Callable[[dict], None] | None,
         costs: Sequence[float] | None = None) -> list[dict]:
    """Results of `fn(*args)` for each (fn, args) job, in job order, on n_procs processes. With
    `costs`, the processes take the costliest jobs first (the longest-first rule keeps the last
    process from running one long job alone at the end)."""
    out: list[Any] = [None] * len(jobs)
    if n_procs <= 1 or len(jobs) <= 1:
        for i, job in enumerate(jobs):
            out[i] = _run_job(job)
            if on_done:
                on_done(out[i])
        return out
    order = range(len(jobs)) if costs is None else sorted(range(len(jobs)), key=lambda i: -costs[i])
    # spawn, not fork: the parent may hold threads (a progress bar's monitor, a server)
    ex = ProcessPoolExecutor(max_workers=min(n_procs, len(jobs)), mp_context=mp.get_context("spawn"))
    try:
        futures = {ex.submit(_run_job, jobs[i]): i for i in order}
        for fut in as_completed(futures):
            out[futures[fut]] = fut.result()
            if on_done:
                on_done(out[futures[fut]])
    except BaseException:               # a failed run or Ctrl-C: do not run the rest
        ex.shutdown(wait=True, cancel_futures=True)
        raise
    ex.shutdown(wait=True)
    return out


def sweep(cfg: LemixConfig, grid: SweepGrid | Sequence[SweepPoint], *, jobs: int = 1,
          on_row: Callable[[dict], None] | None = None) -> list[dict]:
    """One row per point x policy (points in grid order, policies in cfg.policy.names order):
    the point's axis columns, `policy`, `load_per_s`, `offered_tasks_per_s`, then the summary
    fields of `lemix simulate`. `on_row` is called as each run finishes (in finishing order)."""
    points = sweep_points(cfg, grid) if isinstance(grid, SweepGrid) else list(grid)
    check_jobs(jobs)
    work = [(_row, (p.index, p.cfg, name)) for p in points for name in cfg.policy.names]
    return _map(work, jobs, on_row, [_cost(p.cfg, name) for p in points for name in cfg.policy.names])


# ---- capacity ---------------------------------------------------------------------------------

class Bound(str, enum.Enum):
    FOUND = "found"               # target met at `capacity`, missed within tol above it
    AT_LEAST_HI = "at-least-hi"   # target met even at hi: the capacity is hi or more
    BELOW_LO = "below-lo"         # target missed already at lo: no capacity in the range


def bisection_evaluations(lo: float, hi: float, tol: float) -> int:
    """The most evaluations bisect_capacity makes: hi, lo, then halving [lo, hi] down to tol."""
    return 2 + max(0, math.ceil(math.log2((hi - lo) / tol))) if hi - lo > tol else 2


def _check_range(lo: float, hi: float, tol: float) -> None:
    if not (0 < lo < hi) or not tol > 0:
        raise ConfigError(f"--capacity-range: need 0 < LO < HI and --capacity-tol > 0, "
                          f"got LO={lo:g}, HI={hi:g}, tol={tol:g}")


def bisect_capacity(attainment: Callable[[float], float | None], lo: float, hi: float,
                    target: float, tol: float) -> tuple[float | None, Bound, list[tuple[float, float]]]:
    """Highest x in [lo, hi] with attainment(x) >= target, assuming it falls as x grows.

    Returns (x or None, bound, [(x, attainment) evaluated, in order]). Undefined attainment (no
    requests) counts as a miss."""
    _check_range(lo, hi, tol)
    seen: list[tuple[float, float]] = []

    def meets(x: float) -> tuple[bool, float]:
        a = attainment(x)
        a = float("nan") if a is None else float(a)
        seen.append((x, a))
        return (a >= target, a)

    if meets(hi)[0]:
        return hi, Bound.AT_LEAST_HI, seen
    if not meets(lo)[0]:
        return None, Bound.BELOW_LO, seen
    while hi - lo > tol:              # invariant: lo meets the target, hi misses it
        mid = (lo + hi) / 2
        if meets(mid)[0]:
            lo = mid
        else:
            hi = mid
    return lo, Bound.FOUND, seen


def _lowest_miss(seen: Sequence[tuple[float, float]], target: float) -> float | None:
    misses = [x for x, a in seen if not a >= target]
    return min(misses) if misses else None


def _capacity_job(cfg: LemixConfig, policy: str, target: float, lo: float, hi: float, tol: float) -> dict:
    axis = load_axis(cfg)
    found: dict[float, dict] = {}

    def attainment(x: float) -> float | None:
        found[x] = _single(cfg, policy, {axis.field: x})
        return found[x]["slo_attainment"]

    x, bound, seen = bisect_capacity(attainment, lo, hi, target, tol)
    cols = {k: v for k, v in point_columns(cfg).items() if k != axis.column}
    at = found.get(x) if x is not None else None
    dur = cfg.workload.duration_s
    return {**cols, "policy": policy, "target": target, "load_axis": axis.column, "capacity": x,
            "capacity_load_per_s": None if at is None else (
                (at["requests_total"] + at["train_tasks_total"]) / dur if axis.column == "trace_speedup" else x),
            "capacity_request_rate": None if at is None else at["requests_total"] / dur,
            "slo_at_capacity": None if at is None else at["slo_attainment"],
            "train_samples_per_s_at_capacity": None if at is None else at["train_samples_per_s"],
            "missed_at": _lowest_miss(seen, target),   # the bracket's upper end: SLO < target there
            "bound": bound.value, "lo": lo, "hi": hi, "tol": tol, "evaluations": len(seen)}


def check_jobs(jobs: int) -> None:
    if jobs < 1:
        raise ConfigError(f"--jobs: must be >= 1, got {jobs}")


def check_target(target: float) -> None:
    if not 0 < target <= 1:
        raise ConfigError(f"--target: SLO attainment target must be in (0, 1], got {target:g}")


def series_axis(grid: SweepGrid, cfg: LemixConfig, arrival: str) -> Axis:
    """The load axis a series varies: the trace speedup for traces; else the deprecated total rate
    where the grid gives `--rates` (or the base config uses `rate` and the grid no request rates),
    the request rate otherwise."""
    if arrival == "trace":
        return LOAD_AXIS["trace"]
    if grid.rates or (cfg.workload.rate is not None and not grid.request_rates):
        return _BY_NAME["rates"]
    return LOAD_AXIS[arrival]


def capacity_range(grid: SweepGrid, cfg: LemixConfig, arrival: str) -> tuple[float, float]:
    """Default bisection range for one arrival process: [min / 4, 2 x max] of the grid's load axis
    values (the base config's value when the axis is not given)."""
    axis = series_axis(grid, cfg, arrival)
    values = getattr(grid, axis.name) or (getattr(cfg.workload, axis.field.split(".")[1]),)
    return min(values) / 4, 2 * max(values)


def capacity_plan(cfg: LemixConfig, grid: SweepGrid, *, target: float, lo: float | None = None,
                  hi: float | None = None, tol: float | None = None) -> list[tuple]:
    """The bisections `capacity` runs, one (series config, policy, target, lo, hi, tol) per series
    x policy; validates the target and the ranges, runs nothing. A series config uses the field of
    its load axis (load_axis of it is the axis searched)."""
    check_target(target)
    plan = []
    for p in sweep_points(cfg, grid.without("request_rates", "rates", "trace_speedups")):
        arrival = p.cfg.workload.arrival
        d_lo, d_hi = capacity_range(grid, cfg, arrival)
        s_lo, s_hi = lo if lo is not None else d_lo, hi if hi is not None else d_hi
        s_tol = tol if tol is not None else 0.01 * s_hi
        _check_range(s_lo, s_hi, s_tol)
        series = p.cfg
        axis = series_axis(grid, cfg, arrival)
        if axis is not load_axis(series):     # the grid's --rates on a base with a request rate
            series = with_overrides(series, {axis.field: s_hi})
        plan += [(series, name, target, s_lo, s_hi, s_tol) for name in cfg.policy.names]
    return plan


def capacity(cfg: LemixConfig, grid: SweepGrid, *, target: float, lo: float | None = None,
             hi: float | None = None, tol: float | None = None, jobs: int = 1,
             on_done: Callable[[dict], None] | None = None) -> list[dict]:
    """Per series (the grid without its load axes) and policy, the highest load with SLO attainment
    >= target; one dict per series x policy, in series then policy order. Range and tol default per
    arrival process (see capacity_range; tol = 1% of hi). `on_done` is called per finished search."""
    plan = capacity_plan(cfg, grid, target=target, lo=lo, hi=hi, tol=tol)
    return _map([(_capacity_job, args) for args in plan], jobs, on_done,
                [_cost(series, name) * bisection_evaluations(lo_, hi_, tol_)
                 for series, name, _, lo_, hi_, tol_ in plan])
