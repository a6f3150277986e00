"""`GET /metrics`: Prometheus text from a private registry per server.

vLLM's names under a `lemix:` prefix (num_requests_running / _waiting, time_to_first_token_seconds,
time_per_output_token_seconds, e2e_request_latency_seconds, prompt_tokens_total,
generation_tokens_total, request_success_total) plus LeMix's own: train_samples_applied_total,
train_samples_queued, train_step_seconds, train_loss, deprioritized_training_tasks_total,
offload_events_total, idle_ratio{node,stage} over the last `IDLE_WINDOW_S`, weight_version{node},
slo_attainment, checkpoints_total.

Latencies come from the engine's records (engine clock: submission to first token / finish).
Gauges that mirror engine state are read at scrape time by a collector.
"""
from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

IDLE_WINDOW_S = 60.0
_TTFT = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0)
_TPOT = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5)
_E2E = (0.1, 0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 60.0, 120.0)
_STEP = (0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class ServeMetrics:
    def __init__(self, host) -> None:
        self.host = host
        r = self.registry = CollectorRegistry()
        self.ttft = Histogram("lemix:time_to_first_token_seconds", "Time to first token (s)",
                              buckets=_TTFT, registry=r)
        self.tpot = Histogram("lemix:time_per_output_token_seconds", "Time per output token after the "
                              "first (s)", buckets=_TPOT, registry=r)
        self.e2e = Histogram("lemix:e2e_request_latency_seconds", "End-to-end request latency (s)",
                             buckets=_E2E, registry=r)
        self.prompt_tokens = Counter("lemix:prompt_tokens", "Prefill tokens processed", registry=r)
        self.generation_tokens = Counter("lemix:generation_tokens", "Tokens generated", registry=r)
        self.success = Counter("lemix:request_success", "Finished requests", ["finished_reason"], registry=r)
        self.failed = Counter("lemix:request_failure", "Requests the engine failed", registry=r)
        self.applied = Counter("lemix:train_samples_applied", "Training samples an optimizer step applied",
                               registry=r)
        self.train_step = Histogram("lemix:train_step_seconds", "Span of a node's training step: first "
                                    "training op since the previous step to the step's end (s)",
                                    buckets=_STEP, registry=r)
        self.checkpoints = Counter("lemix:checkpoints", "Checkpoints written", registry=r)
        self._finished = 0
        self._slo_met = 0
        self._last_step_end: dict[int, float] = {}
        r.register(_EngineCollector(self))

    def request_finished(self, rec, done) -> None:
        """Engine thread: one inference request resolved (done None: it failed)."""
        self._finished += 1
        if done is None:
            self.failed.inc()
            return
        self._slo_met += int(rec.slo_met)
        self.success.labels(done.finish_reason).inc()
        self.prompt_tokens.inc(done.prompt_tokens)
        self.generation_tokens.inc(done.completion_tokens)
        if rec.ttft_s is not None:
            self.ttft.observe(rec.ttft_s)
        if rec.e2e_s is not None:
            self.e2e.observe(rec.e2e_s)
            if rec.ttft_s is not None and done.completion_tokens > 1:
                self.tpot.observe((rec.e2e_s - rec.ttft_s) / (done.completion_tokens - 1))

    def step_applied(self, node: int, samples: int) -> None:
        """Engine thread, right after a node's step: count samples, time the step's span."""
        self.applied.inc(samples)
        ops = self.host.engine.recent_ops
        prev = self._last_step_end.get(node, float("-inf"))
        first = end = None
        for i in range(len(ops) - 1, -1, -1):
            op = ops[i]
            if op.end_s <= prev:
                break
            if op.node == node and op.train:
                first = op.start_s
                end = op.end_s if end is None else max(end, op.end_s)
        if end is not None:
            self.train_step.observe(end - first)
            self._last_step_end[node] = end

    @property
    def slo_attainment(self) -> float | None:
        return self._slo_met / self._finished if self._finished else None

    def render(self) -> bytes:
        return generate_latest(self.registry)


def idle_ratios(ops, nodes: int, stages: int, now: float, window_s: float = IDLE_WINDOW_S) -> dict:
    """(node, stage) -> 1 - busy / window over [now - window, now] (ops are appended in end order)."""
    lo = max(0.0, now - window_s)
    span = now - lo
    busy = {(n, s): 0.0 for n in range(nodes) for s in range(stages)}
    for i in range(len(ops) - 1, -1, -1):
        op = ops[i]
        if op.end_s < lo - 60.0:   # ends are nearly sorted; a minute of slack covers long ops
            break
        overlap = min(op.end_s, now) - max(op.start_s, lo)
        if overlap > 0 and (op.node, op.stage) in busy:
            busy[(op.node, op.stage)] += overlap
    return {k: (1.0 - min(v, span) / span) if span > 0 else None for k, v in busy.items()}


class _EngineCollector:
    def __init__(self, metrics: ServeMetrics) -> None:
        self.m = metrics

    def collect(self):
        host = self.m.host
        if host.engine is None:      # still starting: nothing to read yet
            return
        snap = host.engine.last_snapshot   # taken on the engine thread (this is a scrape thread)
        waiting, running = host.in_flight()
        yield GaugeMetricFamily("lemix:num_requests_running", "Requests generating tokens", value=running)
        yield GaugeMetricFamily("lemix:num_requests_waiting", "Requests waiting for their first token",
                                value=waiting)
        yield GaugeMetricFamily("lemix:train_samples_queued", "Training samples accepted, not yet applied",
                                value=host.feed.queued)
        yield CounterMetricFamily("lemix:deprioritized_training_tasks", "Training tasks the scheduler "
                                  "deferred to protect inference SLOs", value=snap.deferred_total)
        yield CounterMetricFamily("lemix:offload_events", "KV / activation offloads to host memory",
                                  value=snap.offload_events)
        versions = GaugeMetricFamily("lemix:weight_version", "Weight version served by a node", labels=["node"])
        for n, v in enumerate(host.version):
            versions.add_metric([str(n)], v)
        yield versions
        idle = GaugeMetricFamily("lemix:idle_ratio", f"Idle fraction of a stage over the last "
                                 f"{IDLE_WINDOW_S:g} s", labels=["node", "stage"])
        for (n, s), v in idle_ratios(host.engine.recent_ops, host.nodes, host.stages, host.engine.clock.now()).items():
            if v is not None:
                idle.add_metric([str(n), str(s)], v)
        yield idle
        slo = self.m.slo_attainment
        if slo is not None:
            yield GaugeMetricFamily("lemix:slo_attainment", "Requests that met their SLO / all finished",
                                    value=slo)
        if host.train_losses:
            yield GaugeMetricFamily("lemix:train_loss", "Latest training micro-batch loss",
                                    value=host.train_losses[-1][2])
