"""Factory helpers for hand-built RunResults (vLLM-style small fixtures)."""
from __future__ import annotations

from lemix.types import (OpKind, OpRecord, RequestRecord, RunResult, TrainStepRecord,
                         TrainTaskRecord)


def req(task_id: int, arrival_s: float, first_token_s: float | None = None,
        finish_s: float | None = None, *, output_tokens: int = 4, slo_s: float = 1.0,
        failed: bool = False, node: int = 0, **kw) -> RequestRecord:
    return RequestRecord(task_id=task_id, arrival_s=arrival_s, node=node, prompt_tokens=16,
                         output_tokens=output_tokens, first_token_s=first_token_s,
                         finish_s=finish_s, slo_s=slo_s, failed=failed, **kw)


def task(task_id: int, arrival_s: float, finish_s: float | None = None, *, samples: int = 4,
         tokens: int = 512, failed: bool = False, node: int = 0, **kw) -> TrainTaskRecord:
    return TrainTaskRecord(task_id=task_id, arrival_s=arrival_s, node=node, finish_s=finish_s,
                           samples=samples, tokens=tokens, failed=failed, **kw)


def op(node: int, stage: int, start_s: float, end_s: float, *, kind: OpKind = OpKind.FWD,
       train: bool = False, batch_id: int = 0, task_ids: tuple[int, ...] = (1,),
       predicted_s: float = 0.0) -> OpRecord:
    return OpRecord(node=node, stage=stage, kind=kind, start_s=start_s, end_s=end_s,
                    batch_id=batch_id, task_ids=task_ids, train=train, predicted_s=predicted_s)


def step(node: int, step_no: int, time_s: float, loss: float | None = None, *,
         samples: int = 4, tokens: int = 512) -> TrainStepRecord:
    return TrainStepRecord(node=node, step=step_no, time_s=time_s, samples=samples,
                           tokens=tokens, loss=loss)


def make_result(policy: str = "test", *, requests=(), train_tasks=(), ops=(), train_steps=(),
                nodes: int = 1, stages: int = 1, **kw) -> RunResult:
    return RunResult(policy=policy, requests=list(requests), train_tasks=list(train_tasks),
                     ops=list(ops), train_steps=list(train_steps), nodes=nodes, stages=stages,
                     **kw)


def mixed_result(policy: str = "mixed") -> RunResult:
    """The scenario the summary tests pin (numbers worked out in test_metrics_summary.py)."""
    return make_result(
        policy,
        nodes=2, stages=2,
        requests=[
            req(1, 1.0, 1.2, 1.5, output_tokens=4, inference_loss=2.0),          # met
            req(2, 2.0, 2.5, 4.0, output_tokens=6, staleness_steps=2, staleness_s=1.0,
                inference_loss=3.0, weight_version=3),                            # too slow
            req(3, 3.0, 3.1, 3.4, output_tokens=1, staleness_steps=1, staleness_s=0.5),  # met
            req(4, 4.0),                                                          # unfinished
            req(5, 5.0, 5.1, 9.0, failed=True, staleness_steps=10, error="oom"),  # failed
        ],
        train_tasks=[
            task(10, 0.0, None, failed=True, error="dropped"),
            task(11, 1.5, 8.0, samples=4, tokens=512, node=1),
            task(12, 2.0, None),
        ],
        ops=[
            op(0, 0, 1.0, 2.0), op(0, 1, 2.0, 5.0, kind=OpKind.DECODE),
            op(1, 0, 2.0, 3.0, train=True, task_ids=(11,)),
            op(1, 1, 3.0, 4.0, kind=OpKind.BWD, train=True, task_ids=(11,)),
        ],
        train_steps=[step(1, 2, 8.0, 1.0), step(1, 3, 9.0, None), step(1, 1, 5.0, 2.0)],
        decision_us=[40.0, 10.0, 30.0, 20.0],
        deferred_total=3, offload_events=2, wall_s=1.25,
    )
