"""The workload section of the schema: arrivals of requests and training tasks, lengths, data.

Request arrivals follow `vllm bench serve`: `request_rate` requests/s, `burstiness` the Gamma shape
(1 = Poisson, lower = burstier, CV^2 = 1/burstiness; != 1 implies Gamma arrivals). Training
arrives on top: `train_rate` tasks/s, or `train_share` of all tasks. The deprecated `rate` (total
tasks/s, split by train_share) and `burstiness_cv2` (the CV^2) keep what they meant; how each
spelling becomes arrival times is lemix.experiment.build_tasks.
"""
from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from lemix.config_commands import Strict

DEFAULT_REQUEST_RATE = 8.0   # requests/s of the default workload (plus as many training tasks)


class WorkloadConfig(Strict):
    arrival: Literal["poisson", "gamma", "trace"] = Field("poisson", description="arrival process of "
                                                          "requests; burstiness != 1 makes poisson gamma")
    request_rate: float | None = Field(None, gt=0, description="inference requests per second (Poisson/Gamma; "
                                       "vllm bench serve's --request-rate): training arrives on "
                                       "top of it")
    rate: float | None = Field(None, gt=0, description="deprecated: total task arrivals per second (requests "
                               "+ training, split by train_share); use request_rate")
    burstiness: float = Field(1.0, gt=0, description="vllm bench serve's burstiness: the Gamma shape of "
                              "request inter-arrival times (1 = Poisson, lower = burstier; CV^2 = 1/burstiness)")
    burstiness_cv2: float | None = Field(None, gt=0, description="deprecated: the CV^2 of inter-arrival "
                                         "times (the old burstiness; > 1 burstier); use burstiness = 1/CV^2")
    duration_s: float = Field(120.0, gt=0, description="seconds of arrivals")
    trace: str | None = Field(None, description="Azure-format CSV (TIMESTAMP,ContextTokens,GeneratedTokens) "
                              "to replay; sets arrival to trace")
    trace_speedup: float = Field(1.0, gt=0, description="divide the trace's times by this")
    train_share: float | None = Field(None, ge=0, lt=1, description="fraction of all tasks that are training: "
                                      "training arrives at request_rate x share / (1 - share); unset: 0.5, "
                                      "unless train_rate is given")
    train_rate: float | None = Field(None, ge=0, description="training tasks per second, a Poisson process "
                                     "of its own (instead of train_share)")
    train_batch_size: int = Field(4, ge=1, description="samples per training micro-batch")
    train_seq_tokens: int = Field(512, ge=2, description="tokens per training sample")
    max_prompt_tokens: int = Field(4096, ge=2, description="longest request prompt drawn")
    max_output_tokens: int = Field(512, ge=1, description="longest request output drawn")
    mode: Literal["prefill", "generate"] = Field("prefill", description="prefill: one forward per request; "
                                                 "generate: prefill + decode")
    ignore_eos: bool = Field(False, description="real engine: generate every request's output_tokens "
                             "even past an EOS token")
    dataset: str | None = Field(None, description="real engine: JSONL of {text} or {prompt, completion}")
    drift_groups: int = Field(4, ge=1, description="real engine: topic groups the built-in corpus drifts through")
    priority_share: float = Field(0.0, ge=0, le=1, description="fraction of requests with priority 1")
    train_backlog: bool = Field(False, description="training data always waiting: a training task is drawn "
                                "whenever a policy would place one (simulator); arrivals are all inference "
                                "and train_share only sets separate's split (default half/half)")

    @model_validator(mode="after")
    def _check_sources(self) -> "WorkloadConfig":
        if self.arrival == "trace" and not self.trace:
            raise ValueError("workload.arrival is 'trace' but workload.trace (a CSV path) is not set")
        if self.trace and self.arrival != "trace":
            self.arrival = "trace"
        if self.rate is not None and self.request_rate is not None:
            raise ValueError("set workload.request_rate or the deprecated workload.rate, not both")
        if self.rate is None and self.request_rate is None and self.arrival != "trace":
            self.request_rate = DEFAULT_REQUEST_RATE
        if self.burstiness_cv2 is not None and self.burstiness != 1.0:
            raise ValueError("set workload.burstiness or the deprecated workload.burstiness_cv2, not both")
        if self.cv2 != 1.0:
            if self.arrival == "trace":
                raise ValueError("burstiness shapes Poisson/Gamma arrivals; a trace replays its own times")
            if self.arrival == "poisson":   # vLLM's rule: burstiness != 1 means Gamma arrivals
                self.arrival = "gamma"
        if self.train_rate is not None and self.train_share is not None:
            raise ValueError("set workload.train_share or workload.train_rate, not both")
        if self.train_backlog and self.train_rate is not None:
            raise ValueError("workload.train_backlog draws training on demand: drop workload.train_rate")
        return self

    @property
    def cv2(self) -> float:
        """CV^2 of the inter-arrival times: the deprecated burstiness_cv2, else 1 / burstiness."""
        return self.burstiness_cv2 if self.burstiness_cv2 is not None else 1.0 / self.burstiness

    @property
    def requests_per_s(self) -> float | None:
        """The inference request rate in force (None for a trace: it has its own)."""
        if self.arrival == "trace":
            return None
        if self.rate is None:
            return self.request_rate
        share = self.arrival_train_share
        return self.rate * (1.0 - share) if share is not None else self.rate

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
