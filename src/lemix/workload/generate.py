"""Build the whole task list of a run: inference requests plus training micro-batches.

Semantics (the paper's "retraining rate" is `train_share`):

- arrival='poisson' / 'gamma': `rate_per_s` is the TOTAL task rate over [0, duration_s). Each
  arrival is a training task with probability `train_share`, otherwise an inference request.
- arrival='trace': the trace's requests are the inference tasks (with the trace's lengths unless
  a `length_model` is given). Training tasks arrive as a Poisson process at rate
  r_inf * share / (1 - share) over the trace's span, so that they are `share` of all tasks in
  expectation; r_inf = len(trace) / trace.span_s.
- `train_rate_per_s` instead of `train_share`: every arrival of the chosen process is inference,
  and training arrives as an independent Poisson process at that rate. Giving both is an error.

Random draws happen in a fixed order (arrivals, kinds, training arrivals, lengths, training
lengths, priorities), so one seed gives one task list.
"""
from __future__ import annotations

import math
import numbers

import numpy as np

from lemix.types import Task, TaskKind
from lemix.workload.arrivals import gamma_arrivals, poisson_arrivals
from lemix.workload.lengths import LengthModel, LognormalLengths
from lemix.workload.trace import Trace

ARRIVALS = ("poisson", "gamma", "trace")


def _share(name: str, value: float | None, upper_open: bool) -> float | None:
    if value is None:
        return None
    try:
        x = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a number, got {value!r}") from None
    ok = 0.0 <= x < 1.0 if upper_open else 0.0 <= x <= 1.0
    if not (math.isfinite(x) and ok):
        interval = "[0, 1)" if upper_open else "[0, 1]"
        raise ValueError(f"{name} must be in {interval}, got {value!r}")
    return x


def _check_args(arrival: str, rate_per_s, duration_s, burstiness, trace) -> None:
    if arrival not in ARRIVALS:
        raise ValueError(f"arrival must be one of {ARRIVALS}, got {arrival!r}")
    if arrival == "trace":
        if trace is None:
            raise ValueError("arrival='trace' needs a trace (see read_trace)")
        if rate_per_s is not None or duration_s is not None:
            raise ValueError("with arrival='trace' the trace sets the rate and duration; "
                             "window or speed it up with read_trace(start_s=, duration_s=, speedup=)")
    else:
        if trace is not None:
            raise ValueError(f"a trace was given but arrival={arrival!r}; use arrival='trace'")
        if rate_per_s is None or duration_s is None:
            raise ValueError(f"arrival={arrival!r} needs rate_per_s and duration_s")
    if arrival != "gamma" and burstiness != 1.0:
        raise ValueError(f"burstiness applies to arrival='gamma' only, got {burstiness!r} "
                         f"with arrival={arrival!r}")


def _train_lengths(spec: int | LengthModel, n: int, rng: np.random.Generator) -> np.ndarray:
    if isinstance(spec, (int, np.integer)) and not isinstance(spec, bool):
        if spec < 1:
            raise ValueError(f"train_seq_tokens must be >= 1, got {spec!r}")
        return np.full(n, int(spec), dtype=np.int64)
    if isinstance(spec, LengthModel):
        return spec.sample(n, rng)[0]
    raise ValueError(f"train_seq_tokens must be an int or a length model, got {spec!r}")


def make_tasks(
    *,
    rng: np.random.Generator,
    arrival: str = "poisson",
    rate_per_s: float | None = None,
    duration_s: float | None = None,
    burstiness: float = 1.0,
    trace: Trace | None = None,
    length_model: LengthModel | None = None,
    train_share: float | None = None,
    train_rate_per_s: float | None = None,
    train_batch_size: int = 8,
    train_seq_tokens: int | LengthModel = 256,
    priority_share: float = 0.0,
) -> list[Task]:
    """All tasks of a run, sorted by arrival (inference first on ties), task_id = position.

    `length_model` (default `LognormalLengths()`) gives inference lengths; with a trace it
    replaces the trace's own lengths. Training tasks are TRAIN with batch_size=train_batch_size,
    prompt_tokens = sequence length (an int, or the prompt side of a length model's sample) and
    output_tokens=0. A `priority_share` fraction of inference requests get priority 1.
    """
    if not isinstance(rng, np.random.Generator):
        raise ValueError(f"rng must be a numpy.random.Generator, got {type(rng).__name__}")
    _check_args(arrival, rate_per_s, duration_s, burstiness, trace)
    if train_share is not None and train_rate_per_s is not None:
        raise ValueError("give train_share or train_rate_per_s, not both")
    share = _share("train_share", train_share, upper_open=(arrival == "trace"))
    if train_rate_per_s is not None and not (
        isinstance(train_rate_per_s, numbers.Real) and not isinstance(train_rate_per_s, bool)
        and math.isfinite(train_rate_per_s) and train_rate_per_s >= 0
    ):
        raise ValueError(f"train_rate_per_s must be a finite number >= 0, got {train_rate_per_s!r}")
    prio_share = _share("priority_share", priority_share, upper_open=False)
    if isinstance(train_batch_size, bool) or not isinstance(train_batch_size, (int, np.integer)) \
            or train_batch_size < 1:
        raise ValueError(f"train_batch_size must be an integer >= 1, got {train_batch_size!r}")

    # Phase 1: arrival times of inference and training tasks.
    if arrival == "trace":
        assert trace is not None
        infer_t = np.asarray(trace.arrival_s, dtype=np.float64)
        span = trace.span_s
        train_rate = train_rate_per_s
        if share:
            train_rate = trace.rate_per_s * share / (1.0 - share)
        train_t = (poisson_arrivals(train_rate, span, rng) if train_rate
                   else np.empty(0, dtype=np.float64))
    else:
        if arrival == "poisson":
            times = poisson_arrivals(rate_per_s, duration_s, rng)
        else:
            times = gamma_arrivals(rate_per_s, burstiness, duration_s, rng)
        if share is not None:
            is_train = rng.random(len(times)) < share
            infer_t, train_t = times[~is_train], times[is_train]
        else:
            infer_t = times
            train_t = (poisson_arrivals(train_rate_per_s, duration_s, rng)
                       if train_rate_per_s is not None else np.empty(0, dtype=np.float64))

    # Phase 2: lengths and priorities.
    if arrival == "trace" and length_model is None:
        assert trace is not None
        prompt, output = trace.prompt_tokens, trace.output_tokens
    else:
        prompt, output = (length_model or LognormalLengths()).sample(len(infer_t), rng)
    train_len = _train_lengths(train_seq_tokens, len(train_t), rng)
    priority = (rng.random(len(infer_t)) < prio_share).astype(np.int64) if prio_share \
        else np.zeros(len(infer_t), dtype=np.int64)

    # Phase 3: merge by time (inference before training on ties) and number in that order.
    n_inf = len(infer_t)
    times = np.concatenate([infer_t, train_t])
    kinds = np.concatenate([np.zeros(n_inf, dtype=np.int8), np.ones(len(train_t), dtype=np.int8)])
    order = np.lexsort((kinds, times))
    tasks: list[Task] = []
    for task_id, i in enumerate(order):
        if i < n_inf:
            tasks.append(Task(task_id=task_id, kind=TaskKind.INFER, arrival_s=float(times[i]),
                              prompt_tokens=int(prompt[i]), output_tokens=int(output[i]),
                              priority=int(priority[i])))
        else:
            tasks.append(Task(task_id=task_id, kind=TaskKind.TRAIN, arrival_s=float(times[i]),
                              prompt_tokens=int(train_len[i - n_inf]), output_tokens=0,
                              batch_size=int(train_batch_size)))
    return tasks
