"""Write a run directory (DESIGN.md section 6) and format a comparison table.

A run directory holds: config.yaml, summary.json ({policy: summary}), summary.txt (the table),
requests.csv, train_tasks.csv, train_steps.csv (each with a leading `policy` column),
timeline.json (Chrome trace), events.json (when runs logged events) and PNG plots.
"""
from __future__ import annotations

import csv
import json
import re
from collections.abc import Mapping, Sequence
from pathlib import Path

from lemix.metrics import plots
from lemix.metrics.summary import summarize
from lemix.metrics.timeline import write_timeline
from lemix.types import RunResult

__all__ = ["write_run_dir", "format_table", "policy_labels", "REQUEST_COLUMNS",
           "TRAIN_TASK_COLUMNS", "TRAIN_STEP_COLUMNS"]

REQUEST_COLUMNS = ("policy", "task_id", "arrival_s", "node", "prompt_tokens", "output_tokens",
                   "ttft_s", "e2e_s", "slo_s", "slo_met", "failed", "weight_version",
                   "staleness_steps", "staleness_s", "inference_loss", "error")
TRAIN_TASK_COLUMNS = ("policy", "task_id", "arrival_s", "node", "finish_s", "samples", "tokens",
                      "deferred_s", "failed", "error")
TRAIN_STEP_COLUMNS = ("policy", "node", "step", "time_s", "samples", "tokens", "loss")


def write_run_dir(run_dir: Path, results: Sequence[RunResult], config_yaml: str,
                  title: str = "LeMix run", *, gantt_seconds: float = 5.0,
                  max_timeline_events: int | None = 200_000) -> list[Path]:
    """Write every artifact of the given runs into `run_dir` (created if missing).

    Returns the written paths. Two runs with the same policy name are labelled "name", "name-2".
    """
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    labels = policy_labels(results)
    summaries = {label: summarize(res) for label, res in zip(labels, results)}
    written: list[Path] = []

    def text(name: str, content: str) -> None:
        p = run_dir / name
        p.write_text(content)
        written.append(p)

    # Phase 1: configuration and numbers.
    text("config.yaml", config_yaml if config_yaml.endswith("\n") else config_yaml + "\n")
    text("summary.json", json.dumps(summaries, indent=2, allow_nan=False) + "\n")
    text("summary.txt", f"{title}\n\n{format_table(summaries)}\n")

    # Phase 2: per-record tables.
    written.append(_write_csv(run_dir / "requests.csv", REQUEST_COLUMNS, (
        [label, r.task_id, r.arrival_s, r.node, r.prompt_tokens, r.output_tokens, r.ttft_s,
         r.e2e_s, r.slo_s, r.slo_met, r.failed, r.weight_version, r.staleness_steps,
         r.staleness_s, r.inference_loss, r.error]
        for label, res in zip(labels, results) for r in res.requests)))
    written.append(_write_csv(run_dir / "train_tasks.csv", TRAIN_TASK_COLUMNS, (
        [label, t.task_id, t.arrival_s, t.node, t.finish_s, t.samples, t.tokens, t.deferred_s,
         t.failed, t.error]
        for label, res in zip(labels, results) for t in res.train_tasks)))
    written.append(_write_csv(run_dir / "train_steps.csv", TRAIN_STEP_COLUMNS, (
        [label, s.node, s.step, s.time_s, s.samples, s.tokens, s.loss]
        for label, res in zip(labels, results) for s in res.train_steps)))
    events = [{"policy": label, **ev.as_dict()} for label, res in zip(labels, results) for ev in res.events]
    if events:
        text("events.json", json.dumps(events, indent=1, default=str) + "\n")

    # Phase 3: timeline and pictures.
    written.append(write_timeline(run_dir / "timeline.json", results, labels=labels,
                                  max_events=max_timeline_events))
    made = [
        plots.plot_policy_bars(summaries, run_dir / "policy_bars.png", title=title),
        plots.plot_latency_cdf(results, run_dir / "latency_cdf.png", labels=labels),
        plots.plot_inference_loss(results, run_dir / "inference_loss.png", labels=labels),
    ]
    stems: list[str] = []
    for label, res in zip(labels, results):
        stem = f"gantt_{_file_safe(label)}"
        stem = stem if stem not in stems else f"{stem}_{len(stems)}"
        stems.append(stem)
        made.append(plots.plot_gantt(res, run_dir / f"{stem}.png", seconds=gantt_seconds,
                                     title=f"{label}: first {gantt_seconds:g} s"))
    written.extend(p for p in made if p is not None)
    return written


def policy_labels(results: Sequence[RunResult]) -> list[str]:
    """Policy names, made unique by suffixing repeats with -2, -3, ..."""
    labels: list[str] = []
    for r in results:
        label, n = r.policy, 1
        while label in labels:
            n += 1
            label = f"{r.policy}-{n}"
        labels.append(label)
    return labels


# ---- table ------------------------------------------------------------------------------------

# (header, summary key, scale, format, better) ; better: "max" or "min"
_COLUMNS = (
    ("SLO %", "slo_attainment", 100.0, ".1f", "max"),
    ("req/s", "request_throughput", 1.0, ".3f", "max"),
    ("train samp/s", "train_samples_per_s", 1.0, ".2f", "max"),
    ("mean E2E ms", "mean_e2el_ms", 1.0, ".1f", "min"),
    ("p99 E2E ms", "p99_e2el_ms", 1.0, ".1f", "min"),
    ("idle %", "idle_ratio", 100.0, ".1f", "min"),
    ("inf loss", "inference_loss_mean", 1.0, ".4f", "min"),
    ("stale steps", "staleness_steps_mean", 1.0, ".2f", "min"),
    ("failed", "failed", 1.0, "d", "min"),
    ("train failed", "train_failed", 1.0, "d", "min"),
)
_OPTIONAL = {"inference_loss_mean"}   # shown only when some policy has a value


def format_table(summaries: Mapping[str, dict]) -> str:
    """Fixed-width table, one row per policy; '*' marks the best displayed value of each column
    (ties all marked; nothing marked where every policy shows the same value)."""
    cols = [c for c in _COLUMNS
            if c[1] not in _OPTIONAL or any(s.get(c[1]) is not None for s in summaries.values())]
    names = list(summaries)
    cells: list[list[str]] = [[] for _ in names]
    for header, key, scale, fmt, better in cols:
        shown = [_display(summaries[n].get(key), scale, fmt) for n in names]
        present = [v for v in shown if v is not None]
        # Mark a best only where there is a choice: two or more values that are not all equal.
        distinct = {float(v) for v in present}
        best = (max if better == "max" else min)(distinct) if len(distinct) > 1 else None
        for row, v in zip(cells, shown):
            is_best = best is not None and v is not None and float(v) == best
            row.append(("- " if v is None else v + ("*" if is_best else " ")))
    headers = ["policy"] + [c[0] + " " for c in cols]
    body = [[n] + row for n, row in zip(names, cells)]
    widths = [max(len(r[i]) for r in [headers] + body) for i in range(len(headers))]

    def line(r: list[str]) -> str:
        return "  ".join(c.ljust(widths[i]) if i == 0 else c.rjust(widths[i])
                         for i, c in enumerate(r))

    lines = [line(headers), "  ".join("-" * w for w in widths)] + [line(r) for r in body]
    lines.append("* best per column")
    return "\n".join(lines)


def _display(v, scale: float, fmt: str) -> str | None:
    if v is None:
        return None
    return format(int(v), fmt) if fmt == "d" else format(float(v) * scale, fmt)


# ---- files ------------------------------------------------------------------------------------

def _write_csv(path: Path, columns: Sequence[str], rows) -> Path:
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(columns)
        for row in rows:
            w.writerow([_cell(v) for v in row])
    return path


def _cell(v):
    if v is None:
        return ""
    if isinstance(v, float):
        return f"{v:.12g}"    # drop float noise such as 0.19999999999999996
    return v


def _file_safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name) or "policy"
