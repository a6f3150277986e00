"""One pydantic schema for a LeMix run: cluster, model, workload, policy, SLO.

Loaded from YAML (`--config FILE`) with CLI flags overriding it. Validation writes nothing and
fails before anything runs, naming the field and what is allowed.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from lemix.sched.params import SchedParams
from lemix.sched.policies import policy_names

_SP = SchedParams()   # the scheduler's defaults: the policy and SLO fields below take theirs


# Defaults of `lemix run` where they differ from `lemix simulate`: a real tiny model on a
# 2-core CPU, so fewer workers, short sequences and a short run (under 3 minutes for 3 policies).
RUN_DEFAULTS: dict[str, Any] = {
    "cluster.nodes": 2,
    "cluster.stages": 2,
    "workload.rate": 8.0,
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


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ClusterConfig(_Strict):
    nodes: int = Field(4, ge=1, le=4096, description="data-parallel nodes, each a full replica")
    stages: int = Field(2, ge=1, le=64, description="pipeline stages per node (one device each)")
    device_memory_gb: float = Field(48.0, gt=0, description="memory per device (GB)")
    host_bandwidth_gbps: float = Field(16.0, gt=0, description="host<->device copy bandwidth (GB/s)")
    network_bandwidth_gbps: float = Field(10.0, gt=0, description="node<->node bandwidth for weight sync (GB/s)")
    device: str = Field("cpu", description="real engine: 'cpu', 'cuda' (one cuda:i per stage) or a comma list")
    backend: Literal["local", "ray"] = "local"
    clock: Literal["wall", "virtual"] = Field("wall", description="real engine: 'wall' runs ops in real time "
                                              "(profile measured here); 'virtual' times them on the modeled "
                                              "cluster (the simulator's profile, loop and noise) while "
                                              "computing them for real: reproducible on any machine")
    ray_address: str | None = None


class ModelConfig(_Strict):
    name: str = Field("builtin-tiny", description="real engine: 'builtin-tiny' or a local HF checkpoint dir")
    sim_model: Literal["3b", "7b", "tiny"] = Field("3b", description="modeled model size of the default simulator profile")
    profile: str | None = Field(None, description="profile JSON from `lemix profile`; default: built-in")
    force_profile: bool = False
    sim_preset: str | None = Field(None, description="simulator: a modeled preset (model, dtype, training "
                                   "mode, device) instead of sim_model; see lemix.sched.presets")
    tokenizer: str | None = Field(None, description="tokenizer dir (default: the checkpoint's own files)")
    byte_tokenizer: bool = Field(False, description="use the byte-level tokenizer with a checkpoint "
                                 "that has no tokenizer files (on purpose)")
    lr: float = Field(3e-4, gt=0)
    weight_decay: float = Field(0.0, ge=0)
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


class WorkloadConfig(_Strict):
    arrival: Literal["poisson", "gamma", "trace"] = "poisson"
    rate: float = Field(16.0, gt=0, description="total task arrivals per second (Poisson/Gamma)")
    burstiness: float = Field(1.0, gt=0, description="Gamma CV^2 of inter-arrival times (1 = Poisson)")
    duration_s: float = Field(120.0, gt=0)
    trace: str | None = None
    trace_speedup: float = Field(1.0, gt=0)
    train_share: float | None = Field(None, ge=0, lt=1, description="fraction of tasks that are training (default 0.5)")
    train_rate: float | None = Field(None, ge=0, description="independent training tasks per second")
    train_batch_size: int = Field(4, ge=1, description="samples per training micro-batch")
    train_seq_tokens: int = Field(512, ge=2)
    max_prompt_tokens: int = Field(4096, ge=2)
    max_output_tokens: int = Field(512, ge=1)
    mode: Literal["prefill", "generate"] = "prefill"
    ignore_eos: bool = Field(False, description="real engine: generate every request's output_tokens "
                             "even past an EOS token")
    dataset: str | None = Field(None, description="real engine: JSONL of {text} or {prompt, completion}")
    drift_groups: int = Field(4, ge=1)
    priority_share: float = Field(0.0, ge=0, le=1)
    train_backlog: bool = Field(False, description="training data always waiting: a training task is drawn "
                                "whenever a policy would place one (simulator); arrivals are all inference "
                                "and train_share only sets separate's split (default half/half)")

    @model_validator(mode="after")
    def _check_sources(self) -> "WorkloadConfig":
        if self.arrival == "trace" and not self.trace:
            raise ValueError("workload.arrival is 'trace' but workload.trace (a CSV path) is not set")
        if self.trace and self.arrival != "trace":
            self.arrival = "trace"
        if self.train_rate is not None and self.train_share is not None:
            raise ValueError("set workload.train_share or workload.train_rate, not both")
        if self.train_backlog and self.train_rate is not None:
            raise ValueError("workload.train_backlog draws training on demand: drop workload.train_rate")
        return self

    @property
    def effective_train_share(self) -> float | None:
        """The training share in force: None when an independent train_rate is used."""
        if self.train_rate is not None:
            return None
        return 0.5 if self.train_share is None else self.train_share

    @property
    def arrival_train_share(self) -> float | None:
        """The share of arrivals that are training tasks (0 with a backlog: it is drawn instead)."""
        return 0.0 if self.train_backlog else self.effective_train_share


class PolicyConfig(_Strict):
    # defaults are SchedParams' (the scheduler's own), so the two cannot disagree
    names: list[str] = Field(default_factory=lambda: [_SP.policy])
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
    pipeline: Literal["apipe", "gpipe", "1f1b"] = _SP.pipeline
    microbatches: int = Field(_SP.microbatches, ge=1, description="M: micro-batches per S-PP round")
    sync_every: int = Field(_SP.sync_every, ge=1, description="K: training steps between weight syncs (separate)")
    average_every: int = Field(_SP.average_every, ge=0, description="co-located: average weights across training "
                               "nodes every K of a node's steps (0 = never)")
    no_profile: bool = _SP.no_profile
    no_prioritization: bool = _SP.no_prioritization
    no_memory_check: bool = _SP.no_memory_check
    no_chunking: bool = _SP.no_chunking
    no_late_binding: bool = _SP.no_late_binding
    eq4_inference_only: bool = _SP.eq4_inference_only
    no_lookahead_slack: bool = _SP.no_lookahead_slack
    train_queue_depth: int = Field(_SP.train_queue_depth, ge=1, description="lemix late binding: placed "
                                   "training tasks waiting per node to enter its pipeline")
    train_chunk_ms: float | None = Field(_SP.train_chunk_ms, gt=0, description="lemix: longest predicted "
                                         "training chunk (ms); default chunk_frac x the tightest SLO in force")
    chunk_frac: float = Field(_SP.chunk_frac, gt=0, description="lemix: a training chunk's predicted time "
                              "under this x the tightest SLO in force")
    # issue 10, second round (slo-rest): each mechanism switchable
    no_slo_batching: bool = _SP.no_slo_batching
    backlog_floor: bool = Field(_SP.backlog_floor, description="lemix: while both workloads are backlogged, "
                                "training's device-time floor is separation's training share of nodes")
    chunk_quiet_s: float | None = Field(_SP.chunk_quiet_s, gt=0, description="lemix: train unchunked once no "
                                        "request arrived this long (null: always chunk)")

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
    seed: int = 0
    out: str = Field("runs/latest", description="run directory")

    def sched_params(self, policy: str) -> SchedParams:
        p = self.policy
        return SchedParams(
            policy=policy, nodes=self.cluster.nodes, stages=self.cluster.stages,
            lambda1=p.lambda1, lambda2=p.lambda2, tau=p.tau, tau_r=p.tau_r, t_max_s=p.t_max_s,
            kappa=p.kappa, min_train_share=p.min_train_share, max_defer_s=p.max_defer_s,
            max_batch=p.max_batch, max_wait_s=p.max_wait_s, pipeline=p.pipeline,
            microbatches=p.microbatches, sync_every=p.sync_every, average_every=p.average_every,
            generate=self.workload.mode == "generate",
            train_share=self.workload.effective_train_share,
            no_profile=p.no_profile, no_prioritization=p.no_prioritization,
            no_memory_check=p.no_memory_check, no_chunking=p.no_chunking, train_chunk_ms=p.train_chunk_ms,
            chunk_frac=p.chunk_frac, no_late_binding=p.no_late_binding, eq4_inference_only=p.eq4_inference_only, no_lookahead_slack=p.no_lookahead_slack, train_queue_depth=p.train_queue_depth,
            no_slo_batching=p.no_slo_batching, backlog_floor=p.backlog_floor, chunk_quiet_s=p.chunk_quiet_s,
            slo_scale=self.slo.scale, slo_ttft_s=self.slo.ttft_s,
            slo_e2e_s=self.slo.e2e_s, seed=self.seed, **self._backlog(),
        )

    def _backlog(self) -> dict:
        w = self.workload
        if not w.train_backlog:
            return {}
        return dict(train_backlog=True, backlog_batch=w.train_batch_size, backlog_tokens=w.train_seq_tokens,
                    backlog_until_s=w.duration_s)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)


def _format_error(err: ValidationError) -> str:
    lines = []
    for e in err.errors():
        field = ".".join(str(p) for p in e["loc"]) or "config"
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] == "extra_forbidden":
            msg = "unknown field"
        got = e.get("input")
        shown = "" if isinstance(got, dict) or e["type"] == "extra_forbidden" else f" (got {got!r})"
        lines.append(f"{field}: {msg}{shown}")
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


def load_config(path: str | Path | None = None, overrides: dict[str, Any] | None = None,
                base: dict[str, Any] | None = None) -> LemixConfig:
    """Read YAML (optional), apply dotted overrides (`workload.rate` -> value), validate.

    `base` holds a command's own defaults (dotted keys); the YAML and the overrides win over it.
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
    for key, value in (base or {}).items():
        _set_dotted(tree, key, value, overwrite=False)
    for key, value in (overrides or {}).items():
        if value is not None:
            _set_dotted(tree, key, value)
    try:
        return LemixConfig.model_validate(tree)
    except ValidationError as e:
        raise ConfigError(_format_error(e)) from None


def with_overrides(cfg: LemixConfig, overrides: dict[str, Any]) -> LemixConfig:
    """A validated copy of `cfg` with dotted fields replaced (`{"workload.rate": 32}`).

    Unlike load_config's overrides, a None value here clears the field (e.g. `workload.trace`).
    """
    tree = cfg.model_dump(mode="json")
    for key, value in overrides.items():
        _set_dotted(tree, key, value)
    try:
        return LemixConfig.model_validate(tree)
    except ValidationError as e:
        raise ConfigError(_format_error(e)) from None
