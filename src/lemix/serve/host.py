"""EngineHost: the engine on its own thread, and everything the HTTP side asks of it.

    HTTP handlers ──submit_group/accept_samples──► Engine.submit (thread-safe)
    engine thread ──Listener: on_token/on_finish/on_applied/on_train_loss──► streams, journal,
                                                                             metrics, records, checkpoints (Saver)

Life cycle (`phase`):  starting ──► ready ──► draining ──► closed     (starting ──► failed)
The constructor does the quick, checkable part (state dir, journal, checkpoints, model); `start()`
finds or measures the profile and builds the engine on a thread, while the HTTP server already
answers `/health` with 503 "starting". Problems met while serving (a full disk) are kept in
`problems` and shown by `/health` until the operation succeeds again.

Weight versions are global across restarts: a node restored from checkpoint version V reports
V + the steps its scheduler took since (`base`).
"""
from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import deque
from dataclasses import replace
from pathlib import Path

import numpy as np

from lemix.config import LemixConfig
from lemix.engine.data import TaskTexts, TaskTokens
from lemix.engine.messages import SamplingParams
from lemix.serve import checkpoint as ckpt
from lemix.serve.feed import FeedSample, TrainFeed
from lemix.serve.journal import JournalStorageError
from lemix.serve.saver import Saver
from lemix.serve.metrics import ServeMetrics
from lemix.serve.options import ServeOptions
from lemix.serve.protocol import APIError
from lemix.serve.records import RecordLog
from lemix.serve.stagehold import HeldBackend, NoText
from lemix.serve.state import ServeError, choose_checkpoints, find_profile, open_journal
from lemix.serve.stream import Stream
from lemix.serve.text import Detokenizer, sample_tokens
from lemix.types import RequestRecord, Task, TaskKind, TrainTaskRecord

log = logging.getLogger("lemix.serve")

__all__ = ["EngineHost", "ServeError"]


class EngineHost:
    def __init__(self, cfg: LemixConfig, opts: ServeOptions, *, hf_model=None, tokenizer=None,
                 profile=None) -> None:
        """profile: a Profile, or a callable(progress) -> Profile (default: --profile, else the
        cached one for this model/device/stages, else measure and cache one)."""
        if len(cfg.policy.names) != 1:
            raise ServeError(f"lemix serve runs one policy, got {', '.join(cfg.policy.names)}")
        self.cfg, self.opts = cfg, opts
        self.model_name = opts.served_model_name or cfg.model.name
        self.state_dir = Path(opts.state_dir)
        self.nodes, self.stages = cfg.cluster.nodes, cfg.cluster.stages
        self.phase = "starting"
        self.progress: tuple[int, int] | None = None     # profiling points (done, total)
        self.problems: dict[str, str] = {}               # what /health reports as degraded
        self.failure: BaseException | None = None        # the engine loop died, or start-up failed
        self.close_error: str | None = None              # why shutdown did not end cleanly
        self.on_fatal = None                             # set by run_server: stop the HTTP server
        self.engine = self.feed = self.backend = None
        self.journal = open_journal(self.state_dir, opts.resume)
        try:
            self._restore_from = (choose_checkpoints(self.journal, self.nodes, self.stages, cfg.model.name)
                                  if opts.resume else {})
            if hf_model is None:
                from lemix.api import load_model
                from lemix.engine.adapt import spec_from_config

                hf_model, tokenizer, _ = load_model(cfg.model.name, seed=cfg.seed, tokenizer=cfg.model.tokenizer,
                                                    byte_tokenizer=cfg.model.byte_tokenizer,
                                                    adapt=spec_from_config(cfg.model))
        except BaseException:
            self.journal.close()
            raise
        from lemix.engine.stage import arch_config
        self._hf_model, self.tok = hf_model, tokenizer
        self._profile_source = profile
        self.context_tokens = arch_config(hf_model).max_positions
        self.base = [0] * self.nodes
        self.version = [0] * self.nodes
        self._lock = threading.Lock()
        self._streams: dict[int, Stream] = {}
        self._next_id = 0
        self.train_losses: deque[tuple[float, int, float]] = deque(maxlen=256)   # (unix time, node, loss)
        self._rng = np.random.default_rng(cfg.seed)   # sampling seeds of requests that give none
        self.accepting = True
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._starter: threading.Thread | None = None
        self._settled = threading.Event()              # ready, or start-up failed
        self._loop = None
        self.records = RecordLog(self.state_dir, on_error=lambda why: self._problem("records", why))
        self.metrics = ServeMetrics(self)
        self.saver = Saver(self.journal, self.version, self.stages, opts.checkpoint_every, self.problems,
                           on_written=self.metrics.checkpoints.inc)

    def _problem(self, kind: str, why: str | None) -> None:
        if why is None:
            self.problems.pop(kind, None)
        else:
            self.problems[kind] = why

    # ------------------------------------------------------------------ start-up
    def start(self, loop=None) -> None:
        """Find or measure the profile on a thread (profiling may take minutes), then build the
        engine and start serving. With `loop`, the engine is built on that loop's thread: stage
        workers started from a short-lived helper thread run torch several times slower (seen
        on CPU: 10x the time per op), so only the profile is made off it."""
        self._loop = loop
        self._starter = threading.Thread(target=self._find_profile, name="lemix-startup", daemon=True)
        self._starter.start()

    def wait_ready(self, timeout_s: float | None = None) -> None:
        self._settled.wait(timeout_s)

    def _find_profile(self) -> None:
        try:
            profile = self._profile()
        except BaseException as exc:
            self._start_failed(exc)
            return
        if self._loop is None:
            self._start_up(profile)
        else:
            try:
                self._loop.call_soon_threadsafe(self._start_up, profile)
            except RuntimeError as exc:   # the loop is closed: the server stopped meanwhile
                self._start_failed(exc)

    def _start_up(self, profile) -> None:
        try:
            self._build(profile)
            self._thread = threading.Thread(target=self._run_engine, name="lemix-engine", daemon=True)
            self._thread.start()
            self.feed.start()
            self.phase = "ready"
            self._settled.set()
            log.info("ready: serving %s on %d node(s) x %d stage(s)", self.model_name, self.nodes, self.stages)
        except BaseException as exc:
            self._start_failed(exc)

    def _start_failed(self, exc: BaseException) -> None:
        """Start-up failed: say why, stop the HTTP server."""
        self.failure = exc
        self.phase = "failed"
        self._settled.set()
        log.error("lemix serve could not start: %s", exc, exc_info=not isinstance(exc, ValueError))
        if self.on_fatal is not None:
            self.on_fatal()

    def _profile(self):
        def progress(done: int, total: int) -> None:
            self.progress = (done, total)
        return find_profile(self.cfg, self.opts, self._profile_source, self._hf_model, progress)

    def _build(self, profile) -> None:
        from lemix.api import stage_devices
        from lemix.engine.backends import make_backend
        from lemix.engine.runtime import Engine

        cfg, opts = self.cfg, self.opts
        params = replace(cfg.sched_params(cfg.policy.names[0]), generate=True, shared_host=cfg.shared_host)
        self.backend = HeldBackend(make_backend(cfg.cluster.backend, **(
            {"address": cfg.cluster.ray_address} if cfg.cluster.backend == "ray" else {})))
        self.engine = Engine(params, profile, self._hf_model, self.tok, TaskTexts(self.tok, NoText()),
                             self.backend, devices=stage_devices(cfg), lr=cfg.model.lr,
                             weight_decay=cfg.model.weight_decay,
                             memory_budget_bytes=int(cfg.cluster.device_memory_gb * 1e9),
                             strict=False, listener=self, keep_records=False)
        self.saver.attach(self.engine, self.backend, self.state_dir / "checkpoints", cfg.model.name)
        self.feed = TrainFeed(self._submit_train, batch_size=cfg.workload.train_batch_size,
                              wait_s=opts.train_batch_wait_s, now=self.engine.clock.now)
        if opts.resume:
            self._restore()

    def _restore(self) -> None:
        """The chosen checkpoint of every node (weights + optimizer); roll back applications no
        checkpoint holds; queue every unapplied sample again."""
        for n in range(self.nodes):
            version, path = self._restore_from.get(n, (0, None))
            if path is not None:
                version = ckpt.load_node(self.backend, path, n, self.stages, self.cfg.model.name)
                log.info("node %d restored from %s (weight version %d)", n, path, version)
            self.base[n] = self.version[n] = version
            self.saver.restored(n, version)
            rolled = self.journal.roll_back(n, version)
            if rolled:
                log.info("node %d: %d applied samples were not in its checkpoint; training them again",
                         n, rolled)
        queued = self.journal.queued()
        seq = self.cfg.workload.train_seq_tokens
        self.feed.add([FeedSample(q.sample_id, tuple(sample_tokens(self.tok, q.payload, seq)))
                       for q in queued])
        if queued:
            log.info("resuming %d unapplied training samples", len(queued))

    def _run_engine(self) -> None:
        try:
            self.engine.serve(self._stop, drain=True)
        except BaseException as exc:   # the engine died: fail what waits, answer 503 from now on
            log.exception("the engine loop failed")
            self.failure = exc
            with self._lock:
                streams, self._streams = list(self._streams.values()), {}
            for s in streams:
                s.fail(f"the engine failed: {exc!r}")

    @property
    def ready(self) -> bool:
        return self.phase == "ready" and self.failure is None

    @property
    def alive(self) -> bool:
        return self.failure is None and self._thread is not None and self._thread.is_alive()

    def health(self) -> tuple[int, dict]:
        """(HTTP status, body) of /health: 200 only when ready with no problem."""
        if self.phase == "starting":
            body = {"status": "starting"}
            if self.progress is not None:
                body["profiling"] = {"done": self.progress[0], "total": self.progress[1]}
            return 503, body
        if self.failure is not None:
            return 503, {"status": "failed", "reason": str(self.failure) or repr(self.failure)}
        if not self.accepting or self.phase != "ready":
            return 503, {"status": "draining"}
        if self.problems:
            return 503, {"status": "degraded", "problems": dict(self.problems)}
        return 200, {"status": "ok"}

    # ------------------------------------------------------------------ shutdown
    def begin_drain(self) -> None:
        """Stop taking requests and training samples (503); in-flight work continues."""
        self.accepting = False

    def open_streams(self) -> int:
        """Requests still being answered (not finished, failed or cut)."""
        with self._lock:
            return sum(1 for s in self._streams.values() if not s.closed)

    def cut_streams(self, why: str) -> int:
        """End every open request with an error (a stream: an error event, then [DONE]); the
        engine stops each sequence at its next token."""
        with self._lock:
            streams = [s for s in self._streams.values() if not s.closed]
        for s in streams:
            s.cancelled = True
            s.fail(why, status=503, code="server_shutting_down")
        return len(streams)

    def close(self) -> None:
        """Stop accepting; let in-flight requests finish (up to drain_timeout_s), cut the rest;
        stop feeding training and let the engine finish what it holds; write every node's
        final checkpoint; flush the records; release the workers. `close_error` says what failed."""
        self.begin_drain()
        if self._starter is not None:
            self._starter.join()
            self._settled.wait(30)   # a build queued on the event loop that is stopping may never run
        if self.engine is None or self._thread is None:      # start-up never finished
            self.records.flush()
            self.journal.close()
            return
        self.feed.stop()
        deadline = time.monotonic() + self.opts.drain_timeout_s
        while self.alive and self.open_streams() and time.monotonic() < deadline:
            time.sleep(0.05)
        cut = self.cut_streams("the server is shutting down; this request was cut before it finished")
        if cut:
            log.warning("drain timed out: %d requests cut", cut)
        self.phase = "draining"
        self._stop.set()             # the engine finishes its training micro-batches, then stops
        self._thread.join(timeout=max(120.0, self.opts.drain_timeout_s))
        errors = []
        try:
            errors += self.saver.close(not self._thread.is_alive(), self.failure is not None, self.problems)
        finally:
            self.records.flush()
            self.backend.release()
            self.journal.close()
            self.phase = "closed"
        if self.failure is not None:
            errors.append(f"the engine had failed: {self.failure!r}")
        self.close_error = "; ".join(errors) or None
        if self.close_error:
            log.error("%s", self.close_error)

    # ------------------------------------------------------------------ requests (HTTP side)
    def _new_id(self) -> int:
        with self._lock:
            self._next_id += 1
            return self._next_id

    def _check_open(self) -> None:
        if self.phase == "starting":
            done = f" (measuring the profile: {self.progress[0]}/{self.progress[1]})" if self.progress else ""
            raise APIError(503, f"the server is starting{done}; retry later", type="server_error",
                           code="starting", headers={"Retry-After": "5"})
        if self.failure is not None or not self.accepting or self.phase != "ready":
            raise APIError(503, "the server is shutting down" if self.failure is None
                           else f"the engine failed: {self.failure!r}", type="server_error",
                           code="service_unavailable")

    def submit_group(self, loop, asks: list[tuple[list[int], int, SamplingParams]], priority: int,
                     stops: list[str], stop_ids=()) -> list[Stream]:
        """The choices of one HTTP request, (prompt ids, max_tokens, sampling) each: all are
        queued, or none (429). Their streams share one event queue, choice i has index i."""
        self._check_open()
        events = asyncio.Queue()
        with self._lock:
            if len(self._streams) + len(asks) > self.opts.max_queued:
                raise APIError(429, f"{len(self._streams)} requests in flight (--max-queued "
                               f"{self.opts.max_queued}); retry later", type="rate_limit_error",
                               code="rate_limit_exceeded", headers={"Retry-After": "1"})
            streams = []
            for i, (ids, max_tokens, _) in enumerate(asks):
                self._next_id += 1
                streams.append(Stream(self._next_id, loop, Detokenizer(self.tok, stops), len(ids), max_tokens,
                                      index=i, events=events, stop_ids=stop_ids))
                self._streams[self._next_id] = streams[-1]
        for stream, (ids, max_tokens, sampling) in zip(streams, asks):
            # max_tokens 0 (echo): one token is drawn (the engine generates at least one), then dropped
            task = Task(stream.task_id, TaskKind.INFER, self.engine.clock.now(), len(ids), max(1, max_tokens),
                        priority=priority)
            self.engine.submit(task, TaskTokens((tuple(ids),)), sampling)
        return streams

    def random_seed(self) -> int:
        """Event-loop thread only."""
        return int(self._rng.integers(0, 2**31 - 1))

    def in_flight(self) -> tuple[int, int]:
        """(waiting for a first token, generating)."""
        with self._lock:
            streams = list(self._streams.values())
        running = sum(1 for s in streams if s.first_token)
        return len(streams) - running, running

    def accept_samples(self, payloads: list[dict]) -> list[int]:
        """Journal the samples (committed before this returns), then queue them for training.
        Blocking (an fsync): call it from a worker thread."""
        self._check_open()
        limit = self.opts.max_queued_samples
        if len(payloads) > limit:
            raise APIError(413, f"{len(payloads)} samples in one request can never be accepted: at most "
                           f"{limit} may wait (--max-queued-samples); send them in smaller requests",
                           param="samples", code="too_many_samples")
        if self.feed.queued + len(payloads) > limit:
            raise APIError(429, f"{self.feed.queued} training samples not yet applied "
                           f"(limit {limit}); retry later",
                           type="rate_limit_error", code="rate_limit_exceeded", headers={"Retry-After": "5"})
        seq = self.cfg.workload.train_seq_tokens
        ids = [tuple(sample_tokens(self.tok, p, seq)) for p in payloads]
        try:
            rows = self.journal.add([(p, len(i)) for p, i in zip(payloads, ids)], max(self.version))
        except JournalStorageError as exc:   # nothing was committed: nothing was accepted
            self._problem("journal", str(exc))
            raise APIError(507 if exc.full else 503, f"the samples were not accepted: {exc}",
                           type="server_error", code="insufficient_storage" if exc.full else "storage_error",
                           headers={"Retry-After": "30"}) from exc
        self._problem("journal", None)
        self.feed.add([FeedSample(r.sample_id, i) for r, i in zip(rows, ids)])
        return [r.sample_id for r in rows]

    def _submit_train(self, samples: list[FeedSample]) -> int:
        tid = self._new_id()
        task = Task(tid, TaskKind.TRAIN, self.engine.clock.now(), max(len(s.ids) for s in samples),
                    batch_size=len(samples))
        self.engine.submit(task, TaskTokens(tuple(s.ids for s in samples)))
        return tid

    def train_status(self) -> dict:
        self._check_started()
        counts = self.journal.counts()
        lag = self.journal.lag(200)
        losses = list(self.train_losses)
        return {
            "queued": counts["queued"], "applied": counts["applied"],
            "weight_version": max(self.version), "node_weight_versions": list(self.version),
            "recent_train_loss": sum(l for _, _, l in losses[-16:]) / len(losses[-16:]) if losses else None,
            "train_losses": [{"time": t, "node": n, "loss": l} for t, n, l in losses[-32:]],
            "recent_lag_s": sorted(x[0] for x in lag)[len(lag) // 2] if lag else None,
            "recent_lag_versions": sorted(x[2] - x[1] for x in lag)[len(lag) // 2] if lag else None,
            "micro_batch_size": self.feed.batch_size, "micro_batch_wait_s": self.feed.wait_s,
        }

    def _check_started(self) -> None:
        if self.engine is None or self.phase == "closed":
            self._check_open()
            raise APIError(503, "the server is not serving", type="server_error", code="service_unavailable")

    # ------------------------------------------------------------------ Listener (engine thread)
    def on_token(self, task_id: int, token: int, logprob=None) -> bool:
        stream = self._streams.get(task_id)
        return False if stream is None else stream.on_token(token, logprob)

    def on_prompt_logprobs(self, task_id: int, logprobs) -> None:
        stream = self._streams.get(task_id)
        if stream is not None:
            stream.prompt_logprobs = logprobs

    def on_finish(self, record) -> None:
        self.records.add(record)
        if isinstance(record, RequestRecord):
            with self._lock:
                stream = self._streams.pop(record.task_id, None)
            self.engine.texts.drop(record.task_id)
            if stream is not None:
                done = stream.finish(record, self.base[max(record.node, 0)] + record.weight_version)
                self.metrics.request_finished(record, done)
        elif isinstance(record, TrainTaskRecord) and record.failed:
            self.engine.texts.drop(record.task_id)
            n = self.feed.requeue(record.task_id)
            log.warning("training task %d failed (%s); its %d samples are queued again",
                        record.task_id, record.error, n)

    def on_applied(self, task_ids: tuple[int, ...], node: int, version: int) -> None:
        for t in task_ids:
            self.engine.texts.drop(t)
        sample_ids = self.feed.applied(task_ids)
        gv = self.base[node] + version
        self.version[node] = gv
        self.metrics.step_applied(node, len(sample_ids))
        self.saver.applied(node, sample_ids, gv)

    def on_train_loss(self, node: int, loss: float) -> None:
        self.train_losses.append((time.time(), node, float(loss)))
