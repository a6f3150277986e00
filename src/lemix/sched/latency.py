"""Latency model (DESIGN section 4): per stage and op type, fitted coefficients.

    t_fwd(C, l)    = a + b*C*l + c*C*l^2        (same form for bwd)
    t_decode(C, K) = a + b*C + c*K              (K = summed KV length of the batch)
    t_optim        = a

plus online calibration: a per-(stage, op) EWMA of measured / predicted, published in epochs.

Calibration epochs: every measured op updates the EWMA at once, but predictions use the factors
as last published, and a publish (one `version` bump) happens only when `period_s` of the
caller's time has passed since the last one, or when some factor's EWMA moved more than
`tolerance` (relative) from its published value (a first measurement always does). So between
epochs every prediction, forecast and chunk plan is a function of state and time alone: caches
keyed on `version` hit, and a forecast timeline built once is the one any later build would give
(sched/timelines.py). period_s = 0 publishes every measurement (the calibration before epochs).
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace

from lemix.types import Op, OpKind


@dataclass(frozen=True)
class OpCoeffs:
    a: float = 0.0
    b: float = 0.0
    c: float = 0.0

    def scaled(self, k: float) -> "OpCoeffs":
        return OpCoeffs(self.a * k, self.b * k, self.c * k)

    # The latency formulas (DESIGN section 4), written here only: every prediction, forecast
    # and SLO is computed by these two.
    def pass_s(self, batch: int, tokens: int, frac: float = 1.0) -> float:
        """A forward or backward of `batch` sequences of `tokens` (padded) tokens; `frac` < 1:
        over that fraction of the stage's layers (a chunk, sched/chunking.py), which pays the
        per-op constant `a` in full."""
        if frac == 1.0:
            return self.a + self.b * batch * tokens + self.c * batch * tokens * tokens
        return self.a + frac * (self.b * batch * tokens + self.c * batch * tokens * tokens)

    def decode_s(self, batch: int, kv_tokens: int) -> float:
        """A decode iteration of `batch` sequences holding `kv_tokens` of KV cache in all."""
        return self.a + self.b * batch + self.c * kv_tokens


@dataclass(frozen=True)
class StageProfile:
    """Latency coefficients and memory figures of one pipeline stage."""

    fwd: OpCoeffs
    bwd: OpCoeffs
    decode: OpCoeffs
    optim: OpCoeffs
    weight_bytes: int            # served weights (what a weight sync copies)
    train_state_bytes: int       # grads + optimizer state, resident on a node that trains
    act_bytes_per_token: int     # stashed activations of a training micro-batch, per token
    tmp_bytes_per_token: int     # transient working memory of a forward, per token
    kv_bytes_per_token: int      # KV cache per token of a sequence
    layers: int = 0              # decoder layers of the stage (0: unknown; training ops are not chunked)
    sync_bytes: int | None = None  # what a weight sync / merge moves (LoRA: the adapters); None = weight_bytes

    @property
    def copy_bytes(self) -> int:
        """Bytes a weight sync or merge of this stage moves."""
        return self.weight_bytes if self.sync_bytes is None else self.sync_bytes


@dataclass(frozen=True)
class Profile:
    """Everything the scheduler needs to predict op durations and memory, per stage."""

    model: str
    device: str
    dtype: str
    stages: tuple[StageProfile, ...]
    capacity_bytes: int          # memory per device
    host_bandwidth_Bps: float    # offload/reload
    network_bandwidth_Bps: float # weight sync
    fit_error: dict = field(default_factory=dict)
    train_mode: str = "full"     # how the model trains: "full", "lora r=16 alpha=32", "+recompute"

    @property
    def num_stages(self) -> int:
        return len(self.stages)


# Modeled models for the default profile: layers, hidden size, KV width (GQA), parameters.
_MODELS = {
    "tiny": dict(layers=4, hidden=128, kv_hidden=64, params=1.0e6),
    "3b": dict(layers=26, hidden=3072, kv_hidden=3072, params=3.0e9),
    "7b": dict(layers=32, hidden=4096, kv_hidden=4096, params=6.7e9),
}


def default_profile(
    *,
    model: str = "3b",
    stages: int = 2,
    capacity_bytes: int = 48 * 10**9,
    host_bandwidth_Bps: float = 16e9,
    network_bandwidth_Bps: float = 10e9,
) -> Profile:
    """A built-in profile of a modeled A6000-class GPU (about 100 TFLOP/s fp16, 768 GB/s).

    Compute ~ 2*params FLOPs per token forward (backward twice that), attention ~ 4*L*h*l^2 per
    sequence; decode is bandwidth-bound (weights + KV read once per iteration). It lets the
    simulator run without profiling first; `lemix profile` measures a real one.
    """
    if model not in _MODELS:
        raise ValueError(f"unknown modeled model {model!r}; allowed: {', '.join(_MODELS)}")
    m = _MODELS[model]
    flops, bw = 100e12, 768e9
    layers = m["layers"]
    per_layer_params = m["params"] / layers
    out = []
    for s in range(stages):
        nl = layers // stages + (1 if s < layers % stages else 0)
        frac = nl / layers
        params = m["params"] * frac
        fwd = OpCoeffs(a=1.0e-3, b=2 * params / flops, c=4 * nl * m["hidden"] / flops)
        kv_tok = 2 * nl * m["kv_hidden"] * 2  # K and V, fp16
        decode = OpCoeffs(a=2 * params / bw + 0.5e-3, b=2 * per_layer_params * nl / flops * 4, c=kv_tok / bw)
        out.append(StageProfile(
            fwd=fwd,
            bwd=fwd.scaled(2.0),
            decode=decode,
            optim=OpCoeffs(a=params * 16 / bw),           # read/write fp32 master + Adam moments
            weight_bytes=int(params * 2),
            train_state_bytes=int(params * 14),           # fp32 master(4) + Adam(8) + grads(2)
            act_bytes_per_token=int(nl * m["hidden"] * 16),  # selective recomputation
            tmp_bytes_per_token=int(m["hidden"] * 16),
            kv_bytes_per_token=int(kv_tok),
            layers=nl,
        ))
    return Profile(model=f"modeled-{model}", device="modeled-a6000", dtype="float16",
                   stages=tuple(out), capacity_bytes=capacity_bytes,
                   host_bandwidth_Bps=host_bandwidth_Bps, network_bandwidth_Bps=network_bandwidth_Bps)


def generic_profile(like: Profile) -> Profile:
    """What a scheduler knows with no profile (`--no-profile`): one flat guess for every stage,
    off by a factor from the truth; online calibration has to find the scale."""
    s0 = like.stages[0]
    guess = replace(s0, fwd=s0.fwd.scaled(2.5), bwd=s0.fwd.scaled(2.5), decode=s0.decode.scaled(0.4),
                    optim=s0.optim.scaled(3.0))
    return replace(like, model=like.model + "+generic", stages=tuple(guess for _ in like.stages))


def layer_fraction(st: StageProfile, layers: tuple[int, int] | tuple) -> float:
    """The fraction of the stage's layers an op over `layers` ([first, end); () = all) covers."""
    if not layers or st.layers <= 0:
        return 1.0
    return (layers[1] - layers[0]) / st.layers


def _raw(profile: Profile, kind: OpKind, stage: int, batch: int, seq: int, kv: int, nbytes: int,
         layers: tuple = ()) -> float:
    st = profile.stages[stage]
    if kind is OpKind.FWD:
        return st.fwd.pass_s(batch, seq, layer_fraction(st, layers))
    if kind is OpKind.BWD:
        return st.bwd.pass_s(batch, seq, layer_fraction(st, layers))
    if kind is OpKind.DECODE:
        return st.decode.decode_s(batch, kv)
    if kind is OpKind.OPTIM:
        return st.optim.a
    if kind is OpKind.OFFLOAD or kind is OpKind.RELOAD:
        return nbytes / profile.host_bandwidth_Bps
    if kind is OpKind.SYNC:
        return nbytes / profile.network_bandwidth_Bps
    raise ValueError(f"no latency model for {kind}")


class LatencyModel:
    """Predicts op durations from a profile, corrected online by measured durations."""

    def __init__(self, profile: Profile, *, calibrate: bool = True, alpha: float = 0.2,
                 period_s: float = 0.0, tolerance: float = 0.1) -> None:
        self.profile = profile
        self.calibrate = calibrate
        self.alpha = alpha
        self.period_s = period_s        # calibration epochs (module docstring)
        self.tolerance = tolerance
        self._ratio: dict[tuple[int, OpKind], float] = {}   # published: what predictions use
        self._est: dict[tuple[int, OpKind], float] = {}     # the EWMAs, updated by every measurement
        self._published_s = float("-inf")
        self._raw_cache: dict[tuple, float] = {}
        self.version = 0  # bumped whenever the published corrections change (callers cache on it)

    def predict(self, kind: OpKind, stage: int, batch: int = 1, seq: int = 0, kv: int = 0,
                nbytes: int = 0, layers: tuple = ()) -> float:
        key = (kind, stage, batch, seq, kv, nbytes, layers)
        raw = self._raw_cache.get(key)
        if raw is None:   # the profile's time of an op of this shape (it never changes)
            if len(self._raw_cache) > 65536:
                self._raw_cache.clear()
            raw = self._raw_cache[key] = _raw(self.profile, kind, stage, batch, seq, kv, nbytes, layers)
        return raw * self._ratio.get((stage, kind), 1.0)

    def predict_op(self, op: Op) -> float:
        return self.predict(op.kind, op.stage, op.batch_size, op.seq_tokens, op.kv_tokens, op.bytes,
                            op.layers)

    def observe(self, op: Op, measured_s: float, at_s: float | None = None) -> None:
        """Calibration: fold measured/predicted of an op that finished at `at_s` (the caller's
        clock) into the stage's EWMA, and publish the EWMAs if an epoch is due (always when no
        time is given)."""
        if not self.calibrate or measured_s <= 0:
            return
        key = (op.kind, op.stage, op.batch_size, op.seq_tokens, op.kv_tokens, op.bytes, op.layers)
        raw = self._raw_cache.get(key)
        if raw is None:
            raw = _raw(self.profile, op.kind, op.stage, op.batch_size, op.seq_tokens, op.kv_tokens, op.bytes,
                       op.layers)
        if raw <= 0:
            return
        key = (op.stage, op.kind)
        obs = measured_s / raw
        old = self._est.get(key)
        est = self._est[key] = obs if old is None else (1 - self.alpha) * old + self.alpha * obs
        pub = self._ratio.get(key)
        if (at_s is None or at_s - self._published_s >= self.period_s or pub is None
                or abs(est - pub) > self.tolerance * pub):
            self._ratio.update(self._est)
            if at_s is not None:
                self._published_s = at_s
            self.version += 1

    def correction(self, stage: int, kind: OpKind) -> float:
        return self._ratio.get((stage, kind), 1.0)
