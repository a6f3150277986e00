"""Turn one RunResult into a flat dict of honest numbers (DESIGN.md section 6).

Definitions, in one place:

- window: [first arrival of any request or training task, last completion of any finished
  request or training task]; makespan_s is its length.
- completed: requests that finished and did not fail, as `vllm bench serve` counts them; every
  other request (failed, never finished) counts in `failed`. Training tasks have their own
  `train_completed` / `train_failed`.
- throughputs divide by the makespan: `request_throughput` completed requests, and
  `total_task_throughput` requests plus training tasks. `throughput_per_busy_node_span` is the
  research code's figure (completed tasks of both kinds / sum over nodes of that node's op span);
  it rewards idling nodes and is reported only as a secondary number.
- slo_attainment: requests that finished, did not fail and met their SLO / ALL requests.
- latencies (ms, vllm-bench names) over finished requests; percentiles interpolate linearly
  (numpy's default, as vllm does).
- adaptation (drifting workloads on the real model): lemix.metrics.adaptation.
- idle ratio: busy time per device (node, stage) is the union of its op intervals clipped to the
  window, so overlapping ops are not double counted and ops outside the window do not count.

Every value is a plain JSON type (floats to 12 significant digits); an undefined value is None,
never NaN.
"""
from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Iterable, Sequence

import numpy as np

from lemix.metrics.adaptation import adaptation_summary
from lemix.types import OpRecord, RequestRecord, RunResult, TrainTaskRecord

__all__ = ["summarize", "merged_busy_s", "LATENCY_STATS"]

# vllm-bench statistic prefixes and the percentile each one means.
LATENCY_STATS: tuple[tuple[str, float | None], ...] = (
    ("mean", None), ("median", 50.0), ("p90", 90.0), ("p99", 99.0),
)


def summarize(result: RunResult) -> dict:
    """All summary numbers of one run; see the module docstring for definitions."""
    reqs, tasks = result.requests, result.train_tasks
    done_reqs = [r for r in reqs if _request_done(r)]
    done_tasks = [t for t in tasks if _task_done(t)]
    t0, t1 = _window(reqs, tasks, done_reqs, done_tasks)
    makespan = None if t0 is None or t1 is None else max(0.0, t1 - t0)
    done = len(done_reqs) + len(done_tasks)

    out: dict = {
        "policy": result.policy,
        "nodes": int(result.nodes),
        "stages": int(result.stages),
        "requests_total": len(reqs),
        "train_tasks_total": len(tasks),
        "first_arrival_s": t0,
        "last_completion_s": t1,
        "makespan_s": makespan,
        "completed": len(done_reqs),
        "failed": len(reqs) - len(done_reqs),
        "train_completed": len(done_tasks),
        "train_failed": len(tasks) - len(done_tasks),
        "request_throughput": _rate(len(done_reqs), makespan),
        "total_task_throughput": _rate(done, makespan),
        "throughput_per_busy_node_span": _rate(done, _summed_node_spans(result.ops)),
        "slo_met": sum(1 for r in reqs if r.slo_met),
        "slo_attainment": (sum(1 for r in reqs if r.slo_met) / len(reqs)) if reqs else None,
    }
    out.update(_latency_stats(done_reqs))
    out.update(_training_stats(result, done_tasks, makespan))
    out.update(_idle_stats(result, t0, makespan))
    out.update(_serving_quality(reqs, done_reqs))
    shifts = result.extras.get("drift_shifts_s")
    if shifts and out["inference_loss_mean"] is not None:   # a drifting workload on the real model
        out.update(adaptation_summary(reqs, shifts))
    out.update({
        "offload_events": int(result.offload_events),
        "sched_decision_us_p50": _percentile(result.decision_us, 50.0),
        "sched_decision_us_p99": _percentile(result.decision_us, 99.0),
        "wall_s": float(result.wall_s),
    })
    out.update(result.extras)   # executor-specific figures (e.g. the engine's compute fraction)
    return {k: _plain(v) for k, v in out.items()}


# ---- phases -----------------------------------------------------------------------------------

def _latency_stats(done: Sequence[RequestRecord]) -> dict:
    ttft = [r.ttft_s * 1e3 for r in done if r.ttft_s is not None]
    e2el = [r.e2e_s * 1e3 for r in done if r.e2e_s is not None]
    # TPOT: time after the first token spread over the remaining output tokens.
    tpot = [(r.e2e_s - r.ttft_s) * 1e3 / (r.output_tokens - 1)
            for r in done
            if r.output_tokens > 1 and r.ttft_s is not None and r.e2e_s is not None]
    out: dict = {}
    for metric, values in (("ttft", ttft), ("tpot", tpot), ("e2el", e2el)):
        for stat, q in LATENCY_STATS:
            out[f"{stat}_{metric}_ms"] = _mean(values) if q is None else _percentile(values, q)
    return out


def _training_stats(result: RunResult, done_tasks: Sequence[TrainTaskRecord],
                    makespan: float | None) -> dict:
    # Samples/tokens of training tasks whose backward finished: the work actually done.
    losses = [s.loss for s in sorted(result.train_steps, key=lambda s: s.time_s)
              if s.loss is not None and math.isfinite(s.loss)]
    return {
        "train_samples": sum(t.samples for t in done_tasks),
        "train_tokens": sum(t.tokens for t in done_tasks),
        "train_samples_per_s": _rate(sum(t.samples for t in done_tasks), makespan),
        "train_tokens_per_s": _rate(sum(t.tokens for t in done_tasks), makespan),
        "train_steps": len(result.train_steps),
        "train_loss_last": losses[-1] if losses else None,
        "train_loss_mean": _mean(losses),
        "deferred_total": int(result.deferred_total),
    }


def _idle_stats(result: RunResult, t0: float | None, makespan: float | None) -> dict:
    nodes, stages = int(result.nodes), int(result.stages)
    if t0 is None or not makespan or nodes <= 0 or stages <= 0:
        return {"idle_ratio": None, "idle_ratio_per_stage": None}
    busy = merged_busy_s(result.ops, t0, t0 + makespan)
    for node, stage in busy:
        if not (0 <= node < nodes and 0 <= stage < stages):
            raise ValueError(f"op on device (node={node}, stage={stage}) outside the "
                             f"{nodes} x {stages} cluster of policy {result.policy!r}")
    per_stage = [0.0] * stages
    for (_, stage), b in busy.items():
        per_stage[stage] += b
    return {
        "idle_ratio": 1.0 - sum(per_stage) / (makespan * nodes * stages),
        "idle_ratio_per_stage": [1.0 - b / (makespan * nodes) for b in per_stage],
    }


def _serving_quality(reqs: Sequence[RequestRecord], done: Sequence[RequestRecord]) -> dict:
    losses = [r.inference_loss for r in reqs
              if r.inference_loss is not None and math.isfinite(r.inference_loss)]
    return {
        "inference_loss_mean": _mean(losses),
        "staleness_steps_mean": _mean([r.staleness_steps for r in done]),
        "staleness_s_mean": _mean([r.staleness_s for r in done]),
    }


# ---- building blocks --------------------------------------------------------------------------

def merged_busy_s(ops: Iterable[OpRecord], lo: float, hi: float) -> dict[tuple[int, int], float]:
    """Busy seconds per (node, stage): union of op intervals clipped to [lo, hi]."""
    by_device: dict[tuple[int, int], list[tuple[float, float]]] = defaultdict(list)
    for op in ops:
        s, e = max(op.start_s, lo), min(op.end_s, hi)
        if e > s:
            by_device[(op.node, op.stage)].append((s, e))
    busy: dict[tuple[int, int], float] = {}
    for dev, spans in by_device.items():
        spans.sort()
        total, cur_s, cur_e = 0.0, spans[0][0], spans[0][1]
        for s, e in spans[1:]:
            if s > cur_e:          # gap: close the current merged interval
                total += cur_e - cur_s
                cur_s, cur_e = s, e
            else:
                cur_e = max(cur_e, e)
        busy[dev] = total + (cur_e - cur_s)
    return busy


def _request_done(r: RequestRecord) -> bool:
    return not r.failed and r.finish_s is not None


def _task_done(t: TrainTaskRecord) -> bool:
    return not t.failed and t.finish_s is not None


def _window(reqs, tasks, done_reqs, done_tasks) -> tuple[float | None, float | None]:
    arrivals = [r.arrival_s for r in reqs] + [t.arrival_s for t in tasks]
    finishes = [r.finish_s for r in done_reqs] + [t.finish_s for t in done_tasks]
    t0 = min(arrivals) if arrivals else None
    t1 = max(finishes) if finishes else None
    return t0, t1


def _summed_node_spans(ops: Sequence[OpRecord]) -> float | None:
    first: dict[int, float] = {}
    last: dict[int, float] = {}
    for op in ops:
        first[op.node] = min(first.get(op.node, op.start_s), op.start_s)
        last[op.node] = max(last.get(op.node, op.end_s), op.end_s)
    return sum(last[n] - first[n] for n in first) if first else None


def _rate(count: float, seconds: float | None) -> float | None:
    return None if not seconds or seconds <= 0 else count / seconds


def _mean(values: Sequence[float]) -> float | None:
    return float(np.mean(values)) if len(values) else None


def _percentile(values: Sequence[float], q: float) -> float | None:
    return float(np.percentile(np.asarray(values, dtype=float), q)) if len(values) else None


def _plain(v):
    """numpy scalars -> Python; NaN/inf -> None; lists recursively."""
    if isinstance(v, (list, tuple)):
        return [_plain(x) for x in v]
    if isinstance(v, (bool, np.bool_)):
        return bool(v)
    if isinstance(v, (int, np.integer)):
        return int(v)
    if isinstance(v, (float, np.floating)):
        f = float(v)
        # 12 significant digits: drops float noise (199.99999999999994), keeps every real digit.
        return float(f"{f:.12g}") if math.isfinite(f) else None
    return v
