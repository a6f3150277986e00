"""The state directory at start-up: open the journal, check it against the checkpoints on disk,
pick each node's newest intact checkpoint, and find (or measure and cache) the profile.

Every problem here is a `ServeError` whose message says what is wrong and how to recover;
`lemix serve` prints it as one `lemix:` line and exits non-zero.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import sqlite3
from dataclasses import dataclass
from pathlib import Path

from lemix.serve import checkpoint as ckpt
from lemix.serve.journal import Journal, JournalStorageError

log = logging.getLogger("lemix.serve")


class ServeError(ValueError):
    """A server that cannot start as asked (the message says why and what to do)."""


def open_journal(state_dir: Path, resume: bool) -> Journal:
    """The state dir's journal, after checking the directory is usable and the journal is
    consistent with the checkpoints on disk."""
    try:
        state_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ServeError(f"cannot create the state dir {state_dir}: {exc.strerror or exc}") from None
    if not os.access(state_dir, os.W_OK | os.X_OK):
        raise ServeError(f"the state dir {state_dir} is not writable; choose another --state-dir or "
                         "fix its permissions")
    path = state_dir / "journal.sqlite"
    if path.exists() and not os.access(path, os.R_OK | os.W_OK):
        raise ServeError(f"the journal {path} is not readable and writable; fix its permissions")
    try:
        journal = Journal(path)
        empty = journal.is_empty()
    except (sqlite3.DatabaseError, JournalStorageError) as exc:
        raise ServeError(f"cannot open the journal {path} ({exc}); restore it from a backup, or start "
                         "with an empty --state-dir") from None
    try:
        on_disk = checkpoints_on_disk(state_dir / "checkpoints")
        if empty and on_disk:
            listed = "; ".join(f"node {n}: " + ", ".join(f"v{v}" for v in vs) for n, vs in sorted(on_disk.items()))
            raise ServeError(
                f"the journal {path} records no training, but {state_dir / 'checkpoints'} holds "
                f"checkpoints ({listed}): the journal was lost or truncated, so which samples those "
                "weights hold is unknown. Restore journal.sqlite from a backup, or move checkpoints/ "
                "away to start from the initial weights")
        if not resume and not empty:
            raise ServeError(f"{state_dir} already holds a training journal; pass --resume to continue "
                             "from it, or choose an empty --state-dir")
    except BaseException:
        journal.close()
        raise
    return journal


_VERSION_DIR = re.compile(r"v(\d+)$")


def checkpoints_on_disk(root: Path) -> dict[int, list[int]]:
    """node -> versions of the finished checkpoint directories under `root`; leftover `.tmp`
    directories of interrupted writes are removed on the way."""
    out: dict[int, list[int]] = {}
    if not root.is_dir():
        return out
    for node_dir in sorted(root.glob("node*")):
        if not node_dir.name[4:].isdigit():
            continue
        for d in sorted(node_dir.iterdir()):
            if d.name.endswith(".tmp"):
                log.info("removing %s (an interrupted checkpoint write)", d)
                shutil.rmtree(d, ignore_errors=True)
            elif (m := _VERSION_DIR.match(d.name)) and d.is_dir():
                out.setdefault(int(node_dir.name[4:]), []).append(int(m.group(1)))
    return out


def choose_checkpoints(journal: Journal, nodes: int, stages: int, model: str) -> dict[int, tuple[int, Path | None]]:
    """node -> (version, path) to restore: the newest recorded checkpoint that verifies. A
    broken newer one is moved aside (`.corrupt`) and dropped from the journal with a warning;
    the samples applied after the one used are trained again. None recorded: (0, None)."""
    out = {}
    for n in range(nodes):
        recorded = journal.checkpoints(n)
        if not recorded:
            out[n] = (0, None)
            continue
        problems = []
        for version, path in reversed(recorded):
            why = ckpt.verify(path, stages, model)
            if why is None:
                break
            problems.append((version, path, why))
        else:
            detail = "; ".join(f"v{v} ({p}): {why}" for v, p, why in problems)
            raise ServeError(f"node {n}: no checkpoint the journal records can be restored ({detail}). "
                             "Restore the checkpoints/ directory from a backup, or start with an empty "
                             "--state-dir")
        for bad_version, bad_path, why in problems:
            log.warning("node %d: checkpoint v%d at %s cannot be restored (%s); falling back to v%d, "
                        "the samples applied after it will be trained again", n, bad_version, bad_path,
                        why, version)
            if bad_path.is_dir():
                aside = bad_path.with_name(bad_path.name + ".corrupt")
                shutil.rmtree(aside, ignore_errors=True)
                bad_path.rename(aside)
            journal.drop_checkpoint(n, bad_version)
        out[n] = (version, path)
    return out


# ---------------------------------------------------------------------- the profile

@dataclass(frozen=True)
class ProfileKey:
    model: str
    device: str
    stages: int

    @classmethod
    def of(cls, cfg) -> ProfileKey:
        name = cfg.model.name
        if Path(name).is_dir():    # a local checkpoint: its absolute path and config identify it
            name = str(Path(name).resolve())
            conf = Path(name) / "config.json"
            if conf.is_file():
                name += "#" + hashlib.sha256(conf.read_bytes()).hexdigest()[:12]
        return cls(name, cfg.cluster.device, cfg.cluster.stages)

    def filename(self) -> str:
        digest = hashlib.sha256(json.dumps([self.model, self.device, self.stages]).encode()).hexdigest()[:16]
        slug = re.sub(r"[^A-Za-z0-9._-]+", "_", Path(self.model.split("#")[0]).name)[:40]
        return f"{slug}-{re.sub(r'[^A-Za-z0-9]+', '_', self.device)}-s{self.stages}-{digest}.json"


def cached_profile(cache_dir: str | None, cfg):
    """The cached profile for this model, device and stage split, or None."""
    from lemix.profiling import load_profile
    from lemix.profiling.fit import ProfileError

    if not cache_dir:
        return None
    path = Path(cache_dir) / ProfileKey.of(cfg).filename()
    if not path.is_file():
        return None
    try:
        profile = load_profile(path, stages=cfg.cluster.stages, model=cfg.model.name, device=cfg.cluster.device,
                               capacity_bytes=int(cfg.cluster.device_memory_gb * 1e9))
    except (ProfileError, ValueError) as exc:
        log.warning("not reusing the cached profile %s (%s); measuring again", path, exc)
        return None
    log.info("using the cached profile %s", path)
    return profile


def store_profile(cache_dir: str | None, cfg, profile) -> None:
    from lemix.profiling import save_profile

    if not cache_dir:
        return
    path = Path(cache_dir) / ProfileKey.of(cfg).filename()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        save_profile(profile, tmp)
        os.replace(tmp, path)
        log.info("profile cached in %s", path)
    except OSError as exc:   # a cache that cannot be written only costs the next start its time
        log.warning("could not cache the profile in %s: %s", path, exc)


def find_profile(cfg, opts, source, hf_model, on_progress):
    """The profile to schedule with: `source` (a Profile, or a callable(progress) -> Profile),
    else --profile FILE, else the cached one for this model/device/stages, else measured now
    (a progress bar on stderr, on_progress(done, total) for /health) and cached."""
    from lemix.api import engine_profile
    from lemix.profiling.measure import grid_size

    if source is not None and not callable(source):
        return source
    if source is None and cfg.model.profile:
        return engine_profile(cfg, hf_model)
    if source is None:
        cached = cached_profile(opts.profile_cache_dir, cfg)
        if cached is not None:
            return cached
    total = grid_size(quick=True, num_stages=cfg.cluster.stages)
    done = 0
    on_progress(0, total)
    bar = _progress_bar(total)
    log.info("measuring a quick profile of %s on %s (%d stages); /health says 'starting' until it is done",
             cfg.model.name, cfg.cluster.device, cfg.cluster.stages)

    def tick(n: int = 1) -> None:
        nonlocal done
        done += n
        on_progress(done, total)
        if bar is not None:
            bar.update(n)
    try:
        profile = source(tick) if source is not None else engine_profile(cfg, hf_model, progress=tick)
    finally:
        if bar is not None:
            bar.close()
    if source is None:
        store_profile(opts.profile_cache_dir, cfg, profile)
    return profile


def _progress_bar(total: int):
    """A tqdm bar on stderr for the profiling (None without tqdm's terminal)."""
    try:
        from tqdm import tqdm
    except ImportError:
        return None
    return tqdm(total=total, desc="lemix serve: profiling", unit="point", disable=None, mininterval=0.5)
