"""Profiles as versioned JSON files, and the checks a run makes before using one.

File layout (version 1):

    {"format": "lemix-profile", "version": 1, "model", "device", "dtype",
     "stages": [{"fwd": {"a","b","c"}, "bwd": ..., "decode": ..., "optim": ...,
                 "weight_bytes", "train_state_bytes", "act_bytes_per_token",
                 "tmp_bytes_per_token", "kv_bytes_per_token", "sync_bytes" (null = weight_bytes)},
                ...],
     "train_mode": "full float32" | "lora r=8 alpha=16 bfloat16 +recompute" | ... (absent: "full"),
     "capacity_bytes", "host_bandwidth_Bps", "network_bandwidth_Bps",
     "fit_error": {"stage0.fwd": mape, ...}, "samples": {...} | null, "created_by": "lemix X"}

Floats are written with Python's repr, so a save/load round trip gives an equal Profile.
"""
from __future__ import annotations

import json
import warnings
from dataclasses import asdict, replace
from pathlib import Path

from lemix import __version__
from lemix.profiling.fit import ProfileError
from lemix.sched.latency import OpCoeffs, Profile, StageProfile

FORMAT = "lemix-profile"
VERSION = 1

_OPS = ("fwd", "bwd", "decode", "optim")
_MEMORY = ("weight_bytes", "train_state_bytes", "act_bytes_per_token", "tmp_bytes_per_token",
           "kv_bytes_per_token")


def profile_to_dict(profile: Profile, samples: dict | None = None) -> dict:
    return {
        "format": FORMAT, "version": VERSION,
        "model": profile.model, "device": profile.device, "dtype": profile.dtype,
        "train_mode": profile.train_mode,
        "stages": [asdict(st) for st in profile.stages],
        "capacity_bytes": profile.capacity_bytes,
        "host_bandwidth_Bps": profile.host_bandwidth_Bps,
        "network_bandwidth_Bps": profile.network_bandwidth_Bps,
        "fit_error": dict(profile.fit_error),
        "samples": samples,
        "created_by": f"lemix {__version__}",
    }


def save_profile(profile: Profile, path, samples: dict | None = None) -> None:
    """Write `profile` (and the raw samples it was fitted on, if given) as JSON to `path`."""
    path = Path(path)
    path.write_text(json.dumps(profile_to_dict(profile, samples), indent=1) + "\n")


def _read(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise ProfileError(f"profile {path}: no such file") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ProfileError(f"profile {path}: cannot read it as JSON ({exc})") from exc
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise ProfileError(f"{path} is not a lemix profile (format field is not {FORMAT!r})")
    version = data.get("version")
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise ProfileError(f"profile {path}: unknown format version {version!r}")
    if version > VERSION:
        raise ProfileError(f"profile {path} has format version {version}, newer than this lemix "
                           f"({__version__}) reads (up to {VERSION}); upgrade lemix or re-profile")
    return data


def profile_from_dict(data: dict, where: str = "profile") -> Profile:
    try:
        stages = tuple(
            StageProfile(**{op: OpCoeffs(**{k: float(v) for k, v in st[op].items()}) for op in _OPS},
                         **{m: int(st[m]) for m in _MEMORY}, layers=int(st.get("layers", 0)),
                         sync_bytes=None if st.get("sync_bytes") is None else int(st["sync_bytes"]))
            for st in data["stages"])
        return Profile(model=str(data["model"]), device=str(data["device"]), dtype=str(data["dtype"]),
                       stages=stages, capacity_bytes=int(data["capacity_bytes"]),
                       host_bandwidth_Bps=float(data["host_bandwidth_Bps"]),
                       network_bandwidth_Bps=float(data["network_bandwidth_Bps"]),
                       fit_error={str(k): float(v) for k, v in (data.get("fit_error") or {}).items()},
                       train_mode=str(data.get("train_mode", "full")))
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise ProfileError(f"{where}: malformed profile ({type(exc).__name__}: {exc})") from exc


def load_profile(path, *, stages: int, force: bool = False, capacity_bytes: int | None = None,
                 model: str | None = None, device: str | None = None,
                 train_mode: str | None = None) -> Profile:
    """Read a profile and check that it fits the run: `stages` stages, and (when given) the same
    model and device. A mismatch raises ProfileError unless `force`.

    With force, a model or device mismatch is accepted as is; a stage-count mismatch is accepted
    by remapping the stages proportionally (`remap_stages`), an approximation. `capacity_bytes`,
    when given, replaces the stored device capacity (the user's --device-memory).
    """
    path = Path(path)
    profile = profile_from_dict(_read(path), where=str(path))
    diffs = []
    if profile.num_stages != stages:
        diffs.append(f"{profile.num_stages} stages, the run has {stages}")
    if model is not None and profile.model != model:
        diffs.append(f"model {profile.model!r}, the run uses {model!r}")
    if device is not None and profile.device != device:
        diffs.append(f"device {profile.device!r}, the run uses {device!r}")
    if train_mode is not None and profile.train_mode != train_mode:
        diffs.append(f"training mode {profile.train_mode!r}, the run uses {train_mode!r}")
    if diffs and not force:
        raise ProfileError(f"profile {path} was measured for {'; '.join(diffs)}. Re-profile, or "
                           "pass --force-profile to use it anyway")
    if diffs:
        warnings.warn(f"using profile {path} measured for {'; '.join(diffs)} (forced)", stacklevel=2)
    if profile.num_stages != stages:
        profile = remap_stages(profile, stages)
    if capacity_bytes is not None:
        profile = replace(profile, capacity_bytes=int(capacity_bytes))
    return profile


def remap_stages(profile: Profile, stages: int) -> Profile:
    """The profile re-cut into `stages` equal slices of the model (only with --force-profile).

    Old stage i and new stage j each cover an equal fraction of the model; w[i][j] is the share
    of old stage i inside new stage j. Size-proportional figures (b, c, memory) add up weighted by
    w, so model totals are kept; the fixed overhead a is a per-op cost, so it is the w-weighted
    mean. Approximate: embeddings and LM head, which live on the end stages, get smeared.
    """
    if stages < 1:
        raise ProfileError(f"cannot remap a profile to {stages} stages")
    old = profile.stages
    n = len(old)
    out = []
    for j in range(stages):
        lo, hi = j / stages, (j + 1) / stages
        w = [max(0.0, min(hi, (i + 1) / n) - max(lo, i / n)) * n for i in range(n)]
        total = sum(w)

        def mix(op: str) -> OpCoeffs:
            ks = [getattr(st, op) for st in old]
            return OpCoeffs(a=sum(wi * k.a for wi, k in zip(w, ks)) / total,
                            b=sum(wi * k.b for wi, k in zip(w, ks)),
                            c=sum(wi * k.c for wi, k in zip(w, ks)))

        ops = {op: mix(op) for op in ("fwd", "bwd", "decode")}
        ops["optim"] = OpCoeffs(a=sum(wi * st.optim.a for wi, st in zip(w, old)))   # scales with size
        mem = {m: round(sum(wi * getattr(st, m) for wi, st in zip(w, old))) for m in _MEMORY}
        sync = (None if all(st.sync_bytes is None for st in old)
                else round(sum(wi * st.copy_bytes for wi, st in zip(w, old))))
        layers = round(sum(wi * st.layers for wi, st in zip(w, old)))
        out.append(StageProfile(**ops, **mem, sync_bytes=sync, layers=layers))
    return replace(profile, stages=tuple(out))


