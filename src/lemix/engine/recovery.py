"""Node failure and recovery in the real engine (a base class of Engine, kept apart so the
runtime's happy path stays readable).

When a worker process dies (the backend delivers `WorkerLost`, e.g. a Ray actor was killed):

1. the scheduler takes the node out of placement and re-queues every task it held
   (`Scheduler.on_node_failed`): inference restarts from its prompt on another node, training
   tasks whose gradients died with the node are trained again; nothing is lost;
2. the engine forgets the node's in-flight ops (late replies are ignored) and the activations,
   gradients and token ids it kept for the node's batches;
3. the backend replaces the node's workers (`restart_node`: new placement group, new actors,
   initial weights), then every stage gets the weights and optimizer state of the freshest
   healthy peer (GetState -> SetState, through the engine, asynchronously: other nodes keep
   working meanwhile); with no healthy peer the node restarts from the initial weights;
4. `Scheduler.on_node_restored(node, version)` puts it back into placement.

A failure while restoring restarts the node again, up to `max_restarts` per node.
"""
from __future__ import annotations

from typing import Any


from lemix.engine.backend import WorkerLost
from lemix.engine.messages import GetState, Memory, SetState
from lemix.engine.stage import split_stages
from lemix.types import Event, EventKind, OpResult


class EngineRecovery:
    # attributes provided by Engine: params, sched, backend, clock, strict, listener, _hf_model,
    # _flights, _acts, _grads, _ids, _gather, _seen, _unapplied, generated, inference_loss,
    # _stop_requested, _watch_records

    max_restarts = 3
    restore_timeout_s = 300.0   # an offline run waits this long for a node being restored

    def _init_recovery(self) -> None:
        self._abandoned: set[int] = set()          # op ids of failed nodes: late replies ignored
        self._down: set[int] = set()               # failed, not yet restored
        self._restarts: dict[int, int] = {}        # node -> restarts so far
        self._restore: dict[int, dict] = {}        # node -> {"attempt", "left", "versions"}
        self._attempts = 0
        self._streamed: dict[int, int] = {}        # task -> tokens already given to the listener
        self._failures = 0
        self._restored = 0

    # ------------------------------------------------------------------ completions
    def _recovery_complete(self, tag: Any, res: Any) -> bool:
        """Handle a completion that concerns failure or recovery; True when it was consumed."""
        if isinstance(tag, int):
            if tag in self._abandoned:
                self._abandoned.discard(tag)
                return True
            if isinstance(res, WorkerLost):
                self._on_worker_lost(res)
                return True
            return False
        if not isinstance(tag, tuple):
            return False
        kind = tag[0]
        if kind in ("restore_get", "restore_set"):
            self._restore_step(tag, res)
            return True
        if kind in ("sync_get", "avg_get"):
            if tag[1] not in self._flights:
                return True   # the receiving node failed meanwhile
            if isinstance(res, WorkerLost):
                self._on_worker_lost(res)
                if tag[1] in self._flights:
                    self._source_lost(kind, tag[1], res)
                return True
            return False
        if isinstance(res, WorkerLost):   # an auxiliary command (Free): the next op will tell
            return True
        return False

    def _source_lost(self, kind: str, op_id: int, lost: WorkerLost) -> None:
        """A weight copy lost one of its sources: averaging goes on without it; a plain sync
        ends without copying (the receiver keeps its weights) and says so."""
        if kind == "avg_get":
            want, got = self._gather[op_id]
            self._gather[op_id] = (want - 1, got)
            self._maybe_average(op_id)
            return
        flight = self._flights.pop(op_id)
        now = self.clock.now()
        self.sched.record_event(Event(now, EventKind.SYNC_SKIPPED, flight.op.node, flight.op.stage,
                                      error=f"source node {lost.node} lost"))
        self._take(self.sched.on_op_finished(OpResult(op_id, flight.start_s, now)))

    # ------------------------------------------------------------------ failure
    def _on_worker_lost(self, lost: WorkerLost) -> None:
        if lost.node in self._down:
            return   # already failed; this is one more reply from its old workers
        self._on_node_failure(lost.node, str(lost))

    def _on_node_failure(self, node: int, why: str) -> None:
        """Take `node` out, re-queue its tasks, drop what the engine kept for it, restart it."""
        self._down.add(node)           # first: no Free goes to its dead workers
        self._failures += 1
        for op_id, flight in list(self._flights.items()):
            if flight.op.node == node:
                del self._flights[op_id]
                self._gather.pop(op_id, None)
                self._abandoned.add(op_id)
        # the outputs release what the driver kept for the node's batches and re-queue its tasks
        self._take(self.sched.on_node_failed(node, why))
        self._restart_node(node)

    def _restart_node(self, node: int) -> None:
        done = self._restarts.get(node, 0)
        if done >= self.max_restarts:
            self._restore.pop(node, None)
            self.sched.record_event(Event(self.clock.now(), EventKind.NODE_ABANDONED, node,
                                          error=f"gave up after {done} restarts"))
            return
        restart = getattr(self.backend, "restart_node", None)
        if restart is None:   # a backend wrapper that cannot restart workers: the node stays out
            self.sched.record_event(Event(self.clock.now(), EventKind.NODE_ABANDONED, node,
                                          error="backend cannot restart"))
            return
        self._restarts[node] = done + 1
        restart(node, split_stages(self._hf_model, self.params.stages))
        self._begin_restore(node)

    # ------------------------------------------------------------------ restore
    def _begin_restore(self, node: int) -> None:
        """Ask the freshest healthy peer for each stage's state (or, with none, just wait for
        the new workers, which hold the initial weights)."""
        peers = [n for n in self.sched.snapshot().nodes if n.healthy and n.index not in self._down]
        self._attempts += 1
        attempt = self._attempts
        S = self.params.stages
        self._restore[node] = {"attempt": attempt, "left": S, "versions": [],
                               "deadline": self.clock.now() + self.restore_timeout_s}
        if not peers:
            for s in range(S):
                self.backend.submit(node, s, Memory(), ("restore_set", node, s, attempt))
            return
        peer = max(peers, key=lambda n: (n.version, n.trains, -n.index)).index
        self._restore[node]["peer"] = peer
        for s in range(S):
            self.backend.submit(peer, s, GetState(), ("restore_get", node, s, attempt))

    def _restore_step(self, tag: tuple, res: Any) -> None:
        kind, node, stage, attempt = tag
        state = self._restore.get(node)
        if state is None or state["attempt"] != attempt:
            return   # an abandoned attempt
        if isinstance(res, WorkerLost):
            if res.node == node:
                self._restart_node(node)       # a new worker died while starting: again
            else:
                self._on_worker_lost(res)      # the peer died: restore from another
                if self._restore.get(node) is state:
                    self._begin_restore(node)
            return
        if isinstance(res, Exception):
            if self.strict:
                from lemix.engine.runtime import EngineError

                raise EngineError(f"restoring node {node} stage {stage} failed: {res!r}") from res
            self.sched.record_event(Event(self.clock.now(), EventKind.RESTORE_FAILED, node, stage,
                                          error=repr(res)))
            self._restore.pop(node, None)
            return
        if kind == "restore_get":
            self.backend.submit(node, stage, SetState(res.weights, res.optimizer, res.version),
                                ("restore_set", node, stage, attempt))
            return
        state["versions"].append(getattr(res, "version", 0))
        state["left"] -= 1
        if state["left"] == 0:
            del self._restore[node]
            self._down.discard(node)
            self._restored += 1
            self._take(self.sched.on_node_restored(node, min(state["versions"]) if "peer" in state else 0))

    def _restore_deadline(self) -> float:
        """When the last pending restore gives up being waited for (inf: none pending); an
        offline run ends only after its nodes are back, so its report shows the recovery."""
        pending = [st["deadline"] for st in self._restore.values() if st["deadline"] > self.clock.now()]
        return max(pending) if pending else float("inf")

    # ------------------------------------------------------------------ listener and outputs
    def _first_time_streamed(self, task_id: int) -> bool:
        """A request retried after a failure regenerates its tokens; the listener heard the
        first ones already. True when the newest token of `task_id` is new to the listener."""
        n = len(self.generated[task_id])
        if n <= self._streamed.get(task_id, 0):
            return False
        self._streamed[task_id] = n
        return True

    def _recovery_extras(self, extras: dict) -> None:
        extras["node_failures"] = self._failures
        extras["node_restores"] = self._restored
        describe = getattr(self.backend, "describe", None)
        if describe is not None:
            info = describe()
            extras["backend"] = info.get("backend")
            if info.get("backend") != "local":
                extras["placement"] = info.get("nodes")
