"""Chrome trace ("traceEvents" JSON) of the executed ops, for Perfetto or chrome://tracing.

One process per node (pid = node, named "node N") and one thread per pipeline stage
(tid = stage, named "stage S"); every op is a complete event ("ph": "X") with ts/dur in
microseconds. Training ops and inference ops get different `cname` colors. The simulator and
the real engine both produce OpRecords, so their timelines open side by side in one viewer.

Several policies can share one file: policy i (i > 0) uses pids offset by i * PID_STRIDE and
process names "node N (policy)"; a single policy keeps pid == node.
"""
from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

from lemix.types import OpRecord, RunResult

__all__ = ["chrome_trace", "combined_trace", "write_timeline", "PID_STRIDE", "TRAIN_CNAME",
           "INFER_CNAME"]

PID_STRIDE = 1000
# Reserved color names of the trace viewer's palette.
TRAIN_CNAME = "thread_state_running"   # green
INFER_CNAME = "rail_response"          # blue


def chrome_trace(result: RunResult, *, policy: str | None = None, max_events: int | None = None,
                 pid_base: int = 0) -> dict:
    """Trace dict for one run. `max_events` keeps the earliest-starting ops (metadata excluded)."""
    ops = sorted(result.ops, key=lambda o: (o.start_s, o.node, o.stage))
    kept = ops if max_events is None else ops[:max(0, max_events)]
    events = _metadata(result, kept, policy, pid_base)
    events.extend(_op_event(op, policy, pid_base) for op in kept)
    trace = {"traceEvents": events, "displayTimeUnit": "ms",
             "otherData": {"policy": policy if policy is not None else result.policy,
                           "ops_total": len(ops), "ops_written": len(kept),
                           "truncated": len(kept) < len(ops)}}
    return trace


def combined_trace(results: Sequence[RunResult], *, labels: Sequence[str] | None = None,
                   max_events: int | None = None) -> dict:
    """One trace holding every run; `max_events` caps each run separately."""
    labels = list(labels) if labels is not None else [r.policy for r in results]
    if len(labels) != len(results):
        raise ValueError("one label per result")
    events: list[dict] = []
    other: dict = {}
    for i, (res, label) in enumerate(zip(results, labels)):
        t = chrome_trace(res, policy=label if len(results) > 1 else None,
                         max_events=max_events, pid_base=i * PID_STRIDE)
        events.extend(t["traceEvents"])
        other[label] = t["otherData"]
    return {"traceEvents": events, "displayTimeUnit": "ms", "otherData": other}


def write_timeline(path: Path, results: Sequence[RunResult], *,
                   labels: Sequence[str] | None = None, max_events: int | None = 50_000) -> Path:
    """The Chrome trace of every run; each keeps its first `max_events` ops (about 10 MB per run
    at most; `otherData` says how many were written of how many)."""
    path = Path(path)
    trace = combined_trace(results, labels=labels, max_events=max_events)
    path.write_text(json.dumps(trace, separators=(",", ":"), allow_nan=False))
    return path


# ---- events -----------------------------------------------------------------------------------

def _metadata(result: RunResult, ops: Sequence[OpRecord], policy: str | None,
              pid_base: int) -> list[dict]:
    # Name every device of the cluster, plus any device an op ran on (so no track is anonymous).
    devices = {(n, s) for n in range(result.nodes) for s in range(result.stages)}
    devices |= {(op.node, op.stage) for op in ops}
    suffix = f" ({policy})" if policy else ""
    events: list[dict] = []
    for node in sorted({n for n, _ in devices}):
        pid = pid_base + node
        events.append({"name": "process_name", "ph": "M", "pid": pid, "tid": 0,
                       "args": {"name": f"node {node}{suffix}"}})
        events.append({"name": "process_sort_index", "ph": "M", "pid": pid, "tid": 0,
                       "args": {"sort_index": pid}})
    for node, stage in sorted(devices):
        pid = pid_base + node
        events.append({"name": "thread_name", "ph": "M", "pid": pid, "tid": stage,
                       "args": {"name": f"stage {stage}"}})
        events.append({"name": "thread_sort_index", "ph": "M", "pid": pid, "tid": stage,
                       "args": {"sort_index": stage}})
    return events


def _op_event(op: OpRecord, policy: str | None, pid_base: int) -> dict:
    kind = getattr(op.kind, "value", str(op.kind))
    args: dict = {"task_ids": list(op.task_ids), "train": bool(op.train),
                  "predicted_s": float(op.predicted_s), "batch_id": int(op.batch_id)}
    if op.layers:   # a training chunk (or a run of chunks: their inner boundaries)
        args["layers"] = list(op.layers)
        if op.cuts:
            args["cuts"] = list(op.cuts)
    if policy:
        args["policy"] = policy
    return {
        "name": f"{kind} b{op.batch_id}",
        "cat": "train" if op.train else "infer",
        "ph": "X",
        "ts": _us(op.start_s),
        "dur": max(0.0, _us(op.end_s - op.start_s)),
        "pid": pid_base + op.node,
        "tid": op.stage,
        "cname": TRAIN_CNAME if op.train else INFER_CNAME,
        "args": args,
    }


def _us(seconds: float) -> float:
    return round(seconds * 1e6, 3)   # ns resolution keeps files short
