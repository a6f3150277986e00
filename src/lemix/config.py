"""One pydantic schema for a LeMix run: cluster, model, workload, policy, SLO.

Loaded from YAML (`--config FILE`) with CLI flags overriding it. Validation writes nothing and
fails before anything runs, naming the field and what is allowed.
"""
from __future__ import annotations

import re
import warnings
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, Field, ValidationError, field_validator, model_validator

from lemix.config_commands import ExportConfig, ProfilerConfig, ServeConfig, Strict, SweepConfig
from lemix.config_workload import DEFAULT_REQUEST_RATE, WorkloadConfig  # noqa: F401  (re-exported)
from lemix.sched.params import SchedParams
from lemix.sched.policies import policy_names

_SP = SchedParams()   # the scheduler's defaults: the policy and SLO fields below take theirs


# Defaults of `lemix run` where they differ from `lemix simulate`: a real tiny model on a
# 2-core CPU, so fewer workers, short sequences and a short run (under 3 minutes for 3 policies).
RUN_DEFAULTS: dict[str, Any] = {
    "cluster.nodes": 2,
    "cluster.stages": 2,
    "workload.request_rate": 4.0,
    "workload.duration_s": 30.0,
    "workload.train_batch_size": 4,
    "workload.train_seq_tokens": 128,
    "workload.max_prompt_tokens": 256,
    "workload.max_output_tokens": 32,
    "policy.names": ["lemix", "naivemix", "separate"],
    "policy.microbatches": 2,
    "policy.average_every": 4,
}


class ConfigError(ValueError):
    """An invalid configuration; the message names the field and what is allowed."""


class LemixDeprecationWarning(FutureWarning):
    """A deprecated spelling that still works as before; the message says what to use instead.
    (A FutureWarning, so Python shows it to users by default.)"""


_Strict = Strict


class ClusterConfig(_Strict):
    nodes: int = Field(4, ge=1, le=4096, description="data-parallel nodes, each a full replica")
    stages: int = Field(2, ge=1, le=64, description="pipeline stages per node (one device each)")
    device_memory_gb: float = Field(48.0, gt=0, description="memory per device (GB)")
    host_bandwidth_gbps: float = Field(16.0, gt=0, description="host<->device copy bandwidth (GB/s)")
    network_bandwidth_gbps: float = Field(10.0, gt=0, description="node<->node bandwidth for weight sync (GB/s)")
    device: str = Field("cpu", description="real engine: 'cpu', 'cuda' (one cuda:i per stage, round-robin) "
                        "or a comma list of cpu / cuda:N with one device per stage")
    backend: Literal["local", "ray"] = Field("local", description="real engine: stage workers as local "
                                            "threads, or Ray actors (one placement group per node)")
    clock: Literal["wall", "virtual"] = Field("wall", description="real engine: 'wall' runs ops in real time "
                                              "(profile measured here); 'virtual' times them on the modeled "
                                              "cluster (the simulator's profile, loop and noise) while "
                                              "computing them for real: reproducible on any machine")
    ray_address: str | None = Field(None, description="Ray backend: a cluster address ('auto' joins a "
                                    "running cluster); default: start a local Ray")

    @field_validator("device")
    @classmethod
    def _known_device(cls, v: str) -> str:
        parts = [d.strip() for d in v.split(",")]
        for d in parts:
            if not _DEVICE.fullmatch(d):
                raise ValueError(f"unknown device {d!r}; allowed: cpu, cuda, cuda:N, or a comma list "
                                 f"of cpu / cuda:N (one per stage)")
        if len(parts) > 1 and "cuda" in parts:
            raise ValueError("'cuda' spreads the stages itself; in a comma list name cuda:N")
        return ",".join(parts)


_DEVICE = re.compile(r"cpu|cuda|cuda:\d+")


class ModelConfig(_Strict):
    name: str = Field("builtin-tiny", description="real engine: 'builtin-tiny' or a local HF checkpoint dir")
    sim_model: Literal["3b", "7b", "tiny"] = Field("3b", description="modeled model size of the default simulator profile")
    profile: str | None = Field(None, description="profile JSON from `lemix profile`; default: built-in")
    force_profile: bool = Field(False, description="accept a profile made for another model, stage count "
                                "or device")
    sim_preset: str | None = Field(None, description="simulator: a modeled preset (model, dtype, training "
                                   "mode, device) instead of sim_model; see lemix.sched.presets")
    tokenizer: str | None = Field(None, description="tokenizer dir (default: the checkpoint's own files)")
    byte_tokenizer: bool = Field(False, description="use the byte-level tokenizer with a checkpoint "
                                 "that has no tokenizer files (on purpose)")
    lr: float = Field(3e-4, gt=0, description="real engine: AdamW learning rate")
    weight_decay: float = Field(0.0, ge=0, description="real engine: AdamW weight decay")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="real engine: weight and compute dtype (auto = the checkpoint's torch_dtype)")
    lora_rank: int = Field(0, ge=0, description="real engine: train LoRA adapters of this rank (0 = all weights)")
    lora_alpha: float | None = Field(None, gt=0, description="LoRA alpha (default 2 x rank)")
    lora_targets: list[str] | None = Field(None, description="LoRA target modules, HF names, comma list "
                                           "(default: the attention projections)")
    recompute: bool = Field(False, description="real engine: recompute each stage's forward in its "
                            "backward instead of stashing activations")

    @field_validator("lora_targets", mode="before")
    @classmethod
    def _split_targets(cls, v: Any) -> Any:
        if isinstance(v, str):
            v = [t.strip() for t in v.split(",") if t.strip()]
        if v is not None and not v:
            raise ValueError("at least one target module is required")
        return v

    @field_validator("sim_preset")
    @classmethod
    def _known_preset(cls, v: str | None) -> str | None:
        from lemix.sched.presets import PRESETS

        if v is not None and v not in PRESETS:
            raise ValueError(f"unknown preset {v!r}; allowed: {', '.join(PRESETS)}")
        return v


class PolicyConfig(_Strict):
    # defaults are SchedParams' (the scheduler's own), so the two cannot disagree
    names: list[str] = Field(default_factory=lambda: [_SP.policy], description="one policy, a comma list, "
                             "'all' or 'ablations'; registered: " + ", ".join(policy_names()))
    lambda1: float = Field(_SP.lambda1, ge=0, description="weight of response time R/SLO in lemix's score")
    lambda2: float = Field(_SP.lambda2, ge=0, description="weight of length consistency in lemix's score")
    tau: float = Field(_SP.tau, ge=0, description="idleness tolerance (in units of the task's own fill bubble) "
                                              "treated as a tie")
    tau_r: float = Field(_SP.tau_r, gt=0, description="defer training when predicted response > tau_r x SLO")
    t_max_s: float = Field(_SP.t_max_s, ge=0, description="memory gate: wait this long before offloading")
    kappa: float = Field(_SP.kappa, gt=0, le=1, description="memory gate threshold as a fraction of capacity")
    min_train_share: float = Field(_SP.min_train_share, ge=0, le=1, description="starvation bound for deferred training")
    max_defer_s: float = Field(_SP.max_defer_s, gt=0, description="a deferred training task is placed after this long")
    max_batch: int = Field(_SP.max_batch, ge=1, description="C: max sequences in an inference batch")
    max_wait_s: float = Field(_SP.max_wait_s, ge=0, description="T_w: max time a request waits to fill a batch")
    pipeline: Literal["apipe", "gpipe", "1f1b"] = Field(_SP.pipeline, description="training pipeline: "
                                                        "asynchronous, GPipe or 1F1B")
    microbatches: int = Field(_SP.microbatches, ge=1, description="M: micro-batches per S-PP round")
    sync_every: int = Field(_SP.sync_every, ge=1, description="K: training steps between weight syncs (separate)")
    average_every: int = Field(_SP.average_every, ge=0, description="co-located: average weights across training "
                               "nodes every K of a node's steps (0 = never)")
    merge_stagger: bool = Field(_SP.merge_stagger, description="a merge runs on one node at a time "
                                "(the others keep serving); each later node adds the average's "
                                "delta to its current weights (false: every node at once)")
    no_profile: bool = Field(_SP.no_profile, description="start from a generic latency model and "
                             "calibrate online")
    calibration_period_s: float = Field(_SP.calibration_period_s, ge=0, description="online calibration "
                                        "epochs: measured/predicted factors are published to the "
                                        "scheduler's predictions at most this often, in the scheduler's "
                                        "clock (0 = after every op)")
    calibration_tolerance: float = Field(_SP.calibration_tolerance, gt=0, description="... or at once "
                                         "when a factor moved more than this fraction from its "
                                         "published value")
    no_prioritization: bool = Field(_SP.no_prioritization, description="lemix without SLO-aware "
                                    "deprioritization")
    no_memory_check: bool = Field(_SP.no_memory_check, description="lemix without the wait-or-offload "
                                  "memory gate")
    no_chunking: bool = Field(_SP.no_chunking, description="lemix without bounded blocking (one training "
                              "op per stage)")
    no_late_binding: bool = Field(_SP.no_late_binding, description="lemix places training at arrival, "
                                  "not when a node has room")
    eq4_inference_only: bool = Field(_SP.eq4_inference_only, description="lemix: Eq. 4 forecasts queued "
                                     "inference only, not the training ahead of it")
    no_lookahead_slack: bool = Field(_SP.no_lookahead_slack, description="lemix: the lookahead never lets "
                                     "a training chunk delay inference on its way")
    train_queue_depth: int = Field(_SP.train_queue_depth, ge=1, description="lemix late binding: placed "
                                   "training tasks waiting per node to enter its pipeline")
    train_chunk_ms: float | None = Field(_SP.train_chunk_ms, gt=0, description="lemix: longest predicted "
                                         "training chunk (ms); default chunk_frac x the tightest SLO in force")
    chunk_frac: float = Field(_SP.chunk_frac, gt=0, description="lemix: a training chunk's predicted time "
                              "under this x the tightest SLO in force")
    no_slo_batching: bool = Field(_SP.no_slo_batching, description="lemix: batch prefills first come, "
                                  "first served (no request joins a batch it or a member would miss in)")
    backlog_floor: bool = Field(_SP.backlog_floor, description="lemix: while both workloads are backlogged, "
                                "training's device-time floor is separation's training share of nodes")
    chunk_quiet_s: float | None = Field(_SP.chunk_quiet_s, gt=0, description="lemix: train unchunked once no "
                                        "request arrived this long (null: always chunk)")
    no_solo_training: bool = Field(_SP.no_solo_training, description="lemix: on a quiet cluster (no "
                                   "request for chunk_quiet_s, none present) training stays inference-first "
                                   "(backward before new admissions) instead of first ready, as on a trainer")
    no_host_gate: bool = Field(_SP.no_host_gate, description="lemix on the wall-clock engine on CPUs: do not cap "
                               "training ops to the concurrency the shared host runs without slowing inference")
    host_slowdown: float = Field(_SP.host_slowdown, gt=1, description="lemix host gate: a learned slowdown of "
                                 "inference above this, with k other devices busy, leaves training k-1 slots")
    adaptive_chunks: bool = Field(_SP.adaptive_chunks, description="lemix: while a node serves nothing, "
                                  "a training op covers as many chunks as the tight request arriving "
                                  "then would still meet its SLO behind (false: one chunk per op)")
    step_first: bool = Field(_SP.step_first, description="lemix: a due optimizer step goes before the "
                             "inference waiting on its device (default: after it)")
    no_lookahead_queued: bool = Field(_SP.no_lookahead_queued, description="lemix: the lookahead sees only "
                                      "inference running on the stage before, not inference queued there "
                                      "behind a training op")

    @field_validator("names", mode="before")
    @classmethod
    def _split_names(cls, v: Any) -> Any:
        if isinstance(v, str):
            v = [p.strip() for p in v.split(",") if p.strip()]
        if isinstance(v, list) and v == ["all"]:
            return [n for n in policy_names() if "/" not in n]
        if isinstance(v, list) and v == ["ablations"]:
            return ["lemix"] + [n for n in policy_names() if n.startswith("lemix/")]
        known = policy_names()
        for name in v or []:
            if name not in known:
                raise ValueError(f"unknown policy {name!r}; allowed: {', '.join(known)}, all, ablations")
        if not v:
            raise ValueError("at least one policy is required")
        return v


class SLOConfig(_Strict):
    scale: float = Field(_SP.slo_scale, gt=0, description="SLO = scale x the request's unloaded latency")
    ttft_s: float | None = Field(None, gt=0, description="absolute TTFT SLO (generate mode): a request meets "
                                  "its SLO only if its TTFT is within it too")
    e2e_s: float | None = Field(None, gt=0, description="absolute end-to-end SLO")


class LemixConfig(_Strict):
    cluster: ClusterConfig = Field(default_factory=ClusterConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    workload: WorkloadConfig = Field(default_factory=WorkloadConfig)
    policy: PolicyConfig = Field(default_factory=PolicyConfig)
    slo: SLOConfig = Field(default_factory=SLOConfig)
    serve: ServeConfig = Field(default_factory=ServeConfig)
    sweep: SweepConfig = Field(default_factory=SweepConfig)
    profiler: ProfilerConfig = Field(default_factory=ProfilerConfig)
    export: ExportConfig = Field(default_factory=ExportConfig)
    seed: int = Field(0, description="seed of the workload, the simulator's noise and the model's init")
    out: str | None = Field(None, description="output: the run directory (default runs/<command>-<time>), "
                            "profile.json for profile, the HF directory for export")
    progress: bool = Field(True, description="show progress bars")

    @model_validator(mode="after")
    def _devices_per_stage(self) -> "LemixConfig":
        n = len(self.cluster.device.split(","))
        if self.cluster.device not in ("cpu", "cuda") and n != self.cluster.stages:
            raise ValueError(f"cluster.device lists {n} devices for {self.cluster.stages} stages "
                             f"(give one per stage, or 'cpu' / 'cuda')")
        return self

    def sched_params(self, policy: str) -> SchedParams:
        p = self.policy
        return SchedParams(
            policy=policy, nodes=self.cluster.nodes, stages=self.cluster.stages,
            lambda1=p.lambda1, lambda2=p.lambda2, tau=p.tau, tau_r=p.tau_r, t_max_s=p.t_max_s,
            kappa=p.kappa, min_train_share=p.min_train_share, max_defer_s=p.max_defer_s,
            max_batch=p.max_batch, max_wait_s=p.max_wait_s, pipeline=p.pipeline,
            microbatches=p.microbatches, sync_every=p.sync_every, average_every=p.average_every,
            merge_stagger=p.merge_stagger,
            generate=self.workload.mode == "generate",
            train_share=self.workload.effective_train_share,
            no_profile=p.no_profile, calibration_period_s=p.calibration_period_s,
            calibration_tolerance=p.calibration_tolerance, no_prioritization=p.no_prioritization,
            no_memory_check=p.no_memory_check, no_chunking=p.no_chunking, train_chunk_ms=p.train_chunk_ms,
            chunk_frac=p.chunk_frac, no_late_binding=p.no_late_binding, eq4_inference_only=p.eq4_inference_only, no_lookahead_slack=p.no_lookahead_slack, train_queue_depth=p.train_queue_depth,
            no_slo_batching=p.no_slo_batching, backlog_floor=p.backlog_floor, chunk_quiet_s=p.chunk_quiet_s,
            no_solo_training=p.no_solo_training,
            no_host_gate=p.no_host_gate, host_slowdown=p.host_slowdown,
            adaptive_chunks=p.adaptive_chunks, step_first=p.step_first,
            no_lookahead_queued=p.no_lookahead_queued,
            slo_scale=self.slo.scale, slo_ttft_s=self.slo.ttft_s,
            slo_e2e_s=self.slo.e2e_s, seed=self.seed, **self._backlog(),
        )

    @property
    def shared_host(self) -> bool:
        """On the wall-clock engine: its devices share one host's CPU cores (the scheduler learns
        the host's contention, sched/contention.py). The engine sets SchedParams.shared_host from
        it; sched_params leaves it off (the simulator has no host)."""
        return self.cluster.clock == "wall" and all(d.strip() == "cpu" for d in self.cluster.device.split(","))

    def _backlog(self) -> dict:
        w = self.workload
        if not w.train_backlog:
            return {}
        return dict(train_backlog=True, backlog_batch=w.train_batch_size, backlog_tokens=w.train_seq_tokens,
                    backlog_until_s=w.duration_s)

    def to_yaml(self) -> str:
        """The config as YAML for `--config`; serve.api_key is left out (never write a secret to a
        run directory: api_key_file and $LEMIX_API_KEY carry it)."""
        tree = self.model_dump(mode="json")
        tree["serve"]["api_key"] = None
        return yaml.safe_dump(tree, sort_keys=False)


def _format_error(err: ValidationError, labels: dict[str, str] | None = None) -> str:
    """One line: `field: what is wrong (got value)` per error; `labels` (dotted field -> flag)
    names the flag a value came from: `--port (serve.port): ...`."""
    lines = []
    for e in err.errors():
        field = ".".join(str(p) for p in e["loc"]) or "config"
        flag = next((f for k, f in (labels or {}).items() if field == k or field.startswith(k + ".")), None)
        field = f"{flag} ({field})" if flag else field
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] == "extra_forbidden":
            msg = "unknown field"
        got = e.get("input")
        whole = isinstance(got, (dict, BaseModel)) or e["type"] == "extra_forbidden"   # a section's own rule
        shown = "" if whole else f" (got {got!r})"
        lines.append(f"{field}: {msg}{shown}" if e["loc"] else msg)   # a rule across sections names its fields
    return "invalid config: " + "; ".join(lines)


def _set_dotted(tree: dict, dotted: str, value: Any, *, overwrite: bool = True) -> None:
    """tree["a"]["b"] = value for "a.b"; with overwrite=False only where nothing is set yet."""
    node = tree
    parts = dotted.split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"invalid config: {dotted}: {part} is not a section")
    if overwrite:
        node[parts[-1]] = value
    else:
        node.setdefault(parts[-1], value)


# Fields that say the same thing two ways: setting one (by an override, or in the YAML over a
# command's base) clears the other to the value given here, so a flag overrides the config.
_ALTERNATIVES: dict[str, tuple[str, Any]] = {
    "workload.request_rate": ("workload.rate", None),
    "workload.rate": ("workload.request_rate", None),
    "workload.burstiness": ("workload.burstiness_cv2", None),
    "workload.burstiness_cv2": ("workload.burstiness", 1.0),
    "workload.train_rate": ("workload.train_share", None),
    "workload.train_share": ("workload.train_rate", None),
}


def _get_dotted(tree: dict, dotted: str) -> Any:
    node: Any = tree
    for part in dotted.split("."):
        node = node.get(part) if isinstance(node, dict) else None
    return node


def _apply(tree: dict, overrides: dict[str, Any], *, skip_none: bool) -> None:
    for key, value in overrides.items():
        if value is None and skip_none:
            continue
        _set_dotted(tree, key, value)
        other = _ALTERNATIVES.get(key)
        if other and value is not None and other[0] not in overrides:
            _set_dotted(tree, other[0], other[1])


def deprecations(cfg: LemixConfig) -> list[str]:
    """What a config says the deprecated way, or says to no effect, each with what to say instead."""
    w, out = cfg.workload, []
    if w.arrival == "trace" and w.request_rate is not None:   # only set by the user with a trace
        out.append("workload.request_rate (--request-rate) has no effect with a trace: it replays its own "
                   "arrival times; scale them with workload.trace_speedup (--trace-speedup)")
    if w.rate is not None and w.requests_per_s is None:    # a trace brings its own arrivals
        out.append("workload.rate (--rate) is deprecated, and a trace sets its own request arrivals: "
                   "it has no effect here; drop it")
    elif w.rate is not None:
        share = w.arrival_train_share
        per = f" = {w.rate:g} x (1 - {share:g}) = {w.requests_per_s:g}" if share else f" = {w.rate:g}"
        out.append(f"workload.rate (--rate) is deprecated: it counts training tasks too; use "
                   f"workload.request_rate (--request-rate, requests/s as in vllm bench serve){per}, and "
                   f"workload.train_rate (--train-rate) or train_share (--train-share) for training")
    if w.burstiness_cv2 is not None:
        out.append(f"workload.burstiness_cv2 (--burstiness-cv2) is deprecated: use workload.burstiness "
                   f"(--burstiness, vllm bench serve's Gamma shape: 1 = Poisson, lower = burstier) = "
                   f"1 / CV^2 = {1.0 / w.burstiness_cv2:g}")
    if cfg.sweep.rates:
        out.append("sweep.rates (--rates) is deprecated: total task rates count training too; use "
                   "sweep.request_rates (--request-rates, requests/s)")
    return out


def load_config(path: str | Path | None = None, overrides: dict[str, Any] | None = None,
                base: dict[str, Any] | None = None, labels: dict[str, str] | None = None) -> LemixConfig:
    """Read YAML (optional), apply dotted overrides (`workload.request_rate` -> value), validate.

    `base` holds a command's own defaults (dotted keys); the YAML and the overrides win over it.
    An override of one of two alternative fields (request_rate / the deprecated rate, burstiness /
    burstiness_cv2, train_rate / train_share) clears the other. A deprecated field still means what
    it meant and warns (LemixDeprecationWarning) with what to use instead. `labels` (dotted field ->
    flag) puts the flag into error messages.
    """
    tree: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file {str(p)!r} does not exist")
        try:
            loaded = yaml.safe_load(p.read_text())
        except yaml.YAMLError as e:
            raise ConfigError(f"config file {str(p)!r} is not valid YAML: {e}") from None
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"config file {str(p)!r} must hold a mapping of sections")
        tree = loaded or {}
    _apply(tree, overrides or {}, skip_none=True)
    own: dict[str, Any] = {}
    for key, value in (base or {}).items():   # a later base key wins over its alternative
        own.pop(_ALTERNATIVES.get(key, ("",))[0], None)
        own[key] = value
    for key, value in own.items():
        other = _ALTERNATIVES.get(key)
        if not (other and _get_dotted(tree, other[0]) not in (None, other[1])):
            _set_dotted(tree, key, value, overwrite=False)
    try:
        cfg = LemixConfig.model_validate(tree)
    except ValidationError as e:
        raise ConfigError(_format_error(e, labels)) from None
    for msg in deprecations(cfg):
        warnings.warn(msg, LemixDeprecationWarning, stacklevel=2)
    return cfg


def with_overrides(cfg: LemixConfig, overrides: dict[str, Any]) -> LemixConfig:
    """A validated copy of `cfg` with dotted fields replaced (`{"workload.rate": 32}`).

    Unlike load_config's overrides, a None value here clears the field (e.g. `workload.trace`);
    as there, setting one of two alternative fields clears the other.
    """
    tree = cfg.model_dump(mode="json")
    _apply(tree, overrides, skip_none=False)
    try:
        return LemixConfig.model_validate(tree)
    except ValidationError as e:
        raise ConfigError(_format_error(e)) from None
