"""When each node of the server checkpoints, and the journal bookkeeping that must come first.

A collaborator of EngineHost (lemix.serve.host): the host tells it about optimizer steps
(`applied`) and restores (`restored`); it marks applied samples in the journal, oldest first,
takes a checkpoint every `checkpoint_every` steps when no gradient is in flight (else it stays
due until the node's next step), hands it to the CheckpointWriter's thread, and at shutdown
writes the final ones and says what could not be written. Problems (a full disk) go to
the host's `problems`, which /health shows.
"""
from __future__ import annotations

import logging

from lemix.serve import checkpoint as ckpt
from lemix.serve.journal import JournalStorageError

log = logging.getLogger("lemix.serve")


class Saver:
    def __init__(self, journal, versions: list[int], stages: int, every: int, problems: dict[str, str],
                 on_written=None) -> None:
        """versions: the host's per-node weight versions (read, never written here); problems:
        the host's dict of what /health reports (kinds "journal" and "checkpoint" are set here)."""
        self.journal, self.version, self.stages, self.every = journal, versions, stages, every
        self.problems, self._on_written = problems, on_written
        self.nodes = len(versions)
        self.engine = self.backend = self.writer = None
        self._steps_since_ckpt = [0] * self.nodes
        self._ckpt_due = [False] * self.nodes
        self._ckpt_version = [0] * self.nodes          # version of the last checkpoint taken (-1: it failed)
        self._unjournaled: list[list[tuple[list[int], int]]] = [[] for _ in range(self.nodes)]

    def attach(self, engine, backend, directory, model: str) -> None:
        self.engine, self.backend = engine, backend
        self.writer = ckpt.CheckpointWriter(self.journal, directory, model,
                                            on_written=self._written, on_failed=self._write_failed)

    def _problem(self, kind: str, why: str | None) -> None:
        if why is None:
            self.problems.pop(kind, None)
        else:
            self.problems[kind] = why

    def restored(self, node: int, version: int) -> None:
        self._ckpt_version[node] = version

    def applied(self, node: int, sample_ids: list[int], version: int) -> None:
        """An optimizer step of `node` applied `sample_ids` (global weight version `version`)."""
        if sample_ids:
            self._unjournaled[node].append((sample_ids, version))
        self._journal_applied(node)
        self._steps_since_ckpt[node] += 1
        if self.every and self._steps_since_ckpt[node] >= self.every:
            self._ckpt_due[node] = True
        if self._ckpt_due[node]:
            self._checkpoint(node)

    def close(self, engine_stopped: bool, failed: bool, problems: dict) -> list[str]:
        """Final checkpoints (when the engine stopped cleanly), then stop the writer; what was
        not written."""
        errors = []
        if not engine_stopped:
            errors.append("the engine did not stop within 120 s; no final checkpoint")
        elif not failed:
            for n in range(self.nodes):
                self._checkpoint(n, final=True)
        self.writer.close()
        for n in range(self.nodes):
            if not failed and self._ckpt_version[n] != self.version[n]:
                errors.append(f"node {n}: the final checkpoint (weight version {self.version[n]}) "
                              f"was not written ({problems.get('checkpoint', 'training in flight')}); "
                              "--resume will train its samples applied since again")
        return errors

    def _journal_applied(self, node: int) -> None:
        """Mark applied samples in the journal, oldest first; what fails (a full disk) is kept
        and tried again at the next step, and no checkpoint is taken meanwhile (it would hold
        samples the journal calls queued, trained again on --resume)."""
        pending = self._unjournaled[node]
        while pending:
            ids, gv = pending[0]
            try:
                self.journal.mark_applied(ids, node, gv)
            except JournalStorageError as exc:
                self._problem("journal", f"{exc} ({sum(len(i) for i, _ in pending)} applied samples "
                                         "not yet marked; retried at the next step)")
                return
            pending.pop(0)
        if "applied samples" in self.problems.get("journal", ""):
            self._problem("journal", None)

    def _checkpoint(self, node: int, final: bool = False) -> None:
        """Engine thread (or after it stopped): checkpoint `node` if no gradient is in flight;
        otherwise it stays due and is tried again at the node's next step."""
        if self._unjournaled[node]:
            self._journal_applied(node)
            if self._unjournaled[node]:
                self._ckpt_due[node] = True
                return
        if not ckpt.training_quiescent(self.engine, node):
            if final:
                log.warning("node %d: training in flight at exit, no final checkpoint; its samples "
                            "applied since the last one will be trained again on --resume", node)
            self._ckpt_due[node] = True
            return
        if self._ckpt_version[node] == self.version[node]:
            self._ckpt_due[node] = False
            return   # nothing new since the last checkpoint (or the initial weights)
        try:
            states = ckpt.capture(self.backend, node, self.stages)
        except Exception:   # keep serving; try again at the next step
            log.exception("capturing a checkpoint of node %d failed", node)
            return
        self.writer.submit(states, node, self.version[node])
        self._ckpt_version[node] = self.version[node]
        self._ckpt_due[node] = False
        self._steps_since_ckpt[node] = 0

    def _written(self, node: int, version: int, path) -> None:
        self._problem("checkpoint", None)
        if self._on_written is not None:
            self._on_written()
        log.info("checkpoint of node %d at weight version %d: %s", node, version, path)

    def _write_failed(self, node: int, version: int, exc: BaseException) -> None:
        """Checkpoint thread: the write failed (its temporary files are gone); take it again at
        the node's next step (or at shutdown)."""
        self._problem("checkpoint", f"writing checkpoint v{version} of node {node} failed: {exc}")
        if self._ckpt_version[node] == version:
            self._ckpt_version[node] = -1
        self._ckpt_due[node] = True
