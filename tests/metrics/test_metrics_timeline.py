"""Chrome trace export: pids/tids, names, microsecond units, colors, cap."""
from __future__ import annotations

import json

from metrics_factory import make_result, mixed_result, op

from lemix.metrics.timeline import (INFER_CNAME, PID_STRIDE, TRAIN_CNAME, chrome_trace,
                                    write_timeline)
from lemix.types import OpKind


def _x(trace):
    return [e for e in trace["traceEvents"] if e["ph"] == "X"]


def _meta(trace, name):
    return {(e["pid"], e.get("tid")): e["args"] for e in trace["traceEvents"]
            if e["ph"] == "M" and e["name"] == name}


def test_processes_are_nodes_and_threads_are_stages():
    trace = chrome_trace(mixed_result())
    procs = _meta(trace, "process_name")
    assert {pid: a["name"] for (pid, _), a in procs.items()} == {0: "node 0", 1: "node 1"}
    threads = _meta(trace, "thread_name")
    assert threads == {(n, s): {"name": f"stage {s}"} for n in (0, 1) for s in (0, 1)}
    assert {(e["pid"], e["tid"]) for e in _x(trace)} == {(0, 0), (0, 1), (1, 0), (1, 1)}


def test_complete_events_in_microseconds_with_args_and_colors():
    res = make_result(nodes=1, stages=2, ops=[
        op(0, 1, 1.5, 1.75, kind=OpKind.BWD, train=True, batch_id=7, task_ids=(3, 4),
           predicted_s=0.2),
        op(0, 0, 0.001, 0.0015, kind=OpKind.DECODE, batch_id=2),
    ])
    ev = sorted(_x(chrome_trace(res, policy="lemix")), key=lambda e: e["ts"])
    assert [e["name"] for e in ev] == ["decode b2", "bwd b7"]
    assert ev[0]["ts"] == 1000.0 and ev[0]["dur"] == 500.0
    assert ev[1]["ts"] == 1_500_000.0 and ev[1]["dur"] == 250_000.0
    assert ev[1]["args"] == {"task_ids": [3, 4], "train": True, "predicted_s": 0.2,
                             "batch_id": 7, "policy": "lemix"}
    assert ev[1]["cname"] == TRAIN_CNAME and ev[0]["cname"] == INFER_CNAME
    assert ev[1]["cat"] == "train" and ev[0]["cat"] == "infer"
    assert (ev[1]["pid"], ev[1]["tid"]) == (0, 1)


def test_cap_keeps_earliest_ops():
    res = make_result(ops=[op(0, 0, float(t), t + 0.5, batch_id=t) for t in (5, 1, 3, 2, 4)])
    trace = chrome_trace(res, max_events=2)
    assert [e["name"] for e in _x(trace)] == ["fwd b1", "fwd b2"]
    assert trace["otherData"]["truncated"] is True
    assert trace["otherData"]["ops_total"] == 5 and trace["otherData"]["ops_written"] == 2
    assert len(_meta(trace, "process_name")) == 1     # metadata is not capped


def test_write_timeline_single_and_multi_policy(tmp_path):
    a, b = mixed_result("a"), mixed_result("b")
    single = json.loads(write_timeline(tmp_path / "one.json", [a]).read_text())
    assert {e["pid"] for e in _x(single)} == {0, 1}
    multi = json.loads(write_timeline(tmp_path / "two.json", [a, b]).read_text())
    assert {e["pid"] for e in _x(multi)} == {0, 1, PID_STRIDE, PID_STRIDE + 1}
    names = {pid: args["name"] for (pid, _), args in _meta(multi, "process_name").items()}
    assert names[PID_STRIDE + 1] == "node 1 (b)" and names[0] == "node 0 (a)"
    assert set(multi["otherData"]) == {"a", "b"}


def test_negative_duration_clamped_to_zero():
    ev = _x(chrome_trace(make_result(ops=[op(0, 0, 2.0, 1.0)])))
    assert ev[0]["dur"] == 0.0
