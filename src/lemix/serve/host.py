"""EngineHost: the engine on its own thread, and everything the HTTP side asks of it.

    HTTP handlers ──submit_infer/accept_samples──► Engine.submit (thread-safe)
    engine thread ──Listener: on_token/on_finish/on_applied/on_train_loss──► streams, journal,
                                                                             metrics, checkpoints

Weight versions are global across restarts: a node restored from checkpoint version V reports
V + the steps its scheduler took since (`base`).
"""
from __future__ import annotations

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
from lemix.serve.journal import Journal
from lemix.serve.metrics import ServeMetrics
from lemix.serve.options import ServeOptions
from lemix.serve.protocol import APIError
from lemix.serve.stream import Stream
from lemix.serve.text import Detokenizer, sample_tokens
from lemix.types import RequestRecord, Task, TaskKind, TrainTaskRecord

log = logging.getLogger("lemix.serve")


class ServeError(ValueError):
    """A server that cannot start as asked (the message says why)."""


class _NoText:
    """Every served task brings its own tokens; the engine must never draw text for one."""

    def sample_text(self, t_s, n_chars, rng):
        raise RuntimeError("lemix serve: a task reached the engine without its tokens")


class _HeldBackend:
    """The engine shuts its backend down when its loop ends; the server still needs the
    workers then (the final checkpoint), so that shutdown waits for `release()`."""

    def __init__(self, inner) -> None:
        self.inner = inner
        self.completions = inner.completions

    def start(self, *a, **k):
        return self.inner.start(*a, **k)

    def submit(self, node, stage, cmd, tag):
        return self.inner.submit(node, stage, cmd, tag)

    def call(self, node, stage, cmd):
        return self.inner.call(node, stage, cmd)

    def restart_node(self, node, stages) -> None:
        return self.inner.restart_node(node, stages)

    def describe(self) -> dict:
        return self.inner.describe()

    def shutdown(self) -> None:
        pass

    def release(self) -> None:
        self.inner.shutdown()


class EngineHost:
    def __init__(self, cfg: LemixConfig, opts: ServeOptions, *, hf_model=None, tokenizer=None,
                 profile=None) -> None:
        if len(cfg.policy.names) != 1:
            raise ServeError(f"lemix serve runs one policy, got {', '.join(cfg.policy.names)}")
        self.cfg, self.opts = cfg, opts
        self.model_name = opts.served_model_name or cfg.model.name
        self.state_dir = Path(opts.state_dir)
        self.journal = Journal(self.state_dir / "journal.sqlite")
        try:
            self._build(hf_model, tokenizer, profile)
        except BaseException:
            if hasattr(self, "writer"):
                self.writer.close()
            if hasattr(self, "backend"):
                self.backend.release()
            self.journal.close()
            raise

    def _build(self, hf_model, tokenizer, profile) -> None:
        from lemix.api import load_model, stage_devices
        from lemix.engine.backends import make_backend
        from lemix.engine.runtime import Engine
        from lemix.engine.stage import arch_config

        cfg, opts = self.cfg, self.opts
        if not opts.resume and not self.journal.is_empty():
            raise ServeError(f"{self.state_dir} already holds a training journal; pass --resume to "
                             "continue from it, or choose an empty --state-dir")
        if hf_model is None:
            hf_model, tokenizer, _ = load_model(cfg.model.name, seed=cfg.seed, tokenizer=cfg.model.tokenizer,
                                                byte_tokenizer=cfg.model.byte_tokenizer)
        self.tok = tokenizer
        self.context_tokens = arch_config(hf_model).max_positions
        profile = profile or self._profile(hf_model)
        self.nodes, self.stages = cfg.cluster.nodes, cfg.cluster.stages
        params = replace(cfg.sched_params(cfg.policy.names[0]), generate=True)
        self.backend = _HeldBackend(make_backend(cfg.cluster.backend, **(
            {"address": cfg.cluster.ray_address} if cfg.cluster.backend == "ray" else {})))
        self.engine = Engine(params, profile, hf_model, tokenizer, TaskTexts(tokenizer, _NoText()),
                             self.backend, devices=stage_devices(cfg), lr=cfg.model.lr,
                             weight_decay=cfg.model.weight_decay,
                             memory_budget_bytes=int(cfg.cluster.device_memory_gb * 1e9),
                             strict=False, listener=self)
        self.base = [0] * self.nodes
        self.version = [0] * self.nodes
        self._lock = threading.Lock()
        self._streams: dict[int, Stream] = {}
        self._next_id = 0
        self._steps_since_ckpt = [0] * self.nodes
        self._ckpt_due = [False] * self.nodes
        self._ckpt_version = [0] * self.nodes          # version of the last checkpoint taken
        self.writer = ckpt.CheckpointWriter(self.journal, self.state_dir / "checkpoints",
                                            cfg.model.name, on_written=self._written)
        self.train_losses: deque[tuple[float, int, float]] = deque(maxlen=256)   # (unix time, node, loss)
        self._rng = np.random.default_rng(cfg.seed)   # sampling seeds of requests that give none
        self.failure: BaseException | None = None
        self.accepting = True
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.metrics = ServeMetrics(self)
        self.feed = TrainFeed(self._submit_train, batch_size=cfg.workload.train_batch_size,
                              wait_s=opts.train_batch_wait_s, now=self.engine.clock.now)
        if opts.resume:
            self._restore()

    # ------------------------------------------------------------------ start / stop
    def _profile(self, hf_model):
        """--profile FILE, else the one measured earlier for this state dir, else measure now."""
        from lemix.api import engine_profile
        from lemix.profiling import load_profile, save_profile

        if self.cfg.model.profile:
            return engine_profile(self.cfg, hf_model)
        cached = self.state_dir / "profile.json"
        if cached.is_file():
            try:
                return load_profile(cached, stages=self.cfg.cluster.stages, model=self.cfg.model.name,
                                    device=self.cfg.cluster.device,
                                    capacity_bytes=int(self.cfg.cluster.device_memory_gb * 1e9))
            except ValueError as exc:
                log.warning("not reusing %s (%s); measuring again", cached, exc)
        log.info("measuring a quick profile of %s (saved to %s)", self.cfg.model.name, cached)
        profile = engine_profile(self.cfg, hf_model)
        save_profile(profile, cached)
        return profile

    def _restore(self) -> None:
        """Latest checkpoint of every node (weights + optimizer); roll back applications no
        checkpoint holds; queue every unapplied sample again."""
        latest = self.journal.latest_checkpoints()
        for n in range(self.nodes):
            version, path = latest.get(n, (0, None))
            if path is not None:
                version = ckpt.load_node(self.backend, path, n, self.stages, self.cfg.model.name)
                log.info("node %d restored from %s (weight version %d)", n, path, version)
            self.base[n] = self.version[n] = self._ckpt_version[n] = version
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

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run_engine, name="lemix-engine", daemon=True)
        self._thread.start()
        self.feed.start()

    def _run_engine(self) -> None:
        try:
            self.result = self.engine.serve(self._stop, drain=False)
        except BaseException as exc:   # the engine died: fail what waits, answer 503 from now on
            log.exception("the engine loop failed")
            self.failure = exc
            with self._lock:
                streams, self._streams = list(self._streams.values()), {}
            for s in streams:
                s.fail(f"the engine failed: {exc!r}")

    @property
    def alive(self) -> bool:
        return self.failure is None and self._thread is not None and self._thread.is_alive()

    def close(self) -> None:
        """Stop accepting; let in-flight requests and submitted training finish (up to
        drain_timeout_s); stop the engine; checkpoint every quiescent node; release workers."""
        self.accepting = False
        self.feed.stop()
        deadline = time.monotonic() + self.opts.drain_timeout_s
        while self.alive and (self._streams or self.feed.in_engine) and time.monotonic() < deadline:
            time.sleep(0.05)
        if self._streams or self.feed.in_engine:
            log.warning("drain timed out: %d requests and %d training tasks unfinished",
                        len(self._streams), self.feed.in_engine)
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        try:
            if self.failure is None:
                for n in range(self.nodes):
                    self._checkpoint(n, final=True)
        finally:
            self.writer.close()
            self.backend.release()
            self.journal.close()

    # ------------------------------------------------------------------ requests (HTTP side)
    def _new_id(self) -> int:
        with self._lock:
            self._next_id += 1
            return self._next_id

    def _check_open(self) -> None:
        if self.failure is not None or not self.accepting:
            raise APIError(503, "the server is shutting down" if self.failure is None
                           else f"the engine failed: {self.failure!r}", type="server_error",
                           code="service_unavailable")

    def submit_infer(self, loop, ids: list[int], max_tokens: int, sampling: SamplingParams,
                     priority: int, stops: list[str]) -> Stream:
        self._check_open()
        with self._lock:
            if len(self._streams) >= self.opts.max_queued:
                raise APIError(429, f"{len(self._streams)} requests in flight (--max-queued "
                               f"{self.opts.max_queued}); retry later", type="rate_limit_error",
                               code="rate_limit_exceeded", headers={"Retry-After": "1"})
            self._next_id += 1
            tid = self._next_id
            stream = Stream(tid, loop, Detokenizer(self.tok, stops), len(ids), max_tokens)
            self._streams[tid] = stream
        task = Task(tid, TaskKind.INFER, self.engine.clock.now(), len(ids), max_tokens, priority=priority)
        self.engine.submit(task, TaskTokens((tuple(ids),)), sampling)
        return stream

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
        if self.feed.queued + len(payloads) > self.opts.max_queued_samples:
            raise APIError(429, f"{self.feed.queued} training samples not yet applied "
                           f"(limit {self.opts.max_queued_samples}); retry later",
                           type="rate_limit_error", code="rate_limit_exceeded", headers={"Retry-After": "5"})
        seq = self.cfg.workload.train_seq_tokens
        ids = [tuple(sample_tokens(self.tok, p, seq)) for p in payloads]
        rows = self.journal.add([(p, len(i)) for p, i in zip(payloads, ids)], max(self.version))
        self.feed.add([FeedSample(r.sample_id, i) for r, i in zip(rows, ids)])
        return [r.sample_id for r in rows]

    def _submit_train(self, samples: list[FeedSample]) -> int:
        tid = self._new_id()
        task = Task(tid, TaskKind.TRAIN, self.engine.clock.now(), max(len(s.ids) for s in samples),
                    batch_size=len(samples))
        self.engine.submit(task, TaskTokens(tuple(s.ids for s in samples)))
        return tid

    def train_status(self) -> dict:
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

    # ------------------------------------------------------------------ Listener (engine thread)
    def on_token(self, task_id: int, token: int) -> bool:
        stream = self._streams.get(task_id)
        return False if stream is None else stream.on_token(token)

    def on_finish(self, record) -> None:
        if isinstance(record, RequestRecord):
            with self._lock:
                stream = self._streams.pop(record.task_id, None)
            self.engine.texts.drop(record.task_id)
            if stream is not None:
                done = stream.finish(record, self.base[max(record.node, 0)] + record.weight_version)
                self.metrics.request_finished(record, done)
        elif isinstance(record, TrainTaskRecord) and record.failed:
            n = self.feed.requeue(record.task_id)
            log.warning("training task %d failed (%s); its %d samples are queued again",
                        record.task_id, record.error, n)

    def on_applied(self, task_ids: tuple[int, ...], node: int, version: int) -> None:
        for t in task_ids:
            self.engine.texts.drop(t)
        sample_ids = self.feed.applied(task_ids)
        gv = self.base[node] + version
        self.version[node] = gv
        if sample_ids:
            try:
                self.journal.mark_applied(sample_ids, node, gv)
            except Exception:   # never kill the engine over it; resume would train them again
                log.exception("could not journal %d applied samples of node %d", len(sample_ids), node)
        self.metrics.step_applied(node, len(sample_ids))
        self._steps_since_ckpt[node] += 1
        if self.opts.checkpoint_every and self._steps_since_ckpt[node] >= self.opts.checkpoint_every:
            self._ckpt_due[node] = True
        if self._ckpt_due[node]:
            self._checkpoint(node)

    def on_train_loss(self, node: int, loss: float) -> None:
        self.train_losses.append((time.time(), node, float(loss)))

    def _checkpoint(self, node: int, final: bool = False) -> None:
        """Engine thread (or after it stopped): checkpoint `node` if no gradient is in flight;
        otherwise it stays due and is tried again at the node's next step."""
        if not ckpt.training_quiescent(self.engine, node):
            if final:
                log.warning("node %d: training in flight at exit, no final checkpoint; its samples "
                            "applied since the last one will be trained again on --resume", node)
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
        self.metrics.checkpoints.inc()
        log.info("checkpoint of node %d at weight version %d: %s", node, version, path)
