"""What `lemix serve` takes beyond the run config: the HTTP side, the state directory, limits."""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
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

LOG_LEVELS = ("debug", "info", "warning", "error", "critical")


class ServeOptionError(ValueError):
    """A serve option out of range (the message names the flag)."""


@dataclass(frozen=True)
class ServeOptions:
    host: str = "127.0.0.1"
    port: int = 8000                     # 0: any free port (the log says which)
    api_key: str | None = None           # required as `Authorization: Bearer KEY` on /v1/* and /metrics
    metrics_public: bool = False         # /metrics without the key
    state_dir: str = "lemix-state"       # journal.sqlite, checkpoints/, requests.csv, train_tasks.csv
    checkpoint_every: int = 50           # optimizer steps of a node between checkpoints (0: only at exit)
    resume: bool = False                 # restore the latest checkpoints, train unapplied samples
    max_queued: int = 256                # inference requests in flight before answering 429
    max_queued_samples: int = 100_000    # training samples not yet applied before answering 429
    max_body_bytes: int = 4 * 2**20      # request bodies larger than this get a 413, unread
    max_sample_chars: int = 65_536       # characters of one training sample (text, or prompt + completion)
    train_batch_wait_s: float = 1.0      # how long a sample waits for its micro-batch to fill
    served_model_name: str | None = None # default: the model name of the config
    default_max_tokens: int = 16         # /v1/completions without max_tokens (OpenAI's default)
    drain_timeout_s: float = 30.0        # at shutdown: how long in-flight requests may take to finish
    profile_cache_dir: str | None = None # measured profiles, keyed by model/device/stages (None: no cache)
    log_level: str = "info"

    def __post_init__(self) -> None:
        minimum = {"checkpoint_every": 0, "max_queued": 1, "max_queued_samples": 1,
                   "default_max_tokens": 1, "max_body_bytes": 1024, "max_sample_chars": 1}
        for name, low in minimum.items():
            if getattr(self, name) < low:
                raise ServeOptionError(f"{_flag(name)} must be >= {low}, got {getattr(self, name)}")
        if not 0 <= self.port <= 65535:
            raise ServeOptionError(f"--port must be a TCP port in 0..65535, got {self.port}")
        for name in ("train_batch_wait_s", "drain_timeout_s"):
            if not getattr(self, name) >= 0:
                raise ServeOptionError(f"{_flag(name)} must be >= 0, got {getattr(self, name)}")
        if self.log_level.lower() not in LOG_LEVELS:
            raise ServeOptionError(f"--log-level must be one of {' | '.join(LOG_LEVELS)}, "
                                   f"got {self.log_level!r}")
        if self.api_key is not None and not self.api_key.strip():
            raise ServeOptionError("the API key is empty")


def _flag(field: str) -> str:
    return next((flag for flag, name in SERVE_FLAGS if name == field), field)


# `lemix serve`'s own flags: (flag, field of ServeOptions and of the config's `serve` section,
# lemix.config_commands.ServeConfig, which holds their help text and validates them first).
SERVE_FLAGS = [
    ("--host", "host"), ("--port", "port"), ("--api-key", "api_key"), ("--api-key-file", "api_key_file"),
    ("--metrics-public", "metrics_public"), ("--state-dir", "state_dir"), ("--resume", "resume"),
    ("--checkpoint-every", "checkpoint_every"), ("--max-queued", "max_queued"),
    ("--max-queued-samples", "max_queued_samples"), ("--max-body-bytes", "max_body_bytes"),
    ("--max-sample-chars", "max_sample_chars"), ("--train-batch-wait", "train_batch_wait_s"),
    ("--served-model-name", "served_model_name"), ("--default-max-tokens", "default_max_tokens"),
    ("--drain-timeout", "drain_timeout_s"), ("--profile-cache", "profile_cache_dir"),
    ("--log-level", "log_level"),
]
# run-config workload flags that mean something to a server
SERVE_WORKLOAD_FLAGS = ("--train-batch-size", "--train-seq-tokens", "--max-prompt-tokens",
                        "--max-output-tokens")
API_KEY_ENV = "LEMIX_API_KEY"


def default_profile_cache() -> str:
    """The user cache dir: $XDG_CACHE_HOME/lemix/profiles, else ~/.cache/lemix/profiles."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return str(Path(base) / "lemix" / "profiles")


def api_key_from(args_key: str | None, key_file: str | None, environ=os.environ) -> str | None:
    """--api-key-file, else $LEMIX_API_KEY, else --api-key (the only place the key's sources meet)."""
    if key_file:
        try:
            lines = Path(key_file).read_text().splitlines()
        except OSError as exc:
            raise ServeOptionError(f"--api-key-file {key_file}: {exc.strerror or exc}") from None
        key = lines[0].strip() if lines else ""
        if not key:
            raise ServeOptionError(f"--api-key-file {key_file} is empty")
        return key
    return environ.get(API_KEY_ENV) or args_key


def options_from_config(serve, environ=os.environ) -> ServeOptions:
    """ServeOptions from the config's validated `serve` section (lemix.config_commands.ServeConfig)."""
    fields = serve.model_dump()
    key_file = fields.pop("api_key_file")
    fields["api_key"] = api_key_from(fields.get("api_key"), key_file, environ)
    if fields.get("profile_cache_dir") is None:
        fields["profile_cache_dir"] = default_profile_cache()
    return ServeOptions(**fields)
