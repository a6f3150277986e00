"""Checkpoints of one node's weights and optimizer state, per stage, under --state-dir.

    <state>/checkpoints/node<n>/v<version>/stage<s>.pt      {"weights", "optimizer", "version", "meta", ...}
    <state>/checkpoints/node<n>/v<version>/manifest.json    {"files": {"stage0.pt": sha256, ...}, ...}

With LoRA, "weights" are the adapters only and "meta" names the base (`lemix export` reads it).

The stage states are captured on the engine thread (an in-memory copy, see below), then written
by a background thread into a temporary directory, fsynced, renamed into place, and only then
recorded in the journal: a crash at any point leaves either the previous checkpoint or the new
one, never half of one. A write that fails (a full disk) removes its temporary directory and
raises. Only the newest `keep` checkpoints of a node are kept; pruning deletes only directories
inside this state dir. `verify` checks a checkpoint against its manifest's checksums, so a
truncated or damaged one is found before it is loaded (and an older intact one used instead).

Consistency: a checkpoint must hold exactly the samples the journal calls applied at or before
its version, so it is taken only when the node has no training gradient outside its weights:
no training micro-batch that started its backward, no accumulated gradient waiting for a step
(`training_quiescent`). Stage commands go through each worker's FIFO inbox after the ops
already queued there; none of those can change weights or optimizer state when the node is
quiescent (a Step needs accumulated gradients), so the per-stage states are one version.
"""
from __future__ import annotations

import hashlib
import json
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


MANIFEST = "manifest.json"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def write_node(states: list, journal: Journal, root: Path, node: int, version: int, model: str,
               keep: int = 2) -> Path:
    """Write captured stage states as checkpoint `version`, record it, prune older ones. Disk
    work only: run it off the engine thread (CheckpointWriter)."""
    stages = len(states)
    final = root / f"node{node}" / f"v{version:08d}"
    tmp = final.with_name(final.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir(parents=True)
        files = {}
        for s, st in enumerate(states):
            f = tmp / f"stage{s}.pt"
            with open(f, "wb") as fh:
                try:
                    torch.save({"weights": st.weights, "optimizer": st.optimizer, "version": version,
                                "stage": s, "num_stages": stages, "model": model,
                                "meta": getattr(st, "meta", {})}, fh)   # mode + base reference, for lemix export
                except RuntimeError as exc:   # torch hides a failed write ("unexpected pos")
                    cause = _os_error(exc)
                    if cause is None:
                        raise
                    raise cause from exc
                fh.flush()
                os.fsync(fh.fileno())
            files[f.name] = _sha256(f)
        manifest = tmp / MANIFEST
        manifest.write_text(json.dumps({"format": "lemix-checkpoint", "node": node, "version": version,
                                        "num_stages": stages, "model": model, "files": files}))
        with open(manifest, "rb") as fh:
            os.fsync(fh.fileno())
        _fsync_dir(tmp)
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _fsync_dir(final.parent)
    journal.add_checkpoint(node, version, final)
    for old_version, old_path in journal.checkpoints(node)[:-keep]:
        journal.drop_checkpoint(node, old_version)
        if _inside(old_path, root):
            shutil.rmtree(old_path, ignore_errors=True)
    return final


def _os_error(exc: BaseException) -> OSError | None:
    """The OSError (ENOSPC, EFBIG, EIO) behind torch's RuntimeError, if there is one."""
    seen = exc.__cause__ or exc.__context__
    while seen is not None and not isinstance(seen, OSError):
        seen = seen.__cause__ or seen.__context__
    return seen


def _inside(path: Path, root: Path) -> bool:
    try:
        path.resolve().relative_to(root.resolve())
        return True
    except ValueError:
        return False


def verify(path: Path, stages: int, model: str) -> str | None:
    """Why checkpoint directory `path` cannot be restored (None: it is intact). Checks the
    manifest's checksums; a checkpoint written before manifests existed is checked by loading."""
    if not path.is_dir():
        return "missing"
    manifest = path / MANIFEST
    if manifest.is_file():
        try:
            meta = json.loads(manifest.read_text())
            files = meta["files"]
        except (OSError, ValueError, KeyError, TypeError) as exc:
            return f"unreadable manifest ({exc})"
        if meta.get("num_stages") != stages or meta.get("model") != model:
            return (f"made for model {meta.get('model')!r} in {meta.get('num_stages')} stages, "
                    f"not {model!r} in {stages}")
        for s in range(stages):
            name = f"stage{s}.pt"
            if name not in files:
                return f"the manifest lists no {name}"
            if not (path / name).is_file():
                return f"{name} is missing"
            try:
                if _sha256(path / name) != files[name]:
                    return f"{name} does not match its checksum (truncated or damaged)"
            except OSError as exc:
                return f"{name} cannot be read ({exc.strerror or exc})"
        return None
    for s in range(stages):   # no manifest: a checkpoint of an older lemix
        try:
            torch.load(path / f"stage{s}.pt", map_location="cpu", weights_only=True)
        except Exception as exc:   # truncated zip, missing file, ...
            return f"stage{s}.pt cannot be loaded ({type(exc).__name__}: {exc})"
    return None


class CheckpointWriter:
    """One background thread that writes captured checkpoints in order, so the engine thread
    only pays for the in-memory copy. `flush()` waits for everything queued."""

    def __init__(self, journal: Journal, root: Path, model: str, on_written=None, on_failed=None) -> None:
        self.journal, self.root, self.model = journal, root, model
        self.on_written, self.on_failed = on_written, on_failed
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
            except Exception as exc:   # e.g. a full disk: keep serving; the next step tries again
                log.error("writing checkpoint v%s of node %s failed: %s", item[2], item[1], exc)
                if self.on_failed is not None:
                    self.on_failed(item[1], item[2], exc)
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
