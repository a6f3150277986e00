"""Predicted per-stage times of task shapes (the forecasts' inputs) and the SLO of each task.

Every figure comes from the latency formulas on OpCoeffs (latency.py): the scheduler's own,
calibrated model for forecasts, the true profile for SLOs (so every policy is judged by the same
SLO, whatever it knows). Results are cached per shape and dropped when the calibration changes.
"""
from __future__ import annotations

from lemix.sched.latency import LatencyModel, Profile
from lemix.sched.params import SchedParams
from lemix.types import OpKind, Task

Chain = list[tuple[int, tuple[float]]]   # a task's ops as runs (forecast.py) of one op each


class StageTimes:
    def __init__(self, lat: LatencyModel, truth: Profile, params: SchedParams) -> None:
        self.lat = lat
        self.truth = truth
        self.params = params
        self._raw: dict[tuple[int, int, bool], tuple[list[float], list[float]]] = {}
        self._times: dict[tuple[int, int, bool], list] = {}   # shape -> [version, fwd, bwd, chain]
        self._corr: tuple[int, list[float], list[float]] = (-1, [], [])
        self._slo: dict[int, float] = {}
        self._unloaded_fwd: dict[tuple[int, int], float] = {}   # (batch, tokens) -> forward pass, all stages
        self._unloaded_decode: dict[int, float] = {}            # kv tokens -> one decode iteration

    def of(self, task: Task) -> tuple[list[float], list[float]]:
        """Predicted per-stage forward (and backward) times of a task (shared lists: read only)."""
        return self.shape(task.batch_size, task.prompt_tokens, task.is_train)

    def shape(self, batch: int, tokens: int, train: bool) -> tuple[list[float], list[float]]:
        """Per-stage forward (and, for training, backward) times of a (batch x tokens) micro-batch:
        the raw model times cached per shape, times the current calibration factors, cached until
        the calibration changes. The same floats as LatencyModel.predict."""
        key = (batch, tokens, train)
        version = self.lat.version
        hit = self._times.get(key)
        if hit is not None and hit[0] == version:
            return hit[1], hit[2]
        raw = self._raw.get(key)
        if raw is None:
            p = self.lat.profile.stages
            raw = ([st.fwd.pass_s(batch, tokens) for st in p],
                   [st.bwd.pass_s(batch, tokens) for st in p] if train else [])
            self._raw[key] = raw
        cf, cb = self._corrections()
        fwd = [t * c for t, c in zip(raw[0], cf)]
        bwd = [t * c for t, c in zip(raw[1], cb)]
        self._times[key] = [version, fwd, bwd, None]   # the chain is made when first asked for
        return fwd, bwd

    def chain(self, batch: int, tokens: int, train: bool) -> Chain:
        """The whole chain of a fresh task of that shape, one op per run: forwards 0..S-1, then
        (training) backwards S-1..0. Cached like shape(); read only."""
        key = (batch, tokens, train)
        hit = self._times.get(key)
        if hit is None or hit[0] != self.lat.version:
            self.shape(batch, tokens, train)
            hit = self._times[key]
        if hit[3] is None:
            fwd, bwd = hit[1], hit[2]
            hit[3] = ([(s, (d,)) for s, d in enumerate(fwd)]
                      + [(s, (bwd[s],)) for s in range(len(bwd) - 1, -1, -1)])
        return hit[3]

    def _corrections(self) -> tuple[list[float], list[float]]:
        version = self.lat.version
        if self._corr[0] != version:
            S = self.params.stages
            self._corr = (version, [self.lat.correction(s, OpKind.FWD) for s in range(S)],
                          [self.lat.correction(s, OpKind.BWD) for s in range(S)])
        return self._corr[1], self._corr[2]

    def decode_iter_s(self, batch: int, kv: int) -> float:
        """One decode iteration of the node's batch through every stage."""
        return sum(self.lat.predict(OpKind.DECODE, s, batch, 1, kv) for s in range(self.params.stages))

    # ------------------------------------------------------------------ SLOs
    def slo_s(self, task: Task) -> float:
        slo = self._slo.get(task.task_id)
        if slo is None:
            slo = self.compute_slo(task)
            self._slo[task.task_id] = slo
        return slo

    def forget(self, task_ids: list[int]) -> None:
        for tid in task_ids:
            self._slo.pop(tid, None)

    def compute_slo(self, task: Task) -> float:
        """The task's end-to-end SLO: an absolute one (config, then the task's own), else
        slo_scale x its unloaded latency on the true profile (training: 3 x its forward pass;
        generate mode: plus its decode iterations at half its output's KV)."""
        if not task.is_train:
            if self.params.slo_e2e_s is not None:
                return self.params.slo_e2e_s
            if task.slo_s is not None:
                return task.slo_s
        prof = self.truth.stages
        shape = (task.batch_size, task.prompt_tokens)
        t = self._unloaded_fwd.get(shape)
        if t is None:
            t = self._unloaded_fwd[shape] = sum(st.fwd.pass_s(*shape) for st in prof)
        if task.is_train:
            t *= 3.0
        elif self.params.generate and task.output_tokens > 1:
            kv = task.prompt_tokens + task.output_tokens // 2
            it = self._unloaded_decode.get(kv)
            if it is None:
                it = self._unloaded_decode[kv] = sum(st.decode.decode_s(1, kv) for st in prof)
            t += (task.output_tokens - 1) * it
        return self.params.slo_scale * t

    def ttft_limit_s(self, task: Task) -> float | None:
        """The absolute TTFT SLO a request must also meet (generate mode, `--slo-ttft`)."""
        return self.params.slo_ttft_s if self.params.generate and not task.is_train else None
