"""What `lemix serve` takes beyond the run config: the HTTP side, the state directory, limits."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

# Config defaults of `lemix serve` where they differ from the schema's (simulator) defaults: one
# real replica answering requests token by token, short enough sequences for a CPU.
SERVE_DEFAULTS: dict[str, Any] = {
    "cluster.nodes": 1,
    "cluster.stages": 1,
    "workload.mode": "generate",
    "workload.train_batch_size": 4,
    "workload.train_seq_tokens": 256,
    "workload.max_prompt_tokens": 1024,
    "workload.max_output_tokens": 256,
    "policy.names": ["lemix"],
    "policy.microbatches": 2,
}


@dataclass(frozen=True)
class ServeOptions:
    host: str = "127.0.0.1"
    port: int = 8000
    api_key: str | None = None           # required as `Authorization: Bearer KEY` on /v1/*
    state_dir: str = "lemix-state"       # journal.sqlite, checkpoints/, profile.json
    checkpoint_every: int = 50           # optimizer steps of a node between checkpoints (0: only at exit)
    resume: bool = False                 # restore the latest checkpoints, train unapplied samples
    max_queued: int = 256                # inference requests in flight before answering 429
    max_queued_samples: int = 100_000    # training samples not yet applied before answering 429
    train_batch_wait_s: float = 1.0      # how long a sample waits for its micro-batch to fill
    served_model_name: str | None = None # default: the model name of the config
    default_max_tokens: int = 16         # /v1/completions without max_tokens (OpenAI's default)
    drain_timeout_s: float = 30.0        # at shutdown: how long in-flight work may take to finish
    log_level: str = "info"

    def __post_init__(self) -> None:
        for name in ("checkpoint_every", "max_queued", "max_queued_samples", "default_max_tokens"):
            if getattr(self, name) < (0 if name == "checkpoint_every" else 1):
                raise ValueError(f"serve option {name} must be >= "
                                 f"{0 if name == 'checkpoint_every' else 1}, got {getattr(self, name)}")
        if self.train_batch_wait_s < 0 or self.drain_timeout_s < 0:
            raise ValueError("train_batch_wait_s and drain_timeout_s must be >= 0")


# `lemix serve`'s own flags: (flag, ServeOptions field, type, help); defaults come from ServeOptions.
SERVE_FLAGS = [
    ("--host", "host", str, "address to listen on"),
    ("--port", "port", int, "port to listen on"),
    ("--api-key", "api_key", str, "require `Authorization: Bearer KEY` on /v1/*"),
    ("--state-dir", "state_dir", str, "training journal (SQLite), checkpoints and the measured profile"),
    ("--checkpoint-every", "checkpoint_every", int, "optimizer steps of a node between checkpoints "
                                                    "(0: only at shutdown)"),
    ("--max-queued", "max_queued", int, "inference requests in flight before answering 429"),
    ("--max-queued-samples", "max_queued_samples", int, "training samples not yet applied before 429"),
    ("--train-batch-wait", "train_batch_wait_s", float, "seconds a training sample waits for its "
                                                         "micro-batch (workload.train_batch_size) to fill"),
    ("--served-model-name", "served_model_name", str, "model id in the API (default: --model)"),
    ("--default-max-tokens", "default_max_tokens", int, "max_tokens of a completion that gives none"),
    ("--drain-timeout", "drain_timeout_s", float, "seconds in-flight work may take at shutdown"),
    ("--log-level", "log_level", str, "debug | info | warning | error"),
]
# run-config workload flags that mean something to a server
SERVE_WORKLOAD_FLAGS = ("--train-batch-size", "--train-seq-tokens", "--max-prompt-tokens",
                        "--max-output-tokens")


def add_serve_flags(parser) -> None:
    defaults = ServeOptions()
    for flag, field, typ, desc in SERVE_FLAGS:
        default = getattr(defaults, field)
        parser.add_argument(flag, dest=f"serve_{field}", type=typ, default=default,
                            metavar=typ.__name__.upper(), help=f"{desc} (default: {default})")
    parser.add_argument("--resume", dest="serve_resume", action="store_true",
                        help="restore the latest checkpoints in --state-dir and train the samples "
                             "its journal holds that no checkpoint contains")


def options_from_args(args) -> ServeOptions:
    return ServeOptions(**{k.removeprefix("serve_"): v for k, v in vars(args).items()
                           if k.startswith("serve_")})
