"""The Ray backend: every stage worker is a Ray actor; every LeMix node is a placement group.

    node n  ->  placement group (STRICT_PACK: a node's stages share one machine)
                one bundle per stage: {"GPU": g, "CPU": c} when GPUs are requested, else {"CPU": c}
    stage s ->  actor running the same StageWorker as the local backend, max_concurrency=1,
                so its commands run one at a time in submission order

Commands (with their activations and gradients) are actor-call arguments and results travel back
through Ray's object store; nothing is shared. `submit` returns at once; when the call ends, a
`(tag, result_or_exception)` pair lands in `completions` (a future callback on a Ray thread).

Errors: an exception raised by the worker arrives as RayTaskError and is unwrapped to the original
exception, so the engine reports the real error. A dead actor (killed, crashed, its machine lost)
arrives as `WorkerLost(node, stage)`, which the engine treats as a node failure and answers with
`restart_node`.

Ray itself: `address=None` starts a local Ray unless one is already initialized (the caller's,
which is then left alone); `"auto"` or `"ray://..."` joins a cluster. `shutdown()` kills this
backend's actors and removes its placement groups; it stops Ray only when it started Ray itself
and was built with `stop_ray=True` (by default a Ray it started lives until the process exits,
so several runs in one process pay its start-up once).
"""
from __future__ import annotations

import math
import queue
import threading
from dataclasses import dataclass, field
from typing import Any

from lemix.engine.backend import BackendError, WorkerLost
from lemix.engine.stage import StageModule

try:
    import ray
    from ray.util.placement_group import placement_group, placement_group_table, remove_placement_group
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy
except ImportError:  # the ray extra is optional; RayBackend says how to get it
    ray = None


class _StageActor:
    """Body of the Ray actor: one StageWorker, commands handled one at a time."""

    def __init__(self, module: StageModule, stage: int, num_stages: int, device: str, lr: float,
                 weight_decay: float, memory_budget_bytes: int | None, threads: int) -> None:
        import torch

        from lemix.engine.worker import StageWorker

        torch.set_num_threads(threads)
        if device.startswith("cuda") and ray.get_gpu_ids():
            device = "cuda:0"   # Ray narrowed CUDA_VISIBLE_DEVICES to the GPU of this bundle
        self.worker = StageWorker(module, stage, num_stages, device, lr=lr, weight_decay=weight_decay,
                                  memory_budget_bytes=memory_budget_bytes)

    def handle(self, cmd: Any) -> Any:
        return self.worker.handle(cmd)

    def info(self) -> dict:
        import os

        return {"pid": os.getpid(), "device": str(self.worker.device),
                "gpu_ids": [str(g) for g in ray.get_gpu_ids()],
                "ray_node_id": ray.get_runtime_context().get_node_id()}


_ACTOR_CLASS: list = []


def _actor_class():
    """The Ray actor class, made once per process (ray.remote exports it to the cluster)."""
    if not _ACTOR_CLASS:
        _ACTOR_CLASS.append(ray.remote(_StageActor))
    return _ACTOR_CLASS[0]


@dataclass
class NodePlacement:
    """Where one LeMix node runs: its placement group and one bundle per stage."""

    node: int
    placement_group_id: str
    strategy: str
    bundles: list[dict[str, float]]
    ray_node_ids: list[str] = field(default_factory=list)   # per bundle, the Ray node holding it
    incarnation: int = 0                                    # restarts after a failure

    def as_dict(self) -> dict:
        return {"node": self.node, "placement_group_id": self.placement_group_id, "strategy": self.strategy,
                "bundles": [dict(b) for b in self.bundles], "ray_node_ids": list(self.ray_node_ids),
                "incarnation": self.incarnation}


_DEATH = () if ray is None else (ray.exceptions.RayActorError, ray.exceptions.WorkerCrashedError,
                                  ray.exceptions.NodeDiedError, ray.exceptions.ObjectLostError,
                                  ray.exceptions.ActorPlacementGroupRemoved,
                                  ray.exceptions.LocalRayletDiedError)


def unwrap_error(exc: BaseException, node: int, stage: int) -> BaseException:
    """A Ray error as the engine should see it: WorkerLost for a dead worker process, the
    worker's own exception for a failed command, anything else unchanged."""
    if ray is None:
        return exc
    if isinstance(exc, _DEATH):
        lost = WorkerLost(node, stage, f"{type(exc).__name__}: {exc}")
        lost.__cause__ = exc
        return lost
    if isinstance(exc, ray.exceptions.RayTaskError):
        cause = exc.cause
        if isinstance(cause, _DEATH):   # e.g. an argument whose owner died
            return unwrap_error(cause, node, stage)
        if isinstance(cause, Exception):
            return cause
    return exc


def _floor(x: float, step: float = 0.01) -> float:
    """Ray resource amounts are fractional with limited precision; round down to `step`."""
    return math.floor(x / step + 1e-9) * step


class RayBackend:
    """Stage workers as Ray actors, one placement group per LeMix node."""

    name = "ray"

    def __init__(self, address: str | None = None, num_gpus_per_stage: float | None = None,
                 num_cpus_per_stage: float | None = None, *, ready_timeout_s: float = 120.0,
                 init_kwargs: dict | None = None, stop_ray: bool = False) -> None:
        """num_gpus_per_stage: GPUs in each stage's bundle; None = 1 when the stage devices are
        CUDA and the cluster has GPUs, else 0 (a positive value with `cpu` devices reserves
        logical GPUs, e.g. to try a GPU placement on a CPU machine). num_cpus_per_stage: CPUs
        per bundle; None = the cluster's CPUs shared by all stages, at most 1 (fractions let
        4 stage actors fit on 2 cores). init_kwargs go to ray.init when this backend starts Ray.
        """
        if ray is None:
            raise BackendError("the ray backend needs Ray: pip install 'lemix[ray]' (or ray>=2.9)")
        if num_gpus_per_stage is not None and num_gpus_per_stage < 0:
            raise BackendError(f"num_gpus_per_stage must be >= 0, got {num_gpus_per_stage}")
        if num_cpus_per_stage is not None and num_cpus_per_stage <= 0:
            raise BackendError(f"num_cpus_per_stage must be > 0, got {num_cpus_per_stage}")
        self.address = address
        self.num_gpus_per_stage = num_gpus_per_stage
        self.num_cpus_per_stage = num_cpus_per_stage
        self.ready_timeout_s = ready_timeout_s
        self.init_kwargs = dict(init_kwargs or {})
        self.stop_ray = stop_ray
        self.completions: queue.Queue = queue.Queue()
        self.placement_groups: dict[int, Any] = {}          # node -> live PlacementGroup
        self._placements: dict[int, NodePlacement] = {}     # node -> its latest placement (kept after shutdown)
        self._actors: dict[tuple[int, int], Any] = {}
        self._pending: dict[int, Any] = {}                  # call id -> ObjectRef, until its callback ran
        self._next_call = 0
        self._lock = threading.Lock()
        self._started_ray = False
        self._bundle: dict[str, float] = {}
        self._worker_args: dict[str, Any] = {}
        self._threads = 1

    # ------------------------------------------------------------------ start-up
    def _connect(self) -> None:
        if ray.is_initialized():
            return
        if self.address is None:
            ray.init(include_dashboard=False, **self.init_kwargs)
            self._started_ray = True
        else:
            ray.init(address=self.address, **self.init_kwargs)

    def bundle_for(self, workers: int, devices: list[str]) -> dict[str, float]:
        """The bundle of one stage for `workers` stage actors in all, from the request and what
        the cluster holds (Ray must be initialized)."""
        total = ray.cluster_resources()
        cpus, gpus_total = float(total.get("CPU", 0.0)), float(total.get("GPU", 0.0))
        cuda = any(d.startswith("cuda") for d in devices)
        gpus = self.num_gpus_per_stage
        if gpus is None:
            gpus = 1.0 if cuda and gpus_total > 0 else 0.0
        if cuda and gpus == 0:
            raise BackendError("stage devices are CUDA but the Ray cluster declares no GPU resources; "
                               "start Ray with GPUs or use --device cpu")
        if gpus * workers > gpus_total + 1e-9:
            raise BackendError(f"{workers} stages x {gpus:g} GPU need {gpus * workers:g} GPUs; "
                               f"the Ray cluster has {gpus_total:g}")
        per = self.num_cpus_per_stage
        if per is None:
            per = max(0.01, _floor(min(1.0, cpus / max(1, workers))))
        return {"CPU": per} if gpus == 0 else {"GPU": gpus, "CPU": per}

    def start(self, nodes: list[list[StageModule]], devices: list[str], *, lr: float, weight_decay: float,
              memory_budget_bytes: int | None) -> None:
        self._connect()
        self._bundle = self.bundle_for(sum(len(stages) for stages in nodes), devices)
        self._threads = max(1, int(self._bundle["CPU"]))
        self._worker_args = dict(devices=list(devices), lr=lr, weight_decay=weight_decay,
                                 memory_budget_bytes=memory_budget_bytes)
        for n, stages in enumerate(nodes):
            self._start_node(n, stages, wait=True)

    def _start_node(self, n: int, stages: list[StageModule], *, wait: bool, incarnation: int = 0) -> None:
        bundles = [dict(self._bundle) for _ in stages]
        pg = placement_group(bundles, strategy="STRICT_PACK", name=f"lemix-node{n}-{incarnation}")
        if wait:
            try:
                ray.get(pg.ready(), timeout=self.ready_timeout_s)
            except ray.exceptions.GetTimeoutError:
                remove_placement_group(pg)
                raise BackendError(
                    f"node {n}: a placement group of {len(stages)} x {self._bundle} on one machine "
                    f"was not placed within {self.ready_timeout_s:g} s; Ray has "
                    f"{ray.available_resources()} available") from None
        self.placement_groups[n] = pg
        self._placements[n] = NodePlacement(n, pg.id.hex(), "STRICT_PACK", bundles, incarnation=incarnation)
        cls = _actor_class()
        a = self._worker_args
        for s, module in enumerate(stages):
            strategy = PlacementGroupSchedulingStrategy(pg, placement_group_bundle_index=s)
            actor = cls.options(num_cpus=self._bundle["CPU"], num_gpus=self._bundle.get("GPU", 0),
                                max_concurrency=1, max_restarts=0, max_task_retries=0,
                                scheduling_strategy=strategy, name=None).remote(
                module, s, len(stages), a["devices"][s], a["lr"], a["weight_decay"],
                a["memory_budget_bytes"], self._threads)
            self._actors[(n, s)] = actor
        if wait:   # construction errors (a bad device, an import failure) surface here, clearly
            infos = [ray.get(self._actors[(n, s)].info.remote(), timeout=self.ready_timeout_s)
                     for s in range(len(stages))]
            self._placements[n].ray_node_ids = [i["ray_node_id"] for i in infos]

    # ------------------------------------------------------------------ commands
    def actor(self, node: int, stage: int) -> Any:
        """The actor handle of (node, stage), e.g. to kill it in a failure test."""
        return self._actors[(node, stage)]

    def submit(self, node: int, stage: int, cmd: Any, tag: Any) -> None:
        actor = self._actors.get((node, stage))
        if actor is None:
            self.completions.put((tag, WorkerLost(node, stage, "no live worker for this stage")))
            return
        ref = actor.handle.remote(cmd)
        with self._lock:
            call = self._next_call
            self._next_call += 1
            self._pending[call] = ref
        ref.future().add_done_callback(lambda fut: self._done(call, node, stage, tag, fut))

    def _done(self, call: int, node: int, stage: int, tag: Any, fut) -> None:
        """On a Ray thread: the call ended; hand `(tag, result_or_exception)` to the engine."""
        try:
            result = fut.result()
        except BaseException as exc:  # returned to the engine, which decides what it means
            result = unwrap_error(exc, node, stage)
        with self._lock:
            self._pending.pop(call, None)
        self.completions.put((tag, result))

    def call(self, node: int, stage: int, cmd: Any) -> Any:
        actor = self._actors.get((node, stage))
        if actor is None:
            raise WorkerLost(node, stage, "no live worker for this stage")
        try:
            return ray.get(actor.handle.remote(cmd))
        except Exception as exc:
            raise unwrap_error(exc, node, stage) from None

    # ------------------------------------------------------------------ failures and shutdown
    def restart_node(self, node: int, stages: list[StageModule]) -> None:
        """Replace every actor of `node` (and its placement group) with fresh ones holding
        `stages`. Returns at once: commands submitted now queue until the actors are up."""
        self._stop_node(node)
        incarnation = self._placements[node].incarnation + 1 if node in self._placements else 0
        self._start_node(node, stages, wait=False, incarnation=incarnation)

    def _stop_node(self, node: int) -> None:
        for key in [k for k in self._actors if k[0] == node]:
            ray.kill(self._actors.pop(key), no_restart=True)
        pg = self.placement_groups.pop(node, None)
        if pg is not None:
            remove_placement_group(pg)

    def describe(self) -> dict:
        """Bundles per node (the latest placement of each, also after shutdown)."""
        placements = []
        for n in sorted(self._placements):
            p = self._placements[n]
            pg = self.placement_groups.get(n)
            if pg is not None and not p.ray_node_ids:
                table = placement_group_table(pg)
                got = table.get("bundles_to_node_id", {})
                p.ray_node_ids = [got[i] for i in sorted(got)] if len(got) == len(p.bundles) else []
            placements.append(p.as_dict())
        return {"backend": self.name, "address": self.address, "bundle": dict(self._bundle),
                "nodes": placements}

    def shutdown(self) -> None:
        if ray is None or not ray.is_initialized():
            return
        for n in list(self.placement_groups) + [k[0] for k in self._actors]:
            self._stop_node(n)
        if self._started_ray and self.stop_ray:
            ray.shutdown()
            self._started_ray = False

