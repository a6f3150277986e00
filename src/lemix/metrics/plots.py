"""PNG plots of runs. Uses matplotlib's Agg canvas on a bare Figure, so it never touches pyplot's
global backend or figure registry (safe in servers and tests).

Every function returns the written path, or None when there is nothing to plot.
"""
from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.patches import Patch

from lemix.types import OpKind, RunResult

__all__ = ["plot_policy_bars", "plot_gantt", "plot_inference_loss", "plot_latency_cdf"]

TRAIN_COLOR = "#e69f00"   # orange
INFER_COLOR = "#0072b2"   # blue
# Hatches tell op kinds apart within one color.
KIND_HATCH = {
    OpKind.FWD: "", OpKind.BWD: "////", OpKind.DECODE: "...", OpKind.OPTIM: "xxx",
    OpKind.OFFLOAD: "---", OpKind.RELOAD: "---", OpKind.SYNC: "+++",
}


def plot_policy_bars(summaries: Mapping[str, dict], path: Path, title: str = "") -> Path | None:
    """SLO attainment (%) and request / total-task throughput (1/s) per policy."""
    if not summaries:
        return None
    names = list(summaries)
    x = np.arange(len(names))
    slo = [_num(summaries[n].get("slo_attainment")) * 100 for n in names]
    req = [_num(summaries[n].get("request_throughput")) for n in names]
    tot = [_num(summaries[n].get("total_task_throughput")) for n in names]

    fig = _figure(max(8.0, 1.6 * len(names) + 4), 4.0)
    ax1, ax2 = fig.subplots(1, 2)
    bars = ax1.bar(x, slo, color=INFER_COLOR)
    ax1.bar_label(bars, [_pct_label(summaries[n].get("slo_attainment")) for n in names], fontsize=8)
    ax1.set_ylim(0, 105)
    ax1.set_ylabel("SLO attainment (%)")
    ax1.set_title("SLO attainment (all requests)")
    w = 0.38
    ax2.bar(x - w / 2, req, w, label="inference requests", color=INFER_COLOR)
    ax2.bar(x + w / 2, tot, w, label="all tasks (incl. training)", color=TRAIN_COLOR)
    ax2.set_ylabel("throughput (tasks/s over makespan)")
    ax2.set_title("Throughput")
    ax2.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.3), ncol=2)  # below: never on a bar
    for ax in (ax1, ax2):
        ax.set_xticks(x, names, rotation=20, ha="right")
        ax.set_xlabel("policy")
    if title:
        fig.suptitle(title)
    return _save(fig, path)


def plot_gantt(result: RunResult, path: Path, seconds: float = 5.0, title: str = "",
               max_rows: int = 32) -> Path | None:
    """Ops of the first `seconds` after the run's start, one row per (node, stage). A cluster
    with more than `max_rows` devices shows its busiest nodes in that window (all their stages),
    and the title says how many of how many: the picture stays a readable size at any scale."""
    if not result.ops:
        return None
    starts = [r.arrival_s for r in result.requests] + [t.arrival_s for t in result.train_tasks]
    t0 = min(starts) if starts else min(op.start_s for op in result.ops)
    t1 = t0 + seconds
    # (row, train, kind) -> [(x, width)] so each group is one broken_barh call.
    groups: dict[tuple[tuple[int, int], bool, OpKind], list[tuple[float, float]]]
    groups = defaultdict(list)
    for op in result.ops:
        s, e = max(op.start_s, t0), min(op.end_s, t1)
        if e > s:
            groups[((op.node, op.stage), bool(op.train), op.kind)].append((s - t0, e - s))
    if not groups:
        return None
    rows = sorted({(n, s) for n in range(result.nodes) for s in range(result.stages)}
                  | {row for row, _, _ in groups})
    nodes = sorted({n for n, _ in rows})
    shown = ""
    per_node = max(1, len(rows) // max(1, len(nodes)))
    if len(rows) > max_rows and len(nodes) > 1:
        busy: dict[int, float] = defaultdict(float)
        for (row, _, _), spans in groups.items():
            busy[row[0]] += sum(w for _, w in spans)
        keep = sorted(nodes, key=lambda n: (-busy[n], n))[:max(1, max_rows // per_node)]
        rows = [r for r in rows if r[0] in set(keep)]
        groups = {k: v for k, v in groups.items() if k[0][0] in set(keep)}
        shown = f" (busiest {len(keep)} of {len(nodes)} nodes)"
    row_y = {row: i for i, row in enumerate(rows)}

    fig = _figure(11.0, max(2.5, 0.45 * len(rows) + 1.5))
    ax = fig.subplots()
    for (row, train, kind), spans in groups.items():
        ax.broken_barh(spans, (row_y[row] - 0.4, 0.8),
                       facecolors=TRAIN_COLOR if train else INFER_COLOR,
                       edgecolor="black", linewidth=0.3, hatch=KIND_HATCH.get(kind, ""))
    ax.set_yticks(range(len(rows)), [f"node {n} / stage {s}" for n, s in rows])
    ax.invert_yaxis()
    ax.set_xlim(0, seconds)
    ax.set_xlabel("time since first arrival (s)")
    ax.set_ylabel("device")
    ax.set_title((title or f"{result.policy}: first {seconds:g} s") + shown)
    kinds = sorted({k for _, _, k in groups}, key=lambda k: list(KIND_HATCH).index(k)
                   if k in KIND_HATCH else len(KIND_HATCH))
    handles = [Patch(facecolor=TRAIN_COLOR, label="training"),
               Patch(facecolor=INFER_COLOR, label="inference")]
    handles += [Patch(facecolor="white", edgecolor="black", hatch=KIND_HATCH.get(k, ""),
                      label=getattr(k, "value", str(k))) for k in kinds]
    ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8)
    return _save(fig, path)


def plot_inference_loss(results: Sequence[RunResult], path: Path, window: int = 50,
                        title: str = "", labels: Sequence[str] | None = None) -> Path | None:
    """Rolling mean (over `window` requests, by finish time) of per-request inference loss; dotted
    lines where the workload's text distribution shifts (RunResult.extras["drift_shifts_s"])."""
    fig = _figure(8.0, 4.5)
    ax = fig.subplots()
    plotted = False
    shifts: set[float] = set()
    for res, label in zip(results, _labels(results, labels)):
        pts = sorted((r.finish_s, r.inference_loss) for r in res.requests
                     if r.finish_s is not None and r.inference_loss is not None
                     and np.isfinite(r.inference_loss))
        if not pts:
            continue
        t, loss = np.array(pts).T
        t0 = min([r.arrival_s for r in res.requests] + [x.arrival_s for x in res.train_tasks])
        ax.plot(t - t0, _rolling_mean(loss, window), label=label)
        shifts.update(s - t0 for s in res.extras.get("drift_shifts_s") or ())
        plotted = True
    if not plotted:
        return None
    for i, s in enumerate(sorted(shifts)):   # where the text distribution shifts
        ax.axvline(s, color="grey", linestyle=":", linewidth=1, label="drift shift" if i == 0 else None)
    ax.set_xlabel("request finish time since first arrival (s)")
    ax.set_ylabel(f"inference loss (nats/token, rolling mean of {window})")
    ax.set_title(title or "Inference loss over time")
    ax.legend(fontsize=8)
    return _save(fig, path)


def plot_latency_cdf(results: Sequence[RunResult], path: Path, title: str = "",
                     labels: Sequence[str] | None = None) -> Path | None:
    """E2E latency CDF as a fraction of ALL requests: failed/unfinished ones never arrive, so a
    curve tops out at the completed fraction."""
    fig = _figure(8.0, 4.5)
    ax = fig.subplots()
    plotted = False
    for res, label in zip(results, _labels(results, labels)):
        e2e = np.sort([r.e2e_s * 1e3 for r in res.requests if not r.failed and r.e2e_s is not None])
        if e2e.size == 0:
            continue
        frac = np.arange(1, e2e.size + 1) / len(res.requests)
        ax.step(np.concatenate([[0.0], e2e]), np.concatenate([[0.0], frac]), where="post",
                label=label)
        plotted = True
    if not plotted:
        return None
    ax.set_ylim(0, 1.02)
    ax.set_xlabel("end-to-end latency (ms)")
    ax.set_ylabel("fraction of all requests")
    ax.set_title(title or "E2E latency CDF")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, path)


# ---- helpers ----------------------------------------------------------------------------------

def _figure(w: float, h: float) -> Figure:
    fig = Figure(figsize=(w, h), layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _save(fig: Figure, path: Path) -> Path:
    path = Path(path)
    fig.savefig(path, dpi=110)
    return path


def _labels(results: Sequence[RunResult], labels: Sequence[str] | None) -> list[str]:
    return list(labels) if labels is not None else [r.policy for r in results]


def _pct_label(v) -> str:
    return "n/a" if v is None else f"{100 * v:.1f}%"


def _num(v) -> float:
    return 0.0 if v is None else float(v)


def _rolling_mean(x: np.ndarray, window: int) -> np.ndarray:
    """Trailing mean; the first points average over what exists so far."""
    c = np.cumsum(np.insert(x.astype(float), 0, 0.0))
    idx = np.arange(1, x.size + 1)
    lo = np.maximum(0, idx - max(1, window))
    return (c[idx] - c[lo]) / (idx - lo)
