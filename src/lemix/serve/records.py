"""Finished requests and training tasks go to CSV files in the state dir, not to memory.

    <state>/requests.csv      one row per inference request (the fields of RequestRecord)
    <state>/train_tasks.csv   one row per training micro-batch (the fields of TrainTaskRecord)

The columns are those of `lemix run`'s files of the same names (load them with
`pandas.read_csv`); times are on the server's engine clock, so rows of one uptime compare. The
aggregate figures (latency histograms, counters) are in /metrics. Rows are buffered and flushed
every `flush_every_s` and at close; a write that fails (a full disk) is reported, never fatal:
the records are a log, the journal is what keeps training exactly-once.
"""
from __future__ import annotations

import csv
import logging
import threading
import time
from dataclasses import fields
from pathlib import Path

from lemix.types import RequestRecord, TrainTaskRecord

log = logging.getLogger("lemix.serve")

_COLUMNS = {RequestRecord: [f.name for f in fields(RequestRecord)],
            TrainTaskRecord: [f.name for f in fields(TrainTaskRecord)]}
_FILES = {RequestRecord: "requests.csv", TrainTaskRecord: "train_tasks.csv"}


class RecordLog:
    def __init__(self, state_dir: Path, *, flush_every_s: float = 2.0, on_error=None) -> None:
        self.dir = state_dir
        self.flush_every_s = flush_every_s
        self.on_error = on_error        # on_error(reason or None): None when writing works again
        self._rows: dict[type, list[list]] = {RequestRecord: [], TrainTaskRecord: []}
        self._lock = threading.Lock()
        self._last_flush = time.monotonic()
        self.written = 0

    def add(self, record: RequestRecord | TrainTaskRecord) -> None:
        cols = _COLUMNS[type(record)]
        with self._lock:
            self._rows[type(record)].append([getattr(record, c) for c in cols])
        if time.monotonic() - self._last_flush >= self.flush_every_s:
            self.flush()

    def flush(self) -> None:
        with self._lock:
            pending, self._rows = self._rows, {RequestRecord: [], TrainTaskRecord: []}
            self._last_flush = time.monotonic()
        try:
            for kind, rows in pending.items():
                if rows:
                    self._append(self.dir / _FILES[kind], _COLUMNS[kind], rows)
                    self.written += len(rows)
        except OSError as exc:
            log.error("could not append records to %s: %s", self.dir, exc)
            if self.on_error is not None:
                self.on_error(f"writing {_FILES[kind]} failed: {exc.strerror or exc}")
            return
        if self.on_error is not None:
            self.on_error(None)

    @staticmethod
    def _append(path: Path, columns: list[str], rows: list[list]) -> None:
        new = not path.exists() or path.stat().st_size == 0
        with open(path, "a", newline="") as fh:
            w = csv.writer(fh)
            if new:
                w.writerow(columns)
            w.writerows(rows)
