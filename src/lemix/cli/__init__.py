"""The `lemix` command: a thin shell over the library (lemix.experiment, lemix.api, ...).

Every flag sets one field of the config schema (`--request-rate` -> workload.request_rate, `--port`
-> serve.port; lemix.cli.flags); flags override `--config FILE`. The config is validated before
anything runs: a bad value is one line naming the flag, the field and what is allowed.
"""
from __future__ import annotations

import argparse
import sys
import warnings
from typing import Any, Callable

from lemix import __version__
from lemix.cli import commands
from lemix.cli.flags import COMMAND_FLAGS, OneLineParser, add_flags, labels, overrides
from lemix.cli.sweep import cmd_sweep
from lemix.config import RUN_DEFAULTS, LemixConfig, LemixDeprecationWarning, load_config
from lemix.serve.options import SERVE_DEFAULTS

__all__ = ["build_parser", "config_of", "main", "COMMANDS"]


class Command:
    def __init__(self, name: str, run: Callable[[LemixConfig], int], base: dict[str, Any], help: str,
                 description: str) -> None:
        self.name, self.run, self.base, self.help, self.description = name, run, base, help, description


def _defaults_text(defaults: dict) -> str:
    """A command's own defaults for its --help: `nodes=2, policy=lemix,separate, ...`."""
    return ", ".join(f"{k.split('.')[-1]}={','.join(v) if isinstance(v, list) else v}"
                     for k, v in defaults.items())


COMMANDS = [
    Command("simulate", commands.cmd_simulate, {}, "simulate policies on a modeled multi-GPU cluster",
            "Discrete-event simulation of every chosen policy on the same workload; writes summary.json, "
            "requests.csv, train_steps.csv, timeline.json (Perfetto) and plots to the run directory."),
    Command("sweep", cmd_sweep, {}, "simulate policies over a grid of loads and configurations",
            "Simulates every chosen policy at every point of a grid (the product of the grid flags; the "
            "other flags fix the rest, as in `simulate`), every policy on the same tasks per point; writes "
            "sweep.csv (one row per point x policy), config.yaml, grid.yaml and plots (SLO attainment and "
            "training throughput vs load, the SLO/training frontier). With --target it also finds, per "
            "policy, the highest request rate keeping SLO attainment >= target, by bisection (capacity.csv)."),
    Command("run", commands.cmd_run, RUN_DEFAULTS, "run policies on real model stages (serving + training)",
            "Run every chosen policy on real model stages (the built-in tiny model or a local Hugging Face "
            "checkpoint) on the same workload from the same initial weights; same outputs as `simulate` "
            "plus inference loss. --clock virtual times every op on the modeled cluster (the tasks, profile "
            "and op durations of `lemix simulate` with the same flags) while computing it for real: "
            f"reproducible learning outcomes. Defaults differ from simulate: {_defaults_text(RUN_DEFAULTS)}."),
    Command("profile", commands.cmd_profile, RUN_DEFAULTS, "measure per-stage op latencies and memory of a model",
            "Runs the real stages over a grid of batch sizes and lengths (and KV lengths for decode), fits "
            "t = a + b*C*l + c*C*l^2 (forward, backward), a + b*C + c*K (decode) and the optimizer step per "
            "stage, measures memory per token and host copy bandwidth, and writes a versioned JSON profile "
            "(--out, default profile.json) plus a plot of measured points against the fits."),
    Command("validate", commands.cmd_validate, {**RUN_DEFAULTS, "policy.names": ["lemix"]},
            "compare a profile's predictions with the real engine",
            "Runs the same workload (same seed, same arrivals) on the real engine and in the simulator with "
            "--profile, and reports the error of per-op durations and of per-request E2E/TTFT (MAPE, p50/p90 "
            "absolute error). With --out DIR writes validation.json and validation.png."),
    Command("serve", commands.cmd_serve, SERVE_DEFAULTS, "OpenAI-compatible server that keeps training on /v1/train",
            "Serves /v1/completions and /v1/chat/completions (OpenAI API, SSE streaming), takes training "
            "samples on /v1/train (journaled in SQLite before the reply, applied exactly once), exposes "
            "/metrics (Prometheus) and /health; checkpoints weights and optimizer state. Defaults differ "
            f"from simulate: {_defaults_text(SERVE_DEFAULTS)}."),
    Command("export", commands.cmd_export, {}, "write a served model's latest checkpoint as a Hugging Face dir",
            "Reads the newest checkpoint under --state-dir (written by `lemix serve`) and writes a Hugging "
            "Face directory (config.json, model.safetensors, tokenizer) that transformers loads: the full "
            "weights (LoRA merged in), or with --adapter a PEFT adapter directory plus the base reference."),
]
_BY_NAME = {c.name: c for c in COMMANDS}


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(
        prog="lemix",
        description="LeMix: serve an LLM and keep fine-tuning it on the same GPUs, scheduled jointly. "
                    "`simulate` plans on a modeled cluster; `run` executes real model stages.")
    parser.add_argument("--version", action="version", version=f"lemix {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=OneLineParser)
    for c in COMMANDS:
        p = sub.add_parser(c.name, help=c.help, description=c.description)
        add_flags(p, COMMAND_FLAGS[c.name], load_config(base=c.base))
    return parser


def config_of(args: argparse.Namespace) -> LemixConfig:
    """The command's config: its defaults, then --config FILE, then the flags; validated."""
    c = _BY_NAME[args.command]
    return load_config(args.config, overrides(args), c.base, labels=labels(COMMAND_FLAGS[c.name]))


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    print(f"lemix: warning: {message}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    with warnings.catch_warnings():
        warnings.simplefilter("always", LemixDeprecationWarning)
        warnings.showwarning = _show_warning
        try:
            return _BY_NAME[args.command].run(config_of(args))
        except ValueError as e:
            # our own error types (ConfigError, TraceError, DatasetError, CheckpointError, ProfileError,
            # ServeOptionError) carry a message for the user; anything else is a bug and keeps its traceback
            if not type(e).__module__.startswith("lemix."):
                raise
            print(f"lemix: {e}", file=sys.stderr)
            return 2
        except KeyboardInterrupt:
            print("lemix: interrupted", file=sys.stderr)
            return 130
