"""Sweep outputs: sweep.csv / capacity.csv, compact tables and the plots of a `lemix sweep`.

Rows are plain dicts (one per point x policy, see lemix.sweep): the axis columns (`arrival`,
`mode`, `nodes`, `stages`, `train_share`, `train_rate`, `burstiness` (vLLM's Gamma shape),
`request_rate`, `rate` (the deprecated total task rate, where used), `trace_speedup`, `seed`),
`policy`, `load_per_s` and the summary fields. A *series* is a set of points that differ only in
load (and seed, which the plots average over); each series gets one panel with one line per policy.
Plots use a bare Agg Figure, as metrics.plots does.
"""
from __future__ import annotations

import csv
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import yaml
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

__all__ = ["AXIS_COLUMNS", "write_sweep_dir", "write_capacity", "write_rows_csv", "format_sweep_table", "format_capacity_table",
           "plot_vs_load", "plot_frontier", "frontier_best"]

AXIS_COLUMNS = ("arrival", "mode", "nodes", "stages", "train_share", "train_rate", "burstiness",
                "request_rate", "rate", "trace_speedup", "seed")
_LOAD_COLUMNS = ("request_rate", "rate", "trace_speedup")
_SHORT = {"arrival": "arr", "mode": "mode", "nodes": "N", "stages": "S", "train_share": "share",
          "train_rate": "train/s", "burstiness": "burst", "request_rate": "req/s", "rate": "rate",
          "trace_speedup": "speedup", "seed": "seed"}


def write_sweep_dir(run_dir: Path, rows: Sequence[dict], *, config_yaml: str, grid: dict,
                    target: float, title: str = "lemix sweep") -> list[Path]:
    """Write a sweep's run directory (created if missing): config.yaml (the base config, loadable
    with --config), grid.yaml (the axes and target), sweep.csv, sweep.txt (the table) and the
    plots. Returns the written paths."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(config_yaml if config_yaml.endswith("\n") else config_yaml + "\n")
    (run_dir / "grid.yaml").write_text(yaml.safe_dump({"grid": grid, "target": target}, sort_keys=False))
    (run_dir / "sweep.txt").write_text(f"{title}\n\n{format_sweep_table(rows)}\n")
    written = [run_dir / "config.yaml", run_dir / "grid.yaml", run_dir / "sweep.txt",
               write_rows_csv(run_dir / "sweep.csv", rows)]
    made = [plot_vs_load(rows, "slo_attainment", "SLO attainment (%)", run_dir / "slo_vs_load.png",
                         scale=100.0, title=title, target=target),
            plot_vs_load(rows, "train_samples_per_s", "training samples/s", run_dir / "train_vs_load.png",
                         title=title),
            plot_frontier(rows, run_dir / "frontier.png", target=target, title=title)]
    return written + [p for p in made if p is not None]


def write_capacity(run_dir: Path, capacity_rows: Sequence[dict]) -> Path:
    """capacity.csv beside sweep.csv; its table is appended to sweep.txt."""
    with (Path(run_dir) / "sweep.txt").open("a") as f:
        f.write(f"\n{format_capacity_table(capacity_rows)}\n")
    return write_rows_csv(Path(run_dir) / "capacity.csv", capacity_rows)


def write_rows_csv(path: Path, rows: Sequence[dict]) -> Path:
    """One CSV line per row; the header is every key in first-seen order; None is an empty cell."""
    columns: list[str] = []
    for r in rows:
        columns += [k for k in r if k not in columns]
    path = Path(path)
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(columns)
        for r in rows:
            w.writerow(["" if r.get(c) is None else (f"{r[c]:.12g}" if isinstance(r[c], float) else r[c])
                        for c in columns])
    return path


def _varying(rows: Sequence[dict], columns: Sequence[str]) -> list[str]:
    return [c for c in columns if len({r.get(c) for r in rows}) > 1]


def _fmt(v) -> str:
    if v is None:
        return "-"
    return f"{v:g}" if isinstance(v, float) else str(v)


def _policies(rows: Sequence[dict]) -> list[str]:
    return list(dict.fromkeys(r["policy"] for r in rows))


def _pct(v) -> str:
    return "-" if v is None else f"{100 * v:.1f}%"


def _num(v, fmt: str = ".1f") -> str:
    return "-" if v is None else format(v, fmt)


def _table(header: list[str], body: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in [header] + body) for i in range(len(header))]
    lines = ["  ".join(c.rjust(w) for c, w in zip(r, widths)) for r in [header] + body]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def format_sweep_table(rows: Sequence[dict]) -> str:
    """One line per point: the axes that vary, then per policy `SLO% tasks/s train-samples/s`."""
    if not rows:
        return "(no runs)"
    axes = _varying(rows, AXIS_COLUMNS) or ["request_rate"]
    pols = _policies(rows)
    by_point: dict[int, dict[str, dict]] = defaultdict(dict)
    for r in rows:
        by_point[r["point"]][r["policy"]] = r
    header = [_SHORT[a] for a in axes] + [f"{p}: SLO tasks/s train/s" for p in pols]
    body = []
    for _, cells in sorted(by_point.items()):
        first = next(iter(cells.values()))
        line = [_fmt(first.get(a)) for a in axes]
        for p in pols:
            r = cells.get(p)
            line.append("-" if r is None else f"{_pct(r.get('slo_attainment'))} "
                        f"{_num(r.get('total_task_throughput'))} {_num(r.get('train_samples_per_s'))}")
        body.append(line)
    return _table(header, body)


def _load_label(rows: Sequence[dict]) -> str:
    """What load_per_s is for these rows (see lemix.sweep)."""
    if any(r.get("arrival") == "trace" for r in rows):
        return "load (offered tasks/s)"
    if any(r.get("rate") is not None for r in rows):
        return "load (total tasks/s, deprecated rate)"
    return "load (requests/s)"


def format_capacity_table(rows: Sequence[dict]) -> str:
    """One line per series x policy: the highest load with SLO attainment >= target."""
    if not rows:
        return "(no capacity searches)"
    axes = _varying(rows, [c for c in AXIS_COLUMNS if c not in _LOAD_COLUMNS])
    header = [_SHORT[a] for a in axes] + ["policy", "capacity", "load/s", "req/s", "SLO", "train/s", "evals"]
    body = []
    for r in rows:
        cap = r["capacity"]
        shown = ("none" if cap is None else f"{'>=' if r['bound'] == 'at-least-hi' else ''}{cap:.3g}"
                 f" ({r['load_axis']})")
        if r["bound"] == "below-lo":
            shown = f"< {r['lo']:g} ({r['load_axis']})"
        body.append([_fmt(r.get(a)) for a in axes] + [
            r["policy"], shown, _num(r.get("capacity_load_per_s"), ".2f"),
            _num(r.get("capacity_request_rate"), ".2f"), _pct(r.get("slo_at_capacity")),
            _num(r.get("train_samples_per_s_at_capacity"), ".2f"), str(r["evaluations"])])
    return f"capacity at SLO attainment >= {rows[0]['target']:g}\n" + _table(header, body)


# ---- plots ------------------------------------------------------------------------------------

def _figure(w: float, h: float) -> Figure:
    fig = Figure(figsize=(w, h), layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _save(fig: Figure, path: Path) -> Path:
    fig.savefig(Path(path), dpi=110)
    return Path(path)


def _series(rows: Sequence[dict]) -> dict[tuple, list[dict]]:
    keys = [c for c in AXIS_COLUMNS if c not in _LOAD_COLUMNS and c != "seed"]
    out: dict[tuple, list[dict]] = defaultdict(list)
    for r in rows:
        out[tuple((k, r.get(k)) for k in keys)].append(r)
    return out


def _curve(rows: Sequence[dict], key: str) -> tuple[list[float], list[float]]:
    """Mean of `key` over seeds at each load, sorted by load; undefined values are skipped."""
    at: dict[float, list[float]] = defaultdict(list)
    for r in rows:
        if r.get(key) is not None and r.get("load_per_s") is not None:
            at[float(r["load_per_s"])].append(float(r[key]))
    xs = sorted(at)
    return xs, [float(np.mean(at[x])) for x in xs]


def _panels(n: int, width: float = 4.6, height: float = 3.4):
    cols = min(3, n)
    rows = -(-n // cols)
    fig = _figure(width * cols + 0.8, height * rows + 0.6)
    axes = np.atleast_1d(fig.subplots(rows, cols, squeeze=False)).ravel()
    for ax in axes[n:]:
        ax.set_visible(False)
    return fig, axes


def _series_title(key: tuple, varying: set[str]) -> str:
    parts = [f"{_SHORT[k]}={_fmt(v)}" for k, v in key if k in varying and v is not None]
    return ", ".join(parts) or "all points"


def plot_vs_load(rows: Sequence[dict], key: str, ylabel: str, path: Path, *, scale: float = 1.0,
                 title: str = "", target: float | None = None) -> Path | None:
    """`key` (e.g. slo_attainment) against load, one panel per series, one line per policy."""
    series = _series(rows)
    if not rows or all(len(_curve(rs, key)[0]) == 0 for rs in series.values()):
        return None
    varying = set(_varying(rows, [c for c in AXIS_COLUMNS if c not in _LOAD_COLUMNS and c != "seed"]))
    fig, axes = _panels(len(series))
    pols = _policies(rows)
    for ax, (skey, rs) in zip(axes, series.items()):
        for p in pols:
            xs, ys = _curve([r for r in rs if r["policy"] == p], key)
            if xs:
                ax.plot(xs, [y * scale for y in ys], marker="o", ms=3, label=p)
        if target is not None:
            ax.axhline(target * scale, color="grey", ls="--", lw=0.8)
        ax.set_title(_series_title(skey, varying), fontsize=9)
        ax.set_xlabel(_load_label(rs))
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    if title:
        fig.suptitle(title)
    return _save(fig, path)


def frontier_best(rows: Sequence[dict], target: float) -> dict[str, float | None]:
    """Per policy: the most training samples/s of any point with SLO attainment >= target."""
    best: dict[str, float | None] = {p: None for p in _policies(rows)}
    for r in rows:
        slo, tr = r.get("slo_attainment"), r.get("train_samples_per_s")
        if slo is not None and tr is not None and slo >= target:
            cur = best[r["policy"]]
            best[r["policy"]] = tr if cur is None else max(cur, tr)
    return best


def plot_frontier(rows: Sequence[dict], path: Path, *, target: float, title: str = "") -> Path | None:
    """Left: every point as (SLO attainment, training samples/s) with each policy's Pareto
    frontier; right: per policy, the best training samples/s reached at SLO >= target."""
    pts = [r for r in rows if r.get("slo_attainment") is not None and r.get("train_samples_per_s") is not None]
    if not pts:
        return None
    pols = _policies(rows)
    fig = _figure(11.0, 4.2)
    ax1, ax2 = fig.subplots(1, 2)
    left = min(100 * r["slo_attainment"] for r in pts)
    for i, p in enumerate(pols):
        xy = sorted(((100 * r["slo_attainment"], r["train_samples_per_s"]) for r in pts if r["policy"] == p),
                    key=lambda t: (-t[0], -t[1]))
        if not xy:
            continue
        color = f"C{i % 10}"
        ax1.scatter([x for x, _ in xy], [y for _, y in xy], s=12, color=color, alpha=0.6, label=p)
        front, top = [], -1.0         # walking from high SLO down: keep points that add throughput
        for x, y in xy:
            if y > top:
                front.append((x, y))
                top = y
        front.append((left, top))     # the best of this policy holds for every lower SLO
        ax1.step([x for x, _ in front], [y for _, y in front], where="post", color=color, lw=1.2)
    ax1.axvline(100 * target, color="grey", ls="--", lw=0.8)
    ax1.set_xlabel("SLO attainment (%)")
    ax1.set_ylabel("training samples/s")
    ax1.set_title("points and Pareto frontier per policy", fontsize=9)
    ax1.legend(fontsize=7)
    ax1.grid(alpha=0.3)
    best = frontier_best(rows, target)
    x = np.arange(len(pols))
    bars = ax2.bar(x, [best[p] or 0.0 for p in pols], color=[f"C{i % 10}" for i in range(len(pols))])
    ax2.bar_label(bars, ["none" if best[p] is None else f"{best[p]:.1f}" for p in pols], fontsize=8)
    ax2.set_xticks(x, pols, rotation=20, ha="right")
    ax2.set_ylabel("training samples/s")
    ax2.set_title(f"best training samples/s at SLO attainment >= {100 * target:g}%", fontsize=9)
    if title:
        fig.suptitle(title)
    return _save(fig, path)
