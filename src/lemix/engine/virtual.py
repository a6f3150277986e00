"""The virtual-clock engine (`lemix run --clock virtual`): the real model's learning on the
schedule of a modeled cluster.

The simulator's event loop (lemix.sim.Simulator) drives the scheduler with a SimClock and op
durations drawn exactly as `lemix simulate` draws them (the profile in use, the same seeded
noise). This executor rides along and computes every op on the real stage workers, in event
order: forwards, backwards, optimizer steps, KV cache, offload/reload, weight copies and merges.
Real outcomes feed back where they decide the schedule: a sequence that generated EOS stops
(OpResult.stopped_task_ids). So with EOS stops off (the engine's `ignore_eos`, or prefill mode) the schedule
is the simulator's op for op, and the served loss is what the real model computes on it.

Why it is reproducible on any machine under any load: wall time decides nothing. Every command
is submitted from the loop's thread in event order (each worker runs its inbox in order), and a
reply is read only when the loop reaches the end of its op, however long the worker took.
Replies of ops that run concurrently on other workers wait in a buffer until their own end.

Weight copies: a SYNC reads its sources (GetWeights) when it starts and writes the receiver
(SetWeights) when it ends, so a copy or merge becomes visible at its modeled end time; the
averaged copies are summed in node order, never in reply order.
"""
from __future__ import annotations

import queue
from dataclasses import replace
from typing import Any, Callable

from lemix.engine.backend import EngineError, WorkerLost
from lemix.engine.messages import GetWeights, SetWeights
from lemix.engine.outcomes import average_weights
from lemix.engine.runtime import Engine
from lemix.engine.tags import FreeTag, GatherTag, OpTag
from lemix.clock import SimClock
from lemix.sched.latency import LatencyModel, Profile
from lemix.sim import DEFAULT_NOISE, Simulator
from lemix.types import Op, OpKind, OpResult, Outputs, RunResult, Task

REPLY_TIMEOUT_S = 900.0   # a worker silent this long is hung: fail the run instead of waiting forever


class VirtualEngine:
    """Executes one policy run of `engine` (built with a SimClock) on the simulator's schedule;
    `profile` is the truth op durations are drawn from (the one the engine's scheduler got)."""

    def __init__(self, engine: Engine, profile: Profile, *, noise: float = DEFAULT_NOISE) -> None:
        if not isinstance(engine.clock, SimClock):
            raise ValueError("the virtual-clock engine needs an Engine built with clock=SimClock()")
        self.eng = engine
        self.truth = LatencyModel(profile, calibrate=False)
        self.noise = noise
        self._replies: dict[Any, Any] = {}
        self._compute_s = 0.0

    def run(self, tasks: list[Task], *, progress: Callable[[int], None] | None = None,
            horizon_s: float = float("inf")) -> RunResult:
        eng = self.eng
        sim = Simulator(eng.sched, eng.clock, self.truth, noise=self.noise, seed=eng.params.seed,
                        horizon_s=horizon_s, executor=self)
        try:
            sim.run(tasks, progress)
        finally:
            eng.backend.shutdown()
        result = eng.result()
        result.extras.pop("compute_fraction", None)   # compute over modeled busy time: meaningless here
        result.extras["clock"] = "virtual"
        result.extras["compute_wall_s"] = self._compute_s
        return result

    # ------------------------------------------------------------------ OpExecutor
    def arrive(self, task: Task) -> None:
        self.eng.admit(task)

    def take(self, out: Outputs | None) -> None:
        self.eng.take(out)

    def start(self, op: Op) -> None:
        eng = self.eng
        if op.kind is OpKind.SYNC:   # read the sources now; the receiver is written at the end
            for n in self._sources(op):
                eng.backend.submit(n, op.stage, GetWeights(), GatherTag(op.op_id, n))
            return
        eng.backend.submit(op.node, op.stage, eng.command(op), OpTag(op.op_id))

    def finish(self, op: Op, result: OpResult) -> OpResult:
        eng = self.eng
        if op.kind is OpKind.SYNC:
            copies = [(n, self._reply(GatherTag(op.op_id, n), op)) for n in self._sources(op)]
            if op.sync.round:
                state = eng.merges.result(op, {n: res.state_dict for n, res in copies})
            elif op.sync.average:
                state = average_weights([(op.sync.mix[n], res.state_dict) for n, res in copies])
            else:
                state = copies[0][1].state_dict
            eng.backend.submit(op.node, op.stage, SetWeights(state), OpTag(op.op_id))
        res = self._reply(OpTag(op.op_id), op)
        self._compute_s += getattr(res, "compute_s", 0.0)
        return replace(result, stopped_task_ids=eng.absorb(op, res, result.end_s))

    def _sources(self, op: Op) -> tuple[int, ...]:
        return self.eng.merges.sources(op) if op.sync.round else op.sync.sources(op.node)

    # ------------------------------------------------------------------ replies
    def _reply(self, tag: Any, op: Op) -> Any:
        """Wait for the reply tagged `tag`; buffer the others (their ops end later)."""
        while tag not in self._replies:
            try:
                got, res = self.eng.backend.completions.get(timeout=REPLY_TIMEOUT_S)
            except queue.Empty:
                raise EngineError(f"no reply from node {op.node} stage {op.stage} for {op.kind.value} "
                                  f"in {REPLY_TIMEOUT_S:g} s") from None
            if isinstance(res, WorkerLost):
                raise EngineError(f"{res}: the virtual clock does not model node failures "
                                  f"(use --clock wall for recovery)") from res
            if isinstance(got, FreeTag):   # auxiliary: must not fail silently
                if isinstance(res, Exception):
                    raise EngineError(f"auxiliary command {got} failed: {res!r}") from res
                continue
            self._replies[got] = res
        res = self._replies.pop(tag)
        if isinstance(res, Exception):
            raise EngineError(f"{op.kind.value} on node {op.node} stage {op.stage} (tasks {op.task_ids}) "
                              f"failed: {res!r}") from res
        return res
