"""The `lemix` flags, generated from the one config schema (lemix.config.LemixConfig).

A flag is a name and the dotted config field it sets; its help text, default, choices and
validation all come from the schema, so a flag and its YAML field (`--port` -> `serve.port`)
cannot disagree, and a bad value is the same one-line error from a flag as from `--config`.
Flags hand pydantic the text as typed (`--port abc` -> `serve.port: Input should be a valid
integer`); boolean fields are switches that set the value in `const`.
"""
from __future__ import annotations

import argparse
import sys
import types
import typing
from dataclasses import dataclass
from typing import Any, Literal

from pydantic.fields import FieldInfo

from lemix.config import LemixConfig
from lemix.serve.options import SERVE_FLAGS, SERVE_WORKLOAD_FLAGS


@dataclass(frozen=True)
class Flag:
    flag: str
    field: str            # dotted config field
    note: str = ""        # said after the schema's description
    const: Any = True     # switches (bool fields): the value the flag sets


F = Flag
CLUSTER = [F("--nodes", "cluster.nodes"), F("--stages", "cluster.stages"),
           F("--device-memory", "cluster.device_memory_gb")]
WORKLOAD = [
    F("--request-rate", "workload.request_rate"), F("--train-rate", "workload.train_rate"),
    F("--train-share", "workload.train_share"), F("--burstiness", "workload.burstiness"),
    F("--arrival", "workload.arrival"), F("--duration", "workload.duration_s"),
    F("--trace", "workload.trace"), F("--trace-speedup", "workload.trace_speedup"),
    F("--rate", "workload.rate", "prints a warning"),
    F("--burstiness-cv2", "workload.burstiness_cv2", "prints a warning"),
    F("--train-batch-size", "workload.train_batch_size"), F("--train-seq-tokens", "workload.train_seq_tokens"),
    F("--max-prompt-tokens", "workload.max_prompt_tokens"), F("--max-output-tokens", "workload.max_output_tokens"),
    F("--mode", "workload.mode"), F("--priority-share", "workload.priority_share"),
    F("--train-backlog", "workload.train_backlog"),
]
POLICY = [
    F("--policy", "policy.names"), F("--lambda1", "policy.lambda1"), F("--lambda2", "policy.lambda2"),
    F("--tau", "policy.tau"), F("--tau-r", "policy.tau_r"), F("--t-max", "policy.t_max_s"),
    F("--kappa", "policy.kappa"), F("--min-train-share", "policy.min_train_share"),
    F("--max-defer", "policy.max_defer_s"), F("--max-batch", "policy.max_batch"),
    F("--max-wait", "policy.max_wait_s"), F("--pipeline", "policy.pipeline"),
    F("--microbatches", "policy.microbatches"), F("--sync-every", "policy.sync_every"),
    F("--average-every", "policy.average_every"),
    F("--no-merge-stagger", "policy.merge_stagger", const=False), F("--train-chunk-ms", "policy.train_chunk_ms"),
    F("--train-queue-depth", "policy.train_queue_depth"), F("--chunk-frac", "policy.chunk_frac"),
    F("--no-profile", "policy.no_profile"), F("--calibration-period", "policy.calibration_period_s"),
    F("--calibration-tolerance", "policy.calibration_tolerance"),
    F("--no-prioritization", "policy.no_prioritization"),
    F("--no-memory-check", "policy.no_memory_check"), F("--no-chunking", "policy.no_chunking"),
    F("--no-lookahead-slack", "policy.no_lookahead_slack"),
    F("--eq4-inference-only", "policy.eq4_inference_only"), F("--no-late-binding", "policy.no_late_binding"),
    F("--no-slo-batching", "policy.no_slo_batching"), F("--backlog-floor", "policy.backlog_floor"),
    F("--chunk-quiet-s", "policy.chunk_quiet_s"), F("--no-solo-training", "policy.no_solo_training"),
    F("--no-host-gate", "policy.no_host_gate"), F("--host-slowdown", "policy.host_slowdown"),
    F("--no-adaptive-chunks", "policy.adaptive_chunks", const=False), F("--step-first", "policy.step_first"),
    F("--no-lookahead-queued", "policy.no_lookahead_queued"),
]
SLO = [F("--slo-scale", "slo.scale"), F("--slo-ttft", "slo.ttft_s"), F("--slo-e2e", "slo.e2e_s")]
PROFILE = [F("--profile", "model.profile"), F("--force-profile", "model.force_profile"), F("--seed", "seed")]
SIM = [F("--sim-model", "model.sim_model"), F("--sim-preset", "model.sim_preset"),
       F("--host-bandwidth", "cluster.host_bandwidth_gbps"),
       F("--network-bandwidth", "cluster.network_bandwidth_gbps")]
ENGINE = [
    F("--model", "model.name"), F("--device", "cluster.device"), F("--backend", "cluster.backend"),
    F("--ray-address", "cluster.ray_address"), F("--tokenizer", "model.tokenizer"),
    F("--byte-tokenizer", "model.byte_tokenizer"), F("--lr", "model.lr"),
    F("--weight-decay", "model.weight_decay"), F("--dtype", "model.dtype"),
    F("--lora-rank", "model.lora_rank"), F("--lora-alpha", "model.lora_alpha"),
    F("--lora-targets", "model.lora_targets"), F("--recompute", "model.recompute"),
]
DATA = [F("--dataset", "workload.dataset"), F("--drift-groups", "workload.drift_groups")]
RUN = [F("--clock", "cluster.clock"), F("--ignore-eos", "workload.ignore_eos")]
SWEEP = [
    F("--arrivals", "sweep.arrivals"), F("--modes", "sweep.modes"), F("--nodes-grid", "sweep.nodes"),
    F("--stages-grid", "sweep.stages"), F("--train-shares", "sweep.train_shares"),
    F("--train-rates", "sweep.train_rates"), F("--burstiness-grid", "sweep.burstiness"),
    F("--request-rates", "sweep.request_rates"), F("--rates", "sweep.rates", "prints a warning"),
    F("--trace-speedups", "sweep.trace_speedups"), F("--seeds", "sweep.seeds"),
    F("--target", "sweep.target"), F("--capacity-range", "sweep.capacity_range"),
    F("--capacity-tol", "sweep.capacity_tol"), F("--jobs", "sweep.jobs"),
]
SERVE = [F(flag, f"serve.{name}") for flag, name in SERVE_FLAGS]
OUTPUT = [F("--out", "out"), F("--no-progress", "progress", const=False)]

SIMULATE_FLAGS = CLUSTER + WORKLOAD + POLICY + SLO + PROFILE + SIM + OUTPUT
COMMAND_FLAGS: dict[str, list[Flag]] = {
    "simulate": SIMULATE_FLAGS,
    "sweep": SIMULATE_FLAGS + SWEEP,
    "run": CLUSTER + WORKLOAD + DATA + POLICY + SLO + PROFILE + ENGINE + RUN + SIM + OUTPUT,
    "validate": CLUSTER + WORKLOAD + DATA + POLICY + SLO + PROFILE + ENGINE + OUTPUT,
    "profile": [f for f in CLUSTER + ENGINE if f.flag not in ("--nodes", "--backend", "--ray-address")]
    + [F("--seed", "seed"), F("--quick", "profiler.quick"), *OUTPUT],
    "serve": CLUSTER + [f for f in WORKLOAD if f.flag in SERVE_WORKLOAD_FLAGS] + POLICY + SLO + PROFILE
    + ENGINE + SERVE + [F("--no-progress", "progress", const=False)],
    "export": [F("--state-dir", "serve.state_dir", "the state directory of `lemix serve`"),
               F("--node", "export.node"), F("--adapter", "export.adapter"), F("--out", "out")],
}


# ---- the schema ---------------------------------------------------------------------------

def field_info(dotted: str) -> FieldInfo:
    model: Any = LemixConfig
    info = None
    for part in dotted.split("."):
        info = model.model_fields[part]
        model = info.annotation
    assert info is not None
    return info


def _bare(annotation: Any) -> Any:
    """int | None -> int; list[X] stays a list."""
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union:
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        return args[0] if len(args) == 1 else annotation
    return annotation


def _metavar(annotation: Any) -> str:
    a = _bare(annotation)
    if typing.get_origin(a) is Literal:
        return "{" + ",".join(map(str, typing.get_args(a))) + "}"
    if typing.get_origin(a) is list:
        return "LIST"
    return {int: "INT", float: "FLOAT"}.get(a, "TEXT")


def is_switch(dotted: str) -> bool:
    return _bare(field_info(dotted).annotation) is bool


def get_dotted(cfg: Any, dotted: str) -> Any:
    for part in dotted.split("."):
        cfg = getattr(cfg, part)
    return cfg


def show(value: Any) -> str:
    if value is None:
        return "unset"
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, (list, tuple)):
        return ",".join(show(v) for v in value) if value else "none"
    return f"{value:g}" if isinstance(value, float) else str(value)


# ---- the parser -------------------------------------------------------------------------------

class OneLineParser(argparse.ArgumentParser):
    """argparse's usage errors as one line (a command with 60 flags has a page of usage)."""

    def error(self, message: str) -> typing.NoReturn:
        print(f"lemix: {message} (see `{self.prog} --help`)", file=sys.stderr)
        sys.exit(2)


def add_flags(p: argparse.ArgumentParser, flags: list[Flag], defaults: LemixConfig) -> None:
    """One option per flag, its help from the schema, its default from `defaults` (the config a
    command runs with when no flag and no file is given)."""
    for f in flags:
        info = field_info(f.field)
        # argparse %-formats help strings: a literal % in a description must be doubled
        desc = "; ".join(x for x in (info.description, f.note) if x).replace("%", "%%")
        default = str(show(get_dotted(defaults, f.field))).replace("%", "%%")
        if is_switch(f.field):
            # a --no-X flag turns a feature off: its help says so and shows the feature's default
            text = desc if f.const is True else f"turn off: {desc}"
            p.add_argument(f.flag, dest=f.field, action="store_const", const=f.const, default=None,
                           help=f"{text} [{f.field}] (default: {default})")
        else:
            p.add_argument(f.flag, dest=f.field, default=None, metavar=_metavar(info.annotation),
                           help=f"{desc} [{f.field}] (default: {default})")
    p.add_argument("--config", dest="config", metavar="FILE",
                   help="YAML file with any of the sections cluster, model, workload, policy, slo, "
                        "serve, sweep, profiler, export (the field in brackets after each flag); "
                        "flags override it")


def overrides(args: argparse.Namespace) -> dict[str, Any]:
    """{dotted field: value} of the flags given."""
    return {k: v for k, v in vars(args).items() if k not in ("config", "command", "func") and v is not None}


def labels(flags: list[Flag]) -> dict[str, str]:
    """dotted field -> flag, for error messages."""
    return {f.field: f.flag for f in flags}
