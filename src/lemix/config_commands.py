"""The config sections of single commands: `serve`, `sweep`, `profiler`, `export`.

Part of the one schema (lemix.config.LemixConfig holds them), so every flag of every command has
its YAML field: `serve: {port: 9000}` in a `--config` file is `--port 9000`. The runtime objects
are built from these sections (serve.options.ServeOptions, sweep.SweepGrid); defaults come from
them where they have their own, as PolicyConfig's come from SchedParams.
"""
from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from lemix.serve.options import API_KEY_ENV, ServeOptions

_SO = ServeOptions()   # the server's own defaults


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


def comma_list(v: Any) -> Any:
    """'8,16' -> ['8', '16'] (flags give strings; YAML gives lists); the items are validated after."""
    if isinstance(v, str):
        v = [p.strip() for p in v.split(",")]
        if not any(v):
            raise ValueError("give a comma list of values")
        if not all(v):
            raise ValueError("empty value in the list")
    return v


class ServeConfig(Strict):
    host: str = Field(_SO.host, description="address to listen on")
    port: int = Field(_SO.port, ge=0, le=65535, description="TCP port to listen on, 0..65535 (0: any free port)")
    api_key: str | None = Field(_SO.api_key, description="require `Authorization: Bearer KEY` on /v1/* and "
                                "/metrics (visible in `ps`: prefer $" + API_KEY_ENV + " or api_key_file)")
    api_key_file: str | None = Field(None, description=f"read the API key from this file (first line); "
                                     f"it wins over ${API_KEY_ENV}, which wins over api_key")
    metrics_public: bool = Field(_SO.metrics_public, description="serve /metrics without the API key")
    state_dir: str = Field(_SO.state_dir, description="training journal (SQLite), checkpoints, requests.csv "
                           "and train_tasks.csv; relocatable (paths inside are relative to it)")
    resume: bool = Field(_SO.resume, description="restore the latest checkpoints in state_dir and train the "
                         "samples its journal holds that no checkpoint contains")
    checkpoint_every: int = Field(_SO.checkpoint_every, ge=0, description="optimizer steps of a node between "
                                  "checkpoints (0: only at shutdown)")
    max_queued: int = Field(_SO.max_queued, ge=1, description="inference requests in flight before answering 429")
    max_queued_samples: int = Field(_SO.max_queued_samples, ge=1, description="training samples not yet "
                                    "applied before answering 429")
    max_body_bytes: int = Field(_SO.max_body_bytes, ge=1024, description="largest request body; a larger one "
                                "gets 413 unread")
    max_sample_chars: int = Field(_SO.max_sample_chars, ge=1, description="largest training sample in "
                                  "characters (400 above it)")
    train_batch_wait_s: float = Field(_SO.train_batch_wait_s, ge=0, description="seconds a training sample "
                                      "waits for its micro-batch (workload.train_batch_size) to fill")
    served_model_name: str | None = Field(_SO.served_model_name, description="model id in the API "
                                          "(default: model.name)")
    default_max_tokens: int = Field(_SO.default_max_tokens, ge=1, description="max_tokens of a completion "
                                    "that gives none")
    drain_timeout_s: float = Field(_SO.drain_timeout_s, ge=0, description="seconds in-flight requests may "
                                   "take at shutdown; streams still open then end with an error event")
    profile_cache_dir: str | None = Field(_SO.profile_cache_dir, description="where measured profiles are "
                                          "cached (default: the user cache dir, ~/.cache/lemix/profiles)")
    log_level: Literal["debug", "info", "warning", "error", "critical"] = Field(
        _SO.log_level, description="server log level")

    @field_validator("log_level", mode="before")
    @classmethod
    def _lower(cls, v: Any) -> Any:
        return v.lower() if isinstance(v, str) else v


class SweepConfig(Strict):
    """`lemix sweep`: the grid (one list per axis; an empty axis keeps the base value) and the
    capacity search. Axis names are lemix.sweep.AXES'."""
    arrivals: list[Literal["poisson", "gamma", "trace"]] = Field([], description="arrival processes [workload.arrival]")
    modes: list[Literal["prefill", "generate"]] = Field([], description="prefill, generate [workload.mode]")
    nodes: list[int] = Field([], description="node counts [cluster.nodes]")
    stages: list[int] = Field([], description="pipeline stages per node [cluster.stages]")
    train_shares: list[float] = Field([], description="training shares of the tasks [workload.train_share]")
    train_rates: list[float] = Field([], description="training tasks per second, Poisson/Gamma points "
                                     "[workload.train_rate]")
    burstiness: list[float] = Field([], description="vLLM burstiness (Gamma shape: 1 = Poisson, lower = "
                                    "burstier), Poisson/Gamma points [workload.burstiness]")
    request_rates: list[float] = Field([], description="inference requests per second, Poisson/Gamma "
                                       "points [workload.request_rate]")
    rates: list[float] = Field([], description="deprecated: total task rates (requests + training) per "
                               "second; use request_rates [workload.rate]")
    trace_speedups: list[float] = Field([], description="trace speedups, trace points [workload.trace_speedup]")
    seeds: list[int] = Field([], description="seeds, each a separate point [seed]")
    target: float | None = Field(None, gt=0, le=1, description="SLO attainment target in (0, 1]: find each "
                                 "policy's capacity by bisection (the frontier plot uses it too, 0.9 if unset)")
    capacity_range: list[float] | None = Field(None, min_length=2, max_length=2, description="LO,HI: "
                                               "bisection range of the load axis (request rate, or trace "
                                               "speedup for traces); default [min/4, 2 x max] of the grid")
    capacity_tol: float | None = Field(None, gt=0, description="stop bisecting when the range is this "
                                       "narrow (default: 1% of HI)")
    jobs: int | None = Field(None, ge=1, description="worker processes (results are identical for any); "
                             "default: one per CPU, at most one per run")

    _split = field_validator("arrivals", "modes", "nodes", "stages", "train_shares", "train_rates",
                             "burstiness", "request_rates", "rates", "trace_speedups", "seeds",
                             "capacity_range", mode="before")(comma_list)

    def grid_axes(self) -> dict[str, tuple]:
        """{axis name: values} of the given axes, in lemix.sweep.AXES' names."""
        names = ("arrivals", "modes", "nodes", "stages", "train_shares", "train_rates", "burstiness",
                 "request_rates", "rates", "trace_speedups", "seeds")
        return {n: tuple(getattr(self, n)) for n in names if getattr(self, n)}


class ProfilerConfig(Strict):
    quick: bool = Field(False, description="a small grid (under a minute on 2 cores)")


class ExportConfig(Strict):
    node: int | None = Field(None, ge=0, description="which node's checkpoint (default: the newest)")
    adapter: bool = Field(False, description="LoRA runs: write the PEFT adapter and a reference to the "
                          "base instead of merged weights")
