"""Where stage workers run. The engine talks to every backend the same way: `submit` a command
message to (node, stage) with a tag, and read `(tag, result_or_exception)` pairs from
`completions`. The local backend runs each worker in its own thread with an inbox; the Ray
backend (lemix.engine.ray_backend) runs the same StageWorker class as Ray actors.
"""
from __future__ import annotations

import os
import queue
import threading
from typing import Any, Protocol

import torch

from lemix.engine.stage import StageModule
from lemix.engine.worker import StageWorker


class BackendError(ValueError):
    """A backend could not start or place its workers; the message says why."""


class EngineError(RuntimeError):
    """A worker failed an op (strict runs) or a command the engine relies on; the original
    exception is the cause."""


class WorkerLost(RuntimeError):
    """The worker process of (node, stage) died (as opposed to a command that raised): the
    engine treats it as a node failure. Delivered as a result in `completions`, or raised by
    `call`."""

    def __init__(self, node: int, stage: int, why: str = "") -> None:
        super().__init__(f"worker of node {node} stage {stage} lost" + (f": {why}" if why else ""))
        self.node, self.stage = node, stage


class Backend(Protocol):
    completions: "queue.Queue[tuple[Any, Any]]"

    def start(self, nodes: list[list[StageModule]], devices: list[str], *, lr: float, weight_decay: float,
              memory_budget_bytes: int | None) -> None: ...
    def submit(self, node: int, stage: int, cmd: Any, tag: Any) -> None: ...
    def call(self, node: int, stage: int, cmd: Any) -> Any: ...
    def restart_node(self, node: int, stages: list[StageModule]) -> None:
        """Replace the workers of `node` with fresh ones holding `stages` (after a failure);
        commands submitted afterwards go to the new workers."""
        ...
    def describe(self) -> dict:
        """Where the workers run (for reports): backend name and per-node placement."""
        ...
    def shutdown(self) -> None: ...


_STOP = object()


class _WorkerThread(threading.Thread):
    """One StageWorker in one thread: commands are handled one at a time, in submission order;
    an exception is returned as the result (the engine decides what it means), never dropped."""

    def __init__(self, worker: StageWorker, completions: queue.Queue, name: str) -> None:
        super().__init__(name=name, daemon=True)
        self.worker = worker
        self.inbox: queue.Queue = queue.Queue()
        self.completions = completions

    def run(self) -> None:
        while True:
            item = self.inbox.get()
            if item is _STOP:
                return
            cmd, tag, reply = item
            try:
                result = self.worker.handle(cmd)
            except Exception as exc:  # handed to the engine, which re-raises or fails the tasks
                result = exc
            (reply or self.completions).put((tag, result))


class LocalBackend:
    """Stage workers as threads of this process (torch releases the GIL inside kernels)."""

    name = "local"

    def __init__(self) -> None:
        self.completions: queue.Queue = queue.Queue()
        self._threads: dict[tuple[int, int], _WorkerThread] = {}
        self._worker_args: dict[str, Any] = {}
        self._devices: list[str] = []

    def start(self, nodes: list[list[StageModule]], devices: list[str], *, lr: float, weight_decay: float,
              memory_budget_bytes: int | None) -> None:
        workers = sum(len(stages) for stages in nodes)
        # split the cores between workers so concurrent stages do not oversubscribe them
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // max(1, workers)))
        self._worker_args = dict(lr=lr, weight_decay=weight_decay, memory_budget_bytes=memory_budget_bytes)
        self._devices = list(devices)
        for n, stages in enumerate(nodes):
            self._start_node(n, stages)

    def _start_node(self, n: int, stages: list[StageModule]) -> None:
        for s, module in enumerate(stages):
            w = StageWorker(module, s, len(stages), self._devices[s], **self._worker_args)
            t = _WorkerThread(w, self.completions, f"lemix-n{n}s{s}")
            t.start()
            self._threads[(n, s)] = t

    def restart_node(self, node: int, stages: list[StageModule]) -> None:
        for key in [k for k in self._threads if k[0] == node]:
            self._threads.pop(key).inbox.put(_STOP)   # commands queued before the stop still run
        self._start_node(node, stages)

    def describe(self) -> dict:
        nodes = sorted({n for n, _ in self._threads})
        return {"backend": self.name, "nodes": [
            {"node": n, "workers": [t.name for (m, _), t in sorted(self._threads.items()) if m == n]}
            for n in nodes]}

    def submit(self, node: int, stage: int, cmd: Any, tag: Any) -> None:
        self._threads[(node, stage)].inbox.put((cmd, tag, None))

    def call(self, node: int, stage: int, cmd: Any) -> Any:
        reply: queue.Queue = queue.Queue()
        self._threads[(node, stage)].inbox.put((cmd, None, reply))
        _, result = reply.get()
        if isinstance(result, Exception):
            raise result
        return result

    def shutdown(self) -> None:
        for t in self._threads.values():
            t.inbox.put(_STOP)
        for t in self._threads.values():
            t.join(timeout=10)
        self._threads.clear()
