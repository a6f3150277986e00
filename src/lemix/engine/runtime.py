"""The torch executor: runs the scheduler's ops on real stage workers.

The same Scheduler object the simulator drives is driven here with a WallClock: arrivals are
replayed in real time, each planned op becomes a command message to the worker of its
(node, stage), and each worker's reply becomes an OpResult with the measured start and end.
Activations and gradients travel between stages through this driver, as messages.
"""
from __future__ import annotations

import queue
import threading
import time
from collections import deque
from dataclasses import dataclass, replace
from typing import Any, Callable

import torch

from lemix.clock import Clock, WallClock
from lemix.engine.backend import Backend, EngineError, WorkerLost
from lemix.engine.data import TaskTexts, TaskTokens
from lemix.engine.merges import StaggeredMerges
from lemix.engine.messages import (Backward, Decode, Forward, Free, GetWeights, Offload, Reload,
                                   SamplingParams, SetWeights, Step)
from lemix.engine.outcomes import Listener, average_weights, step_losses
from lemix.engine.recovery import Recovery
from lemix.engine.stage import split_stages
from lemix.engine.tags import SUBMIT, FetchTag, FreeTag, GatherTag, OpTag, SubmitTag
from lemix.sched.latency import Profile
from lemix.sched.params import SchedParams
from lemix.sched.scheduler import Scheduler
from lemix.types import ClusterSnapshot, Event, EventKind, Op, OpKind, OpRecord, OpResult, Outputs, RunResult, Task

__all__ = ["Engine", "EngineError", "Listener"]


RECENT_OPS = 20_000   # ended ops the engine keeps for live metrics (idle ratios, step spans)
RECORD_WINDOW_S = 120.0   # keep_records=False: training losses kept this far back


@dataclass
class _Flight:
    op: Op
    start_s: float


class Engine:
    """One policy run on real model stages (build a fresh Engine per run). A worker that dies
    takes its node out until it is restarted (its Recovery, lemix.engine.recovery)."""

    def __init__(self, params: SchedParams, profile: Profile, hf_model: torch.nn.Module, tokenizer,
                 texts: TaskTexts, backend: Backend, *, devices: list[str], lr: float = 3e-4,
                 weight_decay: float = 0.0, memory_budget_bytes: int | None = None, strict: bool = True,
                 sampling: Callable[[Task], SamplingParams | None] | None = None,
                 listener: Listener | None = None, clock: Clock | None = None,
                 ignore_eos: bool = False, keep_records: bool = True) -> None:
        """keep_records=False (a long-running server with a listener): records are handed to the
        listener and not kept; the scheduler and the engine drop every per-task entry once a
        task's record is final, and keep training losses of the last RECORD_WINDOW_S only."""
        self.params = params
        self.keep_records = keep_records
        # workers first: starting them (Ray actors take seconds) must not count as run time
        nodes = [split_stages(hf_model, params.stages) for _ in range(params.nodes)]
        backend.start(nodes, devices, lr=lr, weight_decay=weight_decay, memory_budget_bytes=memory_budget_bytes)
        self.clock = clock or WallClock()   # the virtual-clock engine passes the simulator's SimClock
        try:
            self.sched = Scheduler(params, profile, self.clock, timer=time.perf_counter,
                                   keep_records=keep_records)
        except Exception:
            backend.shutdown()
            raise
        self.tok = tokenizer
        self.texts = texts
        self.backend = backend
        self.strict = strict
        self.ignore_eos = ignore_eos
        self._sampling_fn = sampling or (lambda task: None)
        self.loss_scale = 1.0 / max(1, params.microbatches)
        self._tasks: dict[int, Task] = {}
        self._flights: dict[int, _Flight] = {}
        self._acts: dict[tuple[int, int], torch.Tensor] = {}      # (batch, stage) -> input hidden
        self._grads: dict[tuple[int, int], torch.Tensor] = {}     # (batch, stage) -> grad of output
        self._ids: dict[int, tuple[torch.Tensor, tuple[int, ...]]] = {}   # batch -> (ids, lengths)
        self.generated: dict[int, list[int]] = {}
        self.inference_loss: dict[int, float] = {}
        self._train_losses: list[tuple[int, float, float]] = []   # (node, time, loss)
        self._compute_s = 0.0
        self._busy_s = 0.0
        self.listener = listener
        self._gather: dict[int, tuple[int, list]] = {}            # merge op -> (copies, got: (node, weights))
        self.merges = StaggeredMerges()                           # staggered merges' deltas
        self.recent_ops: deque[OpRecord] = deque(maxlen=RECENT_OPS)   # for live metrics (serve)
        self.last_snapshot: ClusterSnapshot = self.sched.snapshot()     # ... taken on the engine thread
        self._stop_requested: set[int] = set()
        self._sampling: dict[int, SamplingParams] = {}
        self._resolved = 0                        # tasks resolved since run() last told its progress
        self._streamed: dict[int, int] = {}       # task -> tokens already given to the listener
        self.recovery = Recovery(self.sched, backend, self.clock, stages=params.stages, initial_model=hf_model,
                                 strict=strict, take=self._take, lost=self._node_lost)

    # ------------------------------------------------------------------ main loops
    def run(self, tasks: list[Task], *, progress: Callable[[int], None] | None = None,
            horizon_s: float = float("inf")) -> RunResult:
        """Offline: replay `tasks` at their arrival times (seconds from now) until all resolve."""
        tasks = sorted(tasks, key=lambda t: (t.arrival_s, t.task_id))
        nxt = 0
        try:
            while True:
                now = self.clock.now()
                while nxt < len(tasks) and tasks[nxt].arrival_s <= now:
                    self._arrive(tasks[nxt])
                    nxt += 1
                if progress and self._resolved:   # tasks done (finished or failed), not arrivals
                    progress(self._resolved)
                    self._resolved = 0
                wakeup = self._plan()
                restoring = self.recovery.restore_deadline()
                if nxt == len(tasks) and not self._flights and (self.sched.idle or wakeup is None) \
                        and restoring == float("inf"):   # no node is being restored
                    break
                if now > horizon_s:
                    break
                wake = min(tasks[nxt].arrival_s if nxt < len(tasks) else float("inf"),
                           wakeup if wakeup is not None else float("inf"), restoring)
                if not self._flights and wake == float("inf"):
                    break  # nothing can happen any more; finalize counts the rest as unfinished
                self._wait(None if wake == float("inf") else max(0.0, wake - self.clock.now()))
        finally:
            self.backend.shutdown()
        return self._result()

    def submit(self, task: Task, tokens: TaskTokens, sampling: SamplingParams | None = None) -> None:
        """Online, thread-safe: offer a task (arrival_s should be self.clock.now())."""
        self.backend.completions.put((SUBMIT, (task, tokens, sampling)))

    def serve(self, stop: threading.Event, *, drain: bool = True, poll_s: float = 0.5) -> RunResult:
        """Online: run until `stop` is set (then, with drain, until in-flight work resolves)."""
        try:
            while True:
                wakeup = self._plan()
                if stop.is_set() and (not drain or (not self._flights and self.sched.idle)):
                    break
                timeout = poll_s if wakeup is None else min(poll_s, max(0.0, wakeup - self.clock.now()))
                self._wait(timeout)
        finally:
            self.backend.shutdown()
        return self._result()

    def snapshot(self) -> ClusterSnapshot:
        """The scheduler's read-only picture (node health, versions, quiescence); engine thread."""
        return self.sched.snapshot()

    def _arrive(self, task: Task) -> None:
        self.admit(task)
        self._take(self.sched.on_arrival(task))

    # what another driver of the same scheduler (lemix.engine.virtual) uses
    def admit(self, task: Task) -> None:
        """Get `task` ready to run: its tokens, before it competes for devices."""
        self.texts.tokens(task)
        self._tasks[task.task_id] = task

    def command(self, op: Op) -> Any:
        """The worker command of a (non-SYNC) op."""
        return self._command(op)

    def absorb(self, op: Op, res: Any, end: float) -> tuple[int, ...]:
        """Keep what the next stage needs from an op's reply; the sequences that stopped."""
        return self._absorb(op, res, end)

    def take(self, out: Outputs | None) -> None:
        self._take(out)

    def result(self) -> RunResult:
        return self._result()

    def _plan(self) -> float | None:
        plan = self.sched.plan()
        self._take(plan.outputs)
        for op in plan.ops:
            self._launch(op)
        if self.listener is not None:   # other threads (metrics scrapes) read this copy
            self.last_snapshot = self.sched.snapshot()
        return plan.wakeup_s

    def _wait(self, timeout: float | None) -> None:
        try:
            tag, res = self.backend.completions.get(timeout=timeout)
        except queue.Empty:
            return
        self._complete(tag, res)
        while True:  # absorb everything that is already done before planning again
            try:
                tag, res = self.backend.completions.get_nowait()
            except queue.Empty:
                return
            self._complete(tag, res)

    # ------------------------------------------------------------------ ops -> commands
    def sampling(self, task: Task) -> SamplingParams | None:
        return self._sampling.get(task.task_id) or self._sampling_fn(task)

    def _launch(self, op: Op) -> None:
        self._flights[op.op_id] = _Flight(op, self.clock.now())
        if op.kind is OpKind.SYNC and op.sync.average:   # gather the copies, then average
            sources = self.merges.sources(op) if op.sync.round else op.sync.sources(op.node)
            nodes = [n for n in sources if n not in self.recovery.down]
            self._gather[op.op_id] = (len(nodes), [])
            for n in nodes:
                self.backend.submit(n, op.stage, GetWeights(), GatherTag(op.op_id, n))
            return
        if op.kind is OpKind.SYNC:  # fetch the source stage's weights first, then overwrite
            self.backend.submit(op.sync.source, op.stage, GetWeights(), FetchTag(op.op_id))
            return
        self.backend.submit(op.node, op.stage, self._command(op), OpTag(op.op_id))

    def _maybe_average(self, op_id: int) -> None:
        """Once every expected copy arrived: overwrite the stage with their weighted average."""
        want, got = self._gather[op_id]
        if not got or len(got) < want:
            return
        del self._gather[op_id]
        op = self._flights[op_id].op
        if op.sync.round:
            state = self.merges.result(op, dict(got))
        else:
            state = average_weights([(op.sync.mix[n], sd) for n, sd in got])
        self.backend.submit(op.node, op.stage, SetWeights(state), OpTag(op.op_id))

    def _command(self, op: Op) -> Any:
        last = op.stage == self.params.stages - 1
        if op.kind is OpKind.FWD:
            return self._forward(op, last)
        if op.kind is OpKind.BWD:
            if op.layers:   # a chunk: only the top one takes the next stage's gradient
                return Backward(op.batch_id, None if last else self._grads.pop((op.batch_id, op.stage), None),
                                layers=op.layers, of_layers=self._planned_layers(op.stage))
            return Backward(op.batch_id, None if last else self._grads.pop((op.batch_id, op.stage)))
        if op.kind is OpKind.DECODE:
            sampling = tuple(self.sampling(self._tasks[t]) or SamplingParams() for t in op.task_ids)
            history = (tuple((tuple(self.texts.tokens(self._tasks[t]).samples[0]), tuple(self.generated[t]))
                             if p.needs_history else None for t, p in zip(op.task_ids, sampling))
                       if last and any(p.needs_history for p in sampling) else None)
            if op.stage == 0:
                ids = torch.tensor([self.generated[t][-1] for t in op.task_ids], dtype=torch.long)
                return Decode(op.batch_id, op.task_ids, token_ids=ids, sampling=sampling, history=history)
            return Decode(op.batch_id, op.task_ids, hidden=self._acts.pop((op.batch_id, op.stage)),
                          sampling=sampling, history=history)
        if op.kind is OpKind.OPTIM:
            return Step()
        if op.kind in (OpKind.OFFLOAD, OpKind.RELOAD):
            kind, keys = ("act", (op.batch_id,)) if op.train else ("kv", op.task_ids)
            return Offload(kind, keys) if op.kind is OpKind.OFFLOAD else Reload(kind, keys)
        raise ValueError(f"no command for {op.kind}")

    def _planned_layers(self, stage: int) -> int:
        """The layer count the scheduler cut the stage's chunks from (its profile's; the virtual
        clock's modeled profile may differ from the real stage's: the worker maps the ranges)."""
        return self.sched.lat.profile.stages[stage].layers

    def _forward(self, op: Op, last: bool) -> Forward:
        if op.layers and op.layers[0] > 0:   # a later chunk: its input is on the worker
            ids, lengths = self._ids[op.batch_id]
            return Forward(op.batch_id, True, tuple(range(len(lengths))), lengths,
                           labels=ids if last else None, loss_scale=self.loss_scale, layers=op.layers,
                           of_layers=self._planned_layers(op.stage), cuts=op.cuts)
        if op.stage == 0:
            rows = [row for t in op.task_ids for row in self.texts.tokens(self._tasks[t]).samples]
            lengths = tuple(len(r) for r in rows)
            ids = torch.full((len(rows), max(lengths)), self.tok.pad_id, dtype=torch.long)   # [B,T]
            for i, r in enumerate(rows):
                ids[i, : len(r)] = torch.tensor(r, dtype=torch.long)
            self._ids[op.batch_id] = (ids, lengths)
        ids, lengths = self._ids[op.batch_id]
        if last and not op.layers:   # (a chunked batch's ids go when its backward is done)
            self._ids.pop(op.batch_id)
        keep_kv = self.params.generate and not op.train
        seq_ids = op.task_ids if not op.train else tuple(range(len(lengths)))
        sampling = (tuple(self.sampling(self._tasks[t]) or SamplingParams() for t in op.task_ids)
                    if keep_kv else None)
        return Forward(op.batch_id, op.train, seq_ids, lengths,
                       input_ids=ids if op.stage == 0 else None,
                       hidden=None if op.stage == 0 else self._acts.pop((op.batch_id, op.stage)),
                       labels=ids if last else None, keep_kv=keep_kv, sampling=sampling,
                       loss_scale=self.loss_scale, layers=op.layers,
                       of_layers=self._planned_layers(op.stage) if op.layers else 0, cuts=op.cuts)

    # ------------------------------------------------------------------ results -> OpResults
    def _complete(self, tag: Any, res: Any) -> None:
        if isinstance(tag, SubmitTag):
            task, tokens, sampling = res
            self.texts.put(task.task_id, tokens)
            if sampling is not None:
                self._sampling[task.task_id] = sampling
            self._arrive(task)
            return
        if self.recovery.consume(tag, res):   # a restore step, a reply of an abandoned op
            return
        if isinstance(tag, (FetchTag, GatherTag)):
            self._copy_arrived(tag, res)
            return
        if isinstance(res, WorkerLost):       # an op or a Free on a worker that died
            self._node_lost(res)
            return
        if isinstance(tag, FreeTag):          # releasing state must not fail silently
            if isinstance(res, Exception):
                raise EngineError(f"freeing state on node {tag.node} stage {tag.stage} failed: {res}") from res
            return
        flight = self._flights.pop(tag.op_id)
        op, end = flight.op, self.clock.now()
        if isinstance(res, Exception):
            return self._op_error(op, res, flight.start_s, end)
        self._compute_s += getattr(res, "compute_s", 0.0)
        self._busy_s += end - flight.start_s
        stopped = self._absorb(op, res, end)
        self._take(self.sched.on_op_finished(OpResult(op.op_id, flight.start_s, end, stopped)))

    def _copy_arrived(self, tag: FetchTag | GatherTag, res: Any) -> None:
        """A source's weights for a SYNC op: copy them over (FetchTag) or, once every copy is in,
        average them (GatherTag). A lost source: a merge goes on without it; a plain copy ends
        without copying (the receiver keeps its weights) and says so."""
        flight = self._flights.get(tag.op_id)
        if flight is None:
            return   # the receiving node failed meanwhile
        if isinstance(res, WorkerLost):
            self._node_lost(res)
            if tag.op_id not in self._flights:
                return
            if isinstance(tag, GatherTag):
                want, got = self._gather[tag.op_id]
                self._gather[tag.op_id] = (want - 1, got)
                self._maybe_average(tag.op_id)
                return
            del self._flights[tag.op_id]
            now = self.clock.now()
            self.sched.record_event(Event(now, EventKind.SYNC_SKIPPED, flight.op.node, flight.op.stage,
                                          error=f"source node {res.node} lost"))
            self._take(self.sched.on_op_finished(OpResult(tag.op_id, flight.start_s, now)))
            return
        if isinstance(res, Exception):
            return self._op_error(flight.op, res)
        if isinstance(tag, GatherTag):
            self._gather[tag.op_id][1].append((tag.node, res.state_dict))
            self._maybe_average(tag.op_id)
            return
        self.backend.submit(flight.op.node, flight.op.stage, SetWeights(res.state_dict), OpTag(tag.op_id))

    def _node_lost(self, lost: WorkerLost) -> None:
        """A worker died: forget its node's in-flight ops, hand the node to recovery."""
        if lost.node in self.recovery.down:
            return   # already failed; this is one more reply from its old workers
        ops = [op_id for op_id, f in self._flights.items() if f.op.node == lost.node]
        for op_id in ops:
            del self._flights[op_id]
            self._gather.pop(op_id, None)
        self.recovery.fail_node(lost.node, str(lost), ops)

    def _absorb(self, op: Op, res: Any, end: float) -> tuple[int, ...]:
        """Keep what the next stage needs; return the sequences that stopped (EOS)."""
        last = op.stage == self.params.stages - 1
        if op.kind is OpKind.FWD:
            if op.layers and res.hidden is None and res.loss is None:
                return ()   # a chunk that is not the stage's last: nothing leaves the worker
            if not last:
                self._acts[(op.batch_id, op.stage + 1)] = res.hidden
                return ()
            if op.train:
                self._train_losses.append((op.node, end, res.loss))
                hook = getattr(self.listener, "on_train_loss", None)   # optional listener method
                if hook is not None:
                    hook(op.node, res.loss)
                return ()
            for tid, nll in zip(op.task_ids, res.seq_nll or ()):
                self.inference_loss[tid] = nll
            hook = getattr(self.listener, "on_prompt_logprobs", None)   # optional listener method
            for tid, lps in zip(op.task_ids, res.prompt_logprobs or ()):
                if lps is not None and hook is not None:
                    hook(tid, lps)
            if res.next_tokens is not None:
                for tid, tok in zip(op.task_ids, res.next_tokens):
                    self.generated[tid] = []
                return self._emit(op.task_ids, res.next_tokens, res.logprobs)
            return ()
        if op.kind is OpKind.BWD and op.layers and op.layers[0] == 0 and op.stage == 0:
            self._ids.pop(op.batch_id, None)   # a chunked batch's backward is complete
        if op.kind is OpKind.BWD and op.stage > 0 and not (op.layers and op.layers[0] > 0):
            self._grads[(op.batch_id, op.stage - 1)] = res.grad_input
        if op.kind is OpKind.DECODE:
            if not last:
                self._acts[(op.batch_id, op.stage + 1)] = res.hidden
                return ()
            return self._emit(op.task_ids, res.next_tokens, res.logprobs)
        return ()

    def _emit(self, task_ids: tuple[int, ...], tokens: tuple[int, ...], logprobs=None) -> tuple[int, ...]:
        """Append generated tokens; the sequences that stop here (EOS, or the listener says so)."""
        stopped = []
        for i, (tid, tok) in enumerate(zip(task_ids, tokens)):
            self.generated[tid].append(tok)
            sp = self.sampling(self._tasks[tid])
            stop = tok == self.tok.eos_id and not (self.ignore_eos or (sp is not None and sp.ignore_eos))
            if self.listener is not None and not stop and self._first_time_streamed(tid):
                stop = bool(self.listener.on_token(tid, tok, None if logprobs is None else logprobs[i]))
            if stop:
                stopped.append(tid)
                self._stop_requested.add(tid)
        return tuple(stopped)

    def _first_time_streamed(self, task_id: int) -> bool:
        """A request retried after a failure regenerates its tokens; the listener heard the
        first ones already. True when the newest token of `task_id` is new to the listener."""
        n = len(self.generated[task_id])
        if n <= self._streamed.get(task_id, 0):
            return False
        self._streamed[task_id] = n
        return True

    def _take(self, out: Outputs) -> None:
        """Act on what the scheduler says happened: release worker state, forget the generation
        of re-queued requests, keep ended ops for live metrics, tell the listener."""
        if not out:
            return
        self._resolved += out.resolved
        for rel in out.releases:
            for bid in rel.batch_ids:    # what this driver kept for the batch
                self._ids.pop(bid, None)
                for store in (self._acts, self._grads):
                    for key in [k for k in store if k[0] == bid]:
                        del store[key]
            if rel.node not in self.recovery.down:   # a failed node's workers are gone with their state
                free = Free(seq_ids=rel.seq_ids, batch_ids=rel.batch_ids)
                for s in range(self.params.stages):
                    self.backend.submit(rel.node, s, free, FreeTag(rel.node, s))
        for tid in out.requeued:         # a request starts over from its prompt
            self.generated.pop(tid, None)
            self.inference_loss.pop(tid, None)
            self._stop_requested.discard(tid)
        self.recent_ops.extend(out.ops)
        if self.listener is None:
            return
        for rec in out.requests:
            self.listener.on_finish(replace(rec, inference_loss=self.inference_loss.get(rec.task_id)))
        for rec in out.train_tasks:
            self.listener.on_finish(rec)
        for ap in out.applied:
            self.listener.on_applied(ap.task_ids, ap.node, ap.version)
        if not self.keep_records:
            self._forget(out)

    def _forget(self, out: Outputs) -> None:
        """keep_records=False: drop what the engine kept for tasks whose records are final."""
        done = [r.task_id for r in out.requests] + [t.task_id for t in out.train_tasks if t.failed]
        done += [tid for ap in out.applied for tid in ap.task_ids]
        for tid in done:
            for store in (self._tasks, self.inference_loss, self.generated, self._sampling, self._streamed):
                store.pop(tid, None)
            self._stop_requested.discard(tid)
        horizon = self.clock.now() - RECORD_WINDOW_S
        if self._train_losses and self._train_losses[0][1] < horizon - RECORD_WINDOW_S:   # now and then
            self._train_losses[:] = [x for x in self._train_losses if x[1] >= horizon]

    def _op_error(self, op: Op, exc: Exception, start: float | None = None, end: float | None = None) -> None:
        if self.strict:
            raise EngineError(f"{op.kind.value} on node {op.node} stage {op.stage} (tasks {op.task_ids}) "
                              f"failed: {exc!r}") from exc
        self._flights.pop(op.op_id, None)
        now = self.clock.now()
        self._take(self.sched.on_op_finished(OpResult(op.op_id, start or now, end or now, error=repr(exc))))

    # ------------------------------------------------------------------ outputs
    def _result(self) -> RunResult:
        result = self.sched.finalize()
        result.requests = [replace(r, inference_loss=self.inference_loss.get(r.task_id)) for r in result.requests]
        result.train_steps = step_losses(result.train_steps, self._train_losses)
        result.extras["compute_fraction"] = self._compute_s / self._busy_s if self._busy_s else None
        self.recovery.extras(result.extras)
        return result
