"""Checkpoints of one node's weights and optimizer state, per stage, under --state-dir.

    <state>/checkpoints/node<n>/v<version>/stage<s>.pt   {"weights", "optimizer", "version", "meta", ...}

With LoRA, "weights" are the adapters only and "meta" names the base (`lemix export` reads it).

The stage states are captured on the engine thread (an in-memory copy, see below), then written
by a background thread into a temporary directory, fsynced, renamed into place, and only then
recorded in the journal: a crash at any point leaves either the previous checkpoint or the new
one, never half of one. Only the newest `keep` checkpoints of a node are kept.

Consistency: a checkpoint must hold exactly the samples the journal calls applied at or before
its version, so it is taken only when the node has no training gradient outside its weights:
no training micro-batch that started its backward, no accumulated gradient waiting for a step
(`training_quiescent`). Stage commands go through each worker's FIFO inbox after the ops
already queued there; none of those can change weights or optimizer state when the node is
quiescent (a Step needs accumulated gradients), so the per-stage states are one version.
"""
from __future__ import annotations

import logging
import os
import queue
import shutil
import threading
from pathlib import Path

import torch

from lemix.engine.messages import GetState, SetState
from lemix.serve.journal import Journal

log = logging.getLogger("lemix.serve")


def training_quiescent(engine, node: int) -> bool:
    """No gradient of `node` lives outside its weights, and none inside them that the journal
    does not call applied: the scheduler's snapshot says so (no micro-batch has begun its
    backward, no stage holds accumulated gradients or a weight copy or merge in progress, every
    stage took the same steps). On the engine thread."""
    return engine.snapshot().nodes[node].quiescent


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def capture(backend, node: int, stages: int) -> list:
    """GetState from every stage of `node` (CPU copies): the consistent part, on the engine
    thread while the node is quiescent."""
    return [backend.call(node, s, GetState()) for s in range(stages)]


def write_node(states: list, journal: Journal, root: Path, node: int, version: int, model: str,
               keep: int = 2) -> Path:
    """Write captured stage states as checkpoint `version`, record it, prune older ones. Disk
    work only: run it off the engine thread (CheckpointWriter)."""
    stages = len(states)
    final = root / f"node{node}" / f"v{version:08d}"
    tmp = final.with_name(final.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for s, st in enumerate(states):
        f = tmp / f"stage{s}.pt"
        torch.save({"weights": st.weights, "optimizer": st.optimizer, "version": version,
                    "stage": s, "num_stages": stages, "model": model,
                    "meta": getattr(st, "meta", {})}, f)   # mode + base reference, for lemix export
        with open(f, "rb") as fh:
            os.fsync(fh.fileno())
    _fsync_dir(tmp)
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    _fsync_dir(final.parent)
    journal.add_checkpoint(node, version, str(final))
    for old_version, old_path in journal.checkpoints(node)[:-keep]:
        journal.drop_checkpoint(node, old_version)
        shutil.rmtree(old_path, ignore_errors=True)
    return final


class CheckpointWriter:
    """One background thread that writes captured checkpoints in order, so the engine thread
    only pays for the in-memory copy. `flush()` waits for everything queued."""

    def __init__(self, journal: Journal, root: Path, model: str, on_written=None) -> None:
        self.journal, self.root, self.model = journal, root, model
        self.on_written = on_written
        self._queue: queue.Queue = queue.Queue()
        self._thread = threading.Thread(target=self._run, name="lemix-checkpoint", daemon=True)
        self._thread.start()

    def submit(self, states: list, node: int, version: int) -> None:
        self._queue.put((states, node, version))

    def flush(self) -> None:
        self._queue.join()

    def close(self) -> None:
        self.flush()
        self._queue.put(None)
        self._thread.join(timeout=60)

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            try:
                if item is None:
                    return
                states, node, version = item
                path = write_node(states, self.journal, self.root, node, version, self.model)
                if self.on_written is not None:
                    self.on_written(node, version, path)
            except Exception:   # e.g. a full disk: keep serving; the next checkpoint tries again
                log.exception("writing checkpoint %s failed", item[1:] if item else "")
            finally:
                self._queue.task_done()


def load_node(backend, path: str | Path, node: int, stages: int, model: str) -> int:
    """Restore every stage of `node` from a checkpoint directory; returns its version."""
    version = None
    for s in range(stages):
        f = Path(path) / f"stage{s}.pt"
        if not f.is_file():
            raise FileNotFoundError(f"checkpoint {path} has no {f.name}")
        blob = torch.load(f, map_location="cpu", weights_only=True)
        if blob["num_stages"] != stages or blob["model"] != model:
            raise ValueError(f"checkpoint {path} was made for model {blob['model']!r} in "
                             f"{blob['num_stages']} stages, not {model!r} in {stages}")
        backend.call(node, s, SetState(blob["weights"], blob["optimizer"], blob["version"]))
        version = blob["version"]
    return int(version)
