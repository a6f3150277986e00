"""Prediction fidelity: run the same workload on the real engine and in the simulator with a
profile, and measure how far the predictions are from what happened.

- Per op: the profile's uncalibrated prediction for the op's shape vs its measured duration.
- Per request: simulated vs measured end-to-end latency and TTFT, matched by task id (same seed,
  same arrivals).
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from lemix.sched.latency import LatencyModel, Profile
from lemix.types import OpKind, RunResult

_TIMED = (OpKind.FWD, OpKind.BWD, OpKind.DECODE, OpKind.OPTIM)


def _errors(pred: np.ndarray, meas: np.ndarray) -> dict:
    if len(meas) == 0:
        return {"n": 0, "mape": None, "abs_err_p50_s": None, "abs_err_p90_s": None}
    abs_err = np.abs(pred - meas)
    return {"n": int(len(meas)), "mape": float(np.mean(abs_err / np.maximum(meas, 1e-9))),
            "abs_err_p50_s": float(np.percentile(abs_err, 50)), "abs_err_p90_s": float(np.percentile(abs_err, 90))}


def op_pairs(real: RunResult, profile: Profile) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """(predicted, measured) durations per op kind, from the real run's op records."""
    model = LatencyModel(profile, calibrate=False)
    out: dict[str, tuple[list, list]] = {}
    for op in real.ops:
        if op.kind not in _TIMED:
            continue
        pred = model.predict(op.kind, op.stage, op.batch_size, op.seq_tokens, op.kv_tokens, op.bytes)
        p, m = out.setdefault(op.kind.value, ([], []))
        p.append(pred)
        m.append(op.end_s - op.start_s)
    return {k: (np.array(p), np.array(m)) for k, (p, m) in out.items()}


def request_pairs(real: RunResult, sim: RunResult, what: str) -> tuple[np.ndarray, np.ndarray]:
    """(simulated, measured) e2e or ttft seconds of requests finished in both runs."""
    got = {r.task_id: getattr(r, what) for r in sim.requests if getattr(r, what) is not None}
    pairs = [(got[r.task_id], getattr(r, what)) for r in real.requests
             if getattr(r, what) is not None and r.task_id in got]
    if not pairs:
        return np.zeros(0), np.zeros(0)
    sim_v, real_v = zip(*pairs)
    return np.array(sim_v), np.array(real_v)


def compare(real: RunResult, sim: RunResult, profile: Profile) -> dict:
    ops = op_pairs(real, profile)
    all_p = np.concatenate([p for p, _ in ops.values()]) if ops else np.zeros(0)
    all_m = np.concatenate([m for _, m in ops.values()]) if ops else np.zeros(0)
    e2e = request_pairs(real, sim, "e2e_s")
    ttft = request_pairs(real, sim, "ttft_s")
    report = {
        "policy": real.policy,
        "op": _errors(all_p, all_m),
        "op_by_kind": {k: _errors(p, m) for k, (p, m) in ops.items()},
        "e2e": _errors(*e2e),
        "ttft": _errors(*ttft),
    }
    report["op_mape"] = report["op"]["mape"]
    report["e2e_mape"] = report["e2e"]["mape"]
    report["ttft_mape"] = report["ttft"]["mape"]
    return report


def plot_validation(real: RunResult, sim: RunResult, profile: Profile, path: Path) -> Path:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(11, 4.5))
    ax1, ax2 = fig.subplots(1, 2)
    for kind, (p, m) in op_pairs(real, profile).items():
        ax1.scatter(m * 1e3, p * 1e3, s=8, alpha=0.5, label=kind)
    s, r = request_pairs(real, sim, "e2e_s")
    ax2.scatter(r * 1e3, s * 1e3, s=8, alpha=0.6, color="tab:purple")
    for ax, title in ((ax1, "per op: profile prediction vs measured"),
                      (ax2, "per request E2E: simulated vs measured")):
        lo, hi = ax.get_xlim()
        ax.plot([0, hi], [0, hi], color="gray", lw=1, ls="--")
        ax.set_xlabel("measured (ms)")
        ax.set_ylabel("predicted (ms)")
        ax.set_title(title)
    ax1.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return path


def write_validation(report: dict, out: Path) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    path = out / "validation.json"
    path.write_text(json.dumps(report, indent=2) + "\n")
    return path
