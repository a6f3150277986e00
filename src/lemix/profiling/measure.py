"""Measuring a profile on the real stage workers of one node (`lemix profile`).

What is timed: the wall time around `StageWorker.handle(cmd)`, not the worker's `compute_s`.
The scheduler calibrates against op durations as the executor sees them (end - start of the op),
which include copying the input onto the device and the output back to host memory; those
copies are a fixed plus per-token cost that the a and b terms absorb. compute_s would leave
them out and make every forecast short by the same amount.

The order of work; each phase runs a warm-up round, then several timed rounds over its grid
(round-robin, see _Run), and keeps the median per point and stage:
  1. Step on a deep copy of each stage (fake gradients), so the real optimizer and weights are
     never touched; the copy also gives the grads + AdamW state bytes.
  2. Inference forward (prefill with keep_kv, the common case) over a (batch C, length l) grid;
     the KV is freed after each call.
  3. Training forward + backward over the same grid (backward timed separately); the stashed
     activation bytes per token come from Memory() after the forward, and at the largest point
     each stash is offloaded and reloaded to measure the host copy bandwidth.
  4. Decode: prefill C sequences of P tokens, one untimed decode, then timed decode steps;
     K = the summed attended length (cached tokens + the new one), as the scheduler counts it.
     KV bytes per token come from Memory() after the prefill (P a multiple of the KV block, so
     the count is exact).
The training backward accumulates gradients; they are put back as they were at the end (None
for an idle worker), so the workers leave bit-identical, with no stash and no KV.
"""
from __future__ import annotations

import copy
import time
from collections.abc import Callable
from dataclasses import dataclass
from statistics import median

import numpy as np
import torch

from lemix.engine.kvcache import BLOCK_TOKENS
from lemix.engine.adapt import train_mode_of
from lemix.engine.messages import (Backward, Decode, Forward, Free, GetWeights, Memory, Offload,
                                   Reload, Step)
from lemix.profiling.fit import ProfileError, fit_const, fit_decode, fit_fwd
from lemix.sched.latency import Profile, StageProfile


@dataclass(frozen=True)
class Grid:
    shapes: tuple[tuple[int, int], ...]        # (C, l): inference forward and training fwd/bwd
    decode: tuple[tuple[int, int], ...]        # (C, P): batch and prompt length before decoding
    warmup: int
    repeats: int
    decode_steps: int                          # timed decode iterations per point and round

    def points(self, num_stages: int) -> int:
        """Progress units of a run: one per measured call of a grid point (warm-ups included)
        and one per stage's Step phase."""
        rounds = self.warmup + self.repeats
        return rounds * (2 * len(self.shapes) + len(self.decode)) + num_stages


def _shapes(batches, lengths, max_tokens) -> tuple[tuple[int, int], ...]:
    return tuple((c, l) for c in batches for l in lengths if c * l <= max_tokens)


QUICK = Grid(shapes=_shapes((1, 2, 4, 8), (16, 64, 256), 1024) + ((16, 32),),
             decode=tuple((c, p) for c in (1, 4, 16) for p in (16, 64, 256) if c * p <= 2048),
             warmup=1, repeats=5, decode_steps=3)
FULL = Grid(shapes=_shapes((1, 2, 4, 8, 16), (16, 32, 64, 128, 256, 512), 4096),
            decode=tuple((c, p) for c in (1, 2, 4, 8, 16, 32) for p in (16, 64, 256)),
            warmup=1, repeats=7, decode_steps=3)


def grid_size(*, quick: bool, num_stages: int) -> int:
    """How many times measure_profile calls progress(1): the total for a progress bar."""
    return (QUICK if quick else FULL).points(num_stages)


def _timed(worker, cmd):
    t0 = time.perf_counter()
    res = worker.handle(cmd)
    return res, time.perf_counter() - t0


class _Session:
    """One profiling run over the S workers of a node: fresh ids, pipeline walks, cleanup."""

    def __init__(self, workers: list, seed: int):
        self.workers = workers
        self.gen = torch.Generator().manual_seed(seed)
        self.vocab = workers[0].stage.cfg.vocab
        self.next_id = 0
        self.live_seqs: set[int] = set()
        self.live_batches: set[int] = set()

    def ids(self, n: int) -> tuple[int, ...]:
        out = tuple(range(self.next_id, self.next_id + n))
        self.next_id += n
        return out

    def tokens(self, C: int, l: int) -> torch.Tensor:
        return torch.randint(0, self.vocab, (C, l), generator=self.gen)      # [C,l]

    def forward(self, ids: torch.Tensor, *, train: bool, keep_kv: bool = False):
        """One micro-batch through all stages. Returns (batch id, seq ids, times per stage)."""
        C, l = ids.shape
        bid, seqs = self.ids(1)[0], self.ids(C)
        if train:
            self.live_batches.add(bid)
        if keep_kv:
            self.live_seqs.update(seqs)
        hidden, times, res = None, [], None
        for w in self.workers:
            first = w.stage_index == 0
            res, dt = _timed(w, Forward(bid, train, seqs, (l,) * C, input_ids=ids if first else None,
                                        hidden=hidden, labels=ids if w.stage.is_last else None,
                                        keep_kv=keep_kv))
            hidden = res.hidden
            times.append(dt)
        return bid, seqs, times, res

    def backward(self, bid: int) -> list[float]:
        grad, times = None, []
        for w in reversed(self.workers):
            res, dt = _timed(w, Backward(bid, grad))
            grad = res.grad_input
            times.append(dt)
        self.live_batches.discard(bid)
        return times[::-1]

    def decode(self, seqs: tuple[int, ...], tokens: tuple[int, ...]):
        hidden, times, res = None, [], None
        iter_id = self.ids(1)[0]
        for w in self.workers:
            first = w.stage_index == 0
            res, dt = _timed(w, Decode(iter_id, seqs, token_ids=torch.tensor(tokens) if first else None,
                                       hidden=hidden))
            hidden = res.hidden
            times.append(dt)
        return res.next_tokens, times

    def free(self, seqs=(), batches=()) -> None:
        for w in self.workers:
            w.handle(Free(seq_ids=tuple(seqs), batch_ids=tuple(batches)))
        self.live_seqs.difference_update(seqs)
        self.live_batches.difference_update(batches)


def _median_per_stage(runs: list[list[float]]) -> list[float]:
    return [median(r[s] for r in runs) for s in range(len(runs[0]))]


def _check_idle(workers) -> None:
    for w in workers:
        m = w.handle(Memory())
        if m.kv_bytes or m.act_bytes or m.host_bytes or w.stashes:
            raise ProfileError(f"stage {w.stage_index} holds KV or stashed activations; profile "
                               "idle workers")
    if [w.stage_index for w in workers] != list(range(len(workers))):
        raise ProfileError("workers must be the stages 0..S-1 of one node, in order")


def _measure_step(worker, grid: Grid) -> tuple[list[float], int]:
    """Step times on a deep copy of the stage with stand-in gradients; and grads + AdamW bytes."""
    twin = copy.deepcopy(worker)
    params = twin.trainable                           # LoRA: the adapters only

    def fake_grads():
        for p in params:
            p.grad = torch.full_like(p, 1e-3)

    times = []
    for r in range(grid.warmup + grid.repeats):      # the first step also allocates AdamW state
        fake_grads()
        _, dt = _timed(twin, Step())
        if r >= grid.warmup:
            times.append(dt)
    fake_grads()
    train_state = twin.handle(Memory()).optim_bytes
    del twin, params
    return times, train_state


def _estimated_tmp_bytes(worker, act_per_token: float) -> int:
    """Transient working memory of a forward, per token, where no allocator counts it (CPU):
    one layer's share of the stashed activations plus the stage's output (hidden [H] or logits
    [V] per token). On CUDA the peak is measured instead (_cuda_tmp)."""
    cfg = worker.stage.cfg
    out_width = cfg.vocab if worker.stage.is_last else cfg.hidden
    itemsize = torch.empty(0, dtype=worker._dtype).element_size()
    return int(act_per_token / max(1, worker.stage.num_layers) + out_width * itemsize)


def _cuda_tmp(session: _Session, C: int, l: int) -> list[int | None]:
    """Peak extra device memory of an inference forward per token, stage by stage (CUDA only)."""
    out: list[int | None] = []
    ids = session.tokens(C, l)
    hidden = None
    bid, seqs = session.ids(1)[0], session.ids(C)
    for w in session.workers:
        dev = w.device
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
            torch.cuda.reset_peak_memory_stats(dev)
            base = torch.cuda.memory_allocated(dev)
        res = w.handle(Forward(bid, False, seqs, (l,) * C, input_ids=ids if w.stage_index == 0 else None,
                               hidden=hidden))
        hidden = res.hidden
        out.append(int((torch.cuda.max_memory_allocated(dev) - base) / (C * l))
                   if dev.type == "cuda" else None)
    return out


def measure_profile(workers: list, *, model_name: str, device: str, quick: bool = False,
                    capacity_bytes: int, host_bandwidth_Bps: float | None = None,
                    network_bandwidth_Bps: float | None = None,
                    progress: Callable[[int], None] | None = None,
                    seed: int = 0) -> tuple[Profile, dict]:
    """Measure and fit a Profile on the S idle StageWorkers of one node (stage order).

    Returns the profile and the raw samples ({"stages": [{op: [[x1, x2, seconds], ...]}], ...}).
    `progress(n)` is called with n grid points just finished (grid_size gives the total).
    The network bandwidth defaults to the measured host copy bandwidth.

    Timings follow the current torch thread setting: set it as the engine will run (the local
    backend gives each of its workers cpu_count // workers threads) before calling this; on a
    CPU shared with other work, oversubscribed intra-op threads make the timings mostly noise.
    """
    if not workers:
        raise ProfileError("no workers to profile")
    _check_idle(workers)
    run = _Run(_Session(workers, seed), QUICK if quick else FULL, progress or (lambda n: None))
    grads = [[(p, None if p.grad is None else p.grad.detach().clone()) for p in w.stage.parameters()]
             for w in workers]
    try:
        run.optimizer_step()
        run.inference_forward()
        run.training()
        run.decode()
        tmp_cuda = run.cuda_tmp()
    finally:
        run.session.free(seqs=tuple(run.session.live_seqs), batches=tuple(run.session.live_batches))
        for pairs in grads:                      # the training backward accumulated into .grad
            for p, g in pairs:
                p.grad = g
    return _fit(workers, run.raw, run.copies, run.train_state, tmp_cuda, model_name=model_name,
                device=device, capacity_bytes=capacity_bytes, host_bandwidth_Bps=host_bandwidth_Bps,
                network_bandwidth_Bps=network_bandwidth_Bps, quick=quick, seed=seed)


class _Run:
    """The measuring phases of measure_profile; each fills `raw` (per stage, per op) and ticks.

    Repeats are taken round-robin: each round measures every grid point once, so a burst of
    outside load (a shared machine) spoils one repeat of several points rather than all repeats
    of one point, and the median drops it.
    """

    def __init__(self, session: _Session, grid: Grid, tick: Callable[[int], None]):
        self.session, self.grid, self.tick = session, grid, tick
        self.workers = session.workers
        self.raw = [{k: [] for k in ("fwd", "fwd_train", "bwd", "decode", "optim", "act_bytes",
                                     "kv_bytes")} for _ in self.workers]
        self.copies: list[list] = []             # [kind, bytes, seconds] of offloads / reloads
        self.train_state: list[int] = []
        self.largest = max(grid.shapes, key=lambda cl: cl[0] * cl[1])

    def _rounds(self, points, measure: Callable) -> dict:
        """measure(point, round) for every round and point; the results of the timed rounds."""
        runs: dict = {pt: [] for pt in points}
        for r in range(self.grid.warmup + self.grid.repeats):
            for pt in points:
                out = measure(pt, r)
                if r >= self.grid.warmup:
                    runs[pt].append(out)
                self.tick(1)
        return runs

    def _record(self, op: str, x1: int, x2: int, runs: list[list[float]]) -> None:
        for s, t in enumerate(_median_per_stage(runs)):
            self.raw[s][op].append([x1, x2, t])

    def optimizer_step(self) -> None:
        for s, w in enumerate(self.workers):
            times, nbytes = _measure_step(w, self.grid)
            self.raw[s]["optim"] = times
            self.train_state.append(nbytes)
            self.tick(1)

    def inference_forward(self) -> None:
        ses = self.session

        def measure(shape, r):
            _, seqs, times, _ = ses.forward(ses.tokens(*shape), train=False, keep_kv=True)
            ses.free(seqs=seqs)
            return times

        for (C, l), runs in self._rounds(self.grid.shapes, measure).items():
            self._record("fwd", C, l, runs)

    def training(self) -> None:
        ses = self.session

        def measure(shape, r):
            C, l = shape
            bid, _, ftimes, _ = ses.forward(ses.tokens(C, l), train=True)
            if r == 0:
                for s, w in enumerate(self.workers):
                    self.raw[s]["act_bytes"].append([C, l, w.handle(Memory()).act_bytes])
            if shape == self.largest and r >= self.grid.warmup:
                self.copies.extend(_host_copies(self.workers, bid))
            return ftimes, ses.backward(bid)

        for (C, l), runs in self._rounds(self.grid.shapes, measure).items():
            self._record("fwd_train", C, l, [f for f, _ in runs])
            self._record("bwd", C, l, [b for _, b in runs])

    def decode(self) -> None:
        ses = self.session

        def measure(point, r):
            """Prefill, one untimed decode (it may grow the KV blocks), then the timed steps."""
            C, P = point
            _, seqs, _, res = ses.forward(ses.tokens(C, P), train=False, keep_kv=True)
            if r == 0 and P % BLOCK_TOKENS == 0:     # exact KV capacity: bytes / tokens per token
                for s, w in enumerate(self.workers):
                    self.raw[s]["kv_bytes"].append([C, P, w.handle(Memory()).kv_bytes])
            tokens, _ = ses.decode(seqs, res.next_tokens)
            steps = []
            for _ in range(self.grid.decode_steps):
                tokens, times = ses.decode(seqs, tokens)
                steps.append(times)
            ses.free(seqs=seqs)
            return steps

        n = self.grid.decode_steps
        for (C, P), runs in self._rounds(self.grid.decode, measure).items():
            # step i sees P + 1 + i cached tokens per sequence, plus the new one
            k_mid = C * (P + 2 + (n - 1) / 2)
            self._record("decode", C, round(k_mid), [steps for rnd in runs for steps in rnd])

    def cuda_tmp(self) -> list[int | None]:
        if all(w.device.type != "cuda" for w in self.workers):
            return [None] * len(self.workers)
        return _cuda_tmp(self.session, *self.largest)


def _host_copies(workers, bid: int) -> list[list]:
    """Offload then reload each stage's stash of micro-batch `bid`: [kind, bytes, seconds]."""
    out = []
    for w in workers:
        for kind, cmd in (("offload", Offload("act", (bid,))), ("reload", Reload("act", (bid,)))):
            res, dt = _timed(w, cmd)
            if res.moved_bytes > 0:
                out.append([kind, res.moved_bytes, dt])
    return out


def _per_token(rows: list[list]) -> float:
    """Bytes per token at the longest sequences measured (the largest, and the case that matters
    for the memory gate when attention adds per-token bytes that grow with length)."""
    if not rows:
        return 0.0
    l_max = max(r[1] for r in rows)
    return max(r[2] / (r[0] * r[1]) for r in rows if r[1] == l_max)


def _fit(workers, raw, copies, train_state, tmp_cuda, *, model_name, device, capacity_bytes,
         host_bandwidth_Bps, network_bandwidth_Bps, quick, seed) -> tuple[Profile, dict]:
    stages, fit_error = [], {}
    for s, w in enumerate(workers):
        r = raw[s]
        fwd, fit_error[f"stage{s}.fwd"] = fit_fwd(r["fwd"])
        bwd, fit_error[f"stage{s}.bwd"] = fit_fwd(r["bwd"])
        decode, fit_error[f"stage{s}.decode"] = fit_decode(r["decode"])
        optim, fit_error[f"stage{s}.optim"] = fit_const(r["optim"])
        # One fwd model serves prefill and training forwards; it is fitted on prefill (what the
        # TTFT forecast needs). How far the slower training forwards are from it:
        fit_error[f"stage{s}.fwd_train"] = float(np.mean(
            [abs(fwd.a + fwd.b * C * l + fwd.c * C * l * l - t) / t for C, l, t in r["fwd_train"]]))
        act = _per_token(r["act_bytes"])
        tmp = tmp_cuda[s] if tmp_cuda[s] is not None else _estimated_tmp_bytes(w, act)
        kv = _per_token(r["kv_bytes"])
        stages.append(StageProfile(
            fwd=fwd, bwd=bwd, decode=decode, optim=optim,
            weight_bytes=w.handle(Memory()).weights_bytes, train_state_bytes=int(train_state[s]),
            act_bytes_per_token=round(act), tmp_bytes_per_token=int(tmp),
            kv_bytes_per_token=round(kv), layers=w.stage.num_layers,
            sync_bytes=sum(t.nbytes for t in w.handle(GetWeights()).state_dict.values())))
    if host_bandwidth_Bps is None:
        if not copies:
            raise ProfileError("no host copy was measured; pass host_bandwidth_Bps")
        host_bandwidth_Bps = median(b / t for _, b, t in copies)
    dtype = workers[0].stage.adapt.dtype
    profile = Profile(model=model_name, device=device, dtype=dtype, stages=tuple(stages),
                      train_mode=train_mode_of(workers[0].stage),
                      capacity_bytes=int(capacity_bytes), host_bandwidth_Bps=float(host_bandwidth_Bps),
                      network_bandwidth_Bps=float(host_bandwidth_Bps if network_bandwidth_Bps is None
                                                  else network_bandwidth_Bps),
                      fit_error=fit_error)
    samples = {"stages": raw, "host_copy": copies, "quick": quick, "seed": seed,
               "timing": "wall time around StageWorker.handle(), median of repeats"}
    return profile, samples
