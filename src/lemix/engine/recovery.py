"""Node failure and recovery in the real engine: a collaborator of Engine that owns which nodes
are down, their restarts and their restores.

When a worker process dies (the backend delivers `WorkerLost`, e.g. a Ray actor was killed):

1. the engine forgets the node's in-flight ops (late replies are ignored: `abandoned`);
2. the scheduler takes the node out of placement and re-queues every task it held
   (`Scheduler.on_node_failed`): inference restarts from its prompt on another node, training
   tasks whose gradients died with the node are trained again; its Outputs release what the
   engine kept for the node's batches; nothing is lost;
3. the backend replaces the node's workers (`restart_node`: new placement group, new actors,
   initial weights), then every stage gets the weights and optimizer state of the freshest
   healthy peer (GetState -> SetState, asynchronously: other nodes keep working meanwhile); with
   no healthy peer the node restarts from the initial weights;
4. `Scheduler.on_node_restored(node, version)` puts it back into placement.

A failure while restoring restarts the node again, up to `max_restarts` per node.
"""
from __future__ import annotations

from typing import Any, Callable

import torch

from lemix.engine.backend import Backend, EngineError, WorkerLost
from lemix.engine.messages import GetState, Memory, SetState
from lemix.engine.stage import split_stages
from lemix.engine.tags import OpTag, RestoreTag
from lemix.sched.scheduler import Scheduler
from lemix.types import Event, EventKind, Outputs


class Recovery:
    max_restarts = 3
    restore_timeout_s = 300.0   # an offline run waits this long for a node being restored

    def __init__(self, sched: Scheduler, backend: Backend, clock, *, stages: int,
                 initial_model: torch.nn.Module, strict: bool, take: Callable[[Outputs], None],
                 lost: Callable[[WorkerLost], None]) -> None:
        self.sched, self.backend, self.clock = sched, backend, clock
        self.stages = stages
        self.initial_model = initial_model        # the weights a restarted worker starts from
        self.strict = strict
        self._take = take                          # the engine acts on the scheduler's outputs
        self._lost = lost                          # ... and on a worker lost while restoring
        self.down: set[int] = set()                # failed, not yet restored
        self.abandoned: set[int] = set()           # op ids of failed nodes: late replies ignored
        self._restarts: dict[int, int] = {}        # node -> restarts so far
        self._restore: dict[int, dict] = {}        # node -> {"attempt", "left", "versions", ...}
        self._attempts = 0
        self.failures = 0
        self.restored = 0

    # ------------------------------------------------------------------ failure
    def fail_node(self, node: int, why: str, abandoned_ops: list[int]) -> None:
        """`node` died; the engine already dropped its in-flight ops (`abandoned_ops`)."""
        self.down.add(node)            # first: no Free goes to its dead workers
        self.failures += 1
        self.abandoned.update(abandoned_ops)
        self._take(self.sched.on_node_failed(node, why))
        self._restart(node)

    def consume(self, tag: Any, res: Any) -> bool:
        """A reply that concerns recovery (a restore step, a reply of an abandoned op): handled
        here, True. Anything else is the engine's."""
        if isinstance(tag, OpTag) and tag.op_id in self.abandoned:
            self.abandoned.discard(tag.op_id)
            return True
        if isinstance(tag, RestoreTag):
            self._restore_step(tag, res)
            return True
        return False

    def _restart(self, node: int) -> None:
        done = self._restarts.get(node, 0)
        restart = getattr(self.backend, "restart_node", None)
        if done >= self.max_restarts or restart is None:
            self._restore.pop(node, None)
            why = f"gave up after {done} restarts" if restart is not None else "backend cannot restart"
            self.sched.record_event(Event(self.clock.now(), EventKind.NODE_ABANDONED, node, error=why))
            return
        self._restarts[node] = done + 1
        restart(node, split_stages(self.initial_model, self.stages))
        self._begin_restore(node)

    # ------------------------------------------------------------------ restore
    def _begin_restore(self, node: int) -> None:
        """Ask the freshest healthy peer for each stage's state (or, with none, just wait for
        the new workers, which hold the initial weights)."""
        peers = [n for n in self.sched.snapshot().nodes if n.healthy and n.index not in self.down]
        self._attempts += 1
        attempt = self._attempts
        state = {"attempt": attempt, "left": self.stages, "versions": [],
                 "deadline": self.clock.now() + self.restore_timeout_s}
        self._restore[node] = state
        if not peers:
            for s in range(self.stages):
                self.backend.submit(node, s, Memory(), RestoreTag(True, node, s, attempt))
            return
        peer = max(peers, key=lambda n: (n.version, n.trains, -n.index)).index
        state["peer"] = peer
        for s in range(self.stages):
            self.backend.submit(peer, s, GetState(), RestoreTag(False, node, s, attempt))

    def _restore_step(self, tag: RestoreTag, res: Any) -> None:
        state = self._restore.get(tag.node)
        if state is None or state["attempt"] != tag.attempt:
            return   # an abandoned attempt
        if isinstance(res, WorkerLost):
            if res.node == tag.node:
                self._restart(tag.node)        # a new worker died while starting: again
            else:
                self._lost(res)                # the peer died: restore from another
                if self._restore.get(tag.node) is state:
                    self._begin_restore(tag.node)
            return
        if isinstance(res, Exception):
            if self.strict:
                raise EngineError(f"restoring node {tag.node} stage {tag.stage} failed: {res!r}") from res
            self.sched.record_event(Event(self.clock.now(), EventKind.RESTORE_FAILED, tag.node, tag.stage,
                                          error=repr(res)))
            self._restore.pop(tag.node, None)
            return
        if not tag.set:
            self.backend.submit(tag.node, tag.stage, SetState(res.weights, res.optimizer, res.version),
                                RestoreTag(True, tag.node, tag.stage, tag.attempt))
            return
        state["versions"].append(getattr(res, "version", 0))
        state["left"] -= 1
        if state["left"] == 0:
            del self._restore[tag.node]
            self.down.discard(tag.node)
            self.restored += 1
            version = min(state["versions"]) if "peer" in state else 0
            self._take(self.sched.on_node_restored(tag.node, version))

    def restore_deadline(self) -> float:
        """When the last pending restore gives up being waited for (inf: none pending); an
        offline run ends only after its nodes are back, so its report shows the recovery."""
        pending = [st["deadline"] for st in self._restore.values() if st["deadline"] > self.clock.now()]
        return max(pending) if pending else float("inf")

    def extras(self, extras: dict) -> None:
        extras["node_failures"] = self.failures
        extras["node_restores"] = self.restored
        describe = getattr(self.backend, "describe", None)
        if describe is not None:
            info = describe()
            extras["backend"] = info.get("backend")
            if info.get("backend") != "local":
                extras["placement"] = info.get("nodes")
