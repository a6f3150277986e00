"""`lemix export`: a trained node's stages as a Hugging Face model directory.

Input: the per-stage states of one node (`StateResult`s from `GetState`, or the stage files of a
`lemix serve --state-dir` checkpoint), each with the `meta` the worker records: the training
mode, the base reference (`{"model": "builtin-tiny" | checkpoint dir, "seed"}`), the stage's HF
key names. Output, loadable with `transformers` / `peft` and no LeMix:

- full training, or LoRA with merge (the default): `config.json` + `model.safetensors` (+
  tokenizer), the full weights, LoRA merged in by `peft`'s `merge_and_unload`;
- LoRA with `adapter=True`: a PEFT adapter directory (`adapter_config.json` +
  `adapter_model.safetensors`) whose `base_model_name_or_path` is the base checkpoint dir; the
  built-in model has no directory, so its base is written to `OUT/base` and referenced there.

Weights are written in the dtype the engine trained in (adapters in float32, as peft keeps them).
A model with tied input/output embeddings is written untied: the split trains two copies.
"""
from __future__ import annotations

import re
from pathlib import Path

import torch

from lemix.engine.adapt import AdaptSpec, base_model, prepare_model
from lemix.engine.model import BUILTIN_TINY, load_model


class ExportError(ValueError):
    """A state directory or stage states that cannot be exported; the message says why."""


def latest_checkpoint(state_dir: str | Path, node: int | None = None) -> Path:
    """The newest complete checkpoint under <state_dir>/checkpoints (of `node`, or of any node).

    A checkpoint directory gets its final name only once all its stage files are written and
    fsynced (lemix.serve.checkpoint), so a `v<version>` directory is complete."""
    root = Path(state_dir) / "checkpoints"
    found = []
    for d in root.glob("node*/v*"):
        m = re.fullmatch(r"node(\d+)", d.parent.name), re.fullmatch(r"v(\d+)", d.name)
        if all(m) and d.is_dir() and (node is None or int(m[0][1]) == node):
            found.append((int(m[1][1]), -int(m[0][1]), d))
    if not found:
        which = "" if node is None else f" of node {node}"
        raise ExportError(f"no checkpoint{which} under {root} (lemix serve --state-dir writes them "
                          "every --checkpoint-every steps)")
    return max(found)[2]


def read_checkpoint(path: str | Path) -> list[dict]:
    """The stage blobs of one checkpoint directory, stage order."""
    files = sorted(Path(path).glob("stage*.pt"), key=lambda f: int(f.stem.removeprefix("stage")))
    if not files:
        raise ExportError(f"checkpoint {path} holds no stage*.pt files")
    blobs = [torch.load(f, map_location="cpu", weights_only=True) for f in files]
    for s, b in enumerate(blobs):
        if not b.get("meta"):
            raise ExportError(f"{files[s]} has no stage metadata (written by an older lemix); "
                              "it cannot be exported")
        if b.get("num_stages", len(blobs)) != len(blobs):
            raise ExportError(f"checkpoint {path} has {len(blobs)} stage files of {b['num_stages']} stages")
    return blobs


def export_state_dir(state_dir: str | Path, out: str | Path, *, node: int | None = None,
                     adapter: bool = False) -> Path:
    """Export the newest checkpoint of a `lemix serve` state directory."""
    blobs = read_checkpoint(latest_checkpoint(state_dir, node))
    return export_stages([(b["weights"], b["meta"]) for b in blobs], out, adapter=adapter)


def _hf_state(stages: list[tuple[dict, dict]]) -> dict[str, torch.Tensor]:
    out = {}
    for weights, meta in stages:
        names = meta["hf_names"]
        for key, tensor in weights.items():
            if key not in names:
                raise ExportError(f"stage weight {key!r} has no HF name in its metadata")
            out[names[key]] = tensor
    return out


def _untie(model) -> None:
    """Give the LM head its own tensor (the split trained a separate copy of it)."""
    if getattr(model.config, "tie_word_embeddings", False):
        head = model.get_output_embeddings()
        head.weight = torch.nn.Parameter(head.weight.detach().clone())
        model.config.tie_word_embeddings = False


def _load_into(model, state: dict[str, torch.Tensor], what: str) -> None:
    own = model.state_dict()
    unknown = sorted(set(state) - set(own))
    if unknown:
        raise ExportError(f"{what}: the base model has no {unknown[:3]}")
    with torch.no_grad():
        for key, tensor in state.items():
            own[key].copy_(tensor)


def export_stages(stages: list[tuple[dict, dict]], out: str | Path, *, adapter: bool = False) -> Path:
    """Write one node's stages [(weights, meta), ...] (stage order) as an HF directory `out`."""
    if not stages:
        raise ExportError("no stages to export")
    meta0 = stages[0][1]
    spec = AdaptSpec(**{**meta0["adapt"], "lora_targets": tuple(meta0["adapt"]["lora_targets"] or ()) or None})
    base_ref = meta0["base"]
    if adapter and not spec.lora:
        raise ExportError("--adapter needs a LoRA run (the checkpoint trained every weight)")
    expected = 0
    for s, (_, meta) in enumerate(stages):
        if meta["layers"][0] != expected:
            raise ExportError(f"stage {s} starts at layer {meta['layers'][0]}, expected {expected}")
        expected = meta["layers"][1]
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    model, tokenizer, family = load_model(base_ref["model"], seed=int(base_ref.get("seed", 0)),
                                          tokenizer=base_ref.get("tokenizer"),
                                          byte_tokenizer=bool(base_ref.get("byte_tokenizer")),
                                          adapt=AdaptSpec(dtype=spec.dtype))
    if expected != model.config.num_hidden_layers:
        raise ExportError(f"the stages cover {expected} layers, the base model has "
                          f"{model.config.num_hidden_layers}")
    state = _hf_state(stages)
    if not spec.lora:
        _untie(model)
        missing = sorted(set(model.state_dict()) - set(state))
        if missing:
            raise ExportError(f"the stages lack weights {missing[:3]}")
        _load_into(model, state, "full weights")
        model.save_pretrained(out)
        _save_tokenizer(tokenizer, base_ref["model"], out)
        return out
    base_dir = _base_dir(model, tokenizer, base_ref["model"], out) if adapter else None
    peft_model = prepare_model(model, spec, family, spec.dtype)
    _load_into(base_model(peft_model), state, "adapters")
    if adapter:
        peft_model.peft_config["default"].base_model_name_or_path = str(base_dir)
        peft_model.save_pretrained(str(out))
    else:
        merged = peft_model.merge_and_unload()
        _untie(merged)
        merged.save_pretrained(out)
    _save_tokenizer(tokenizer, base_ref["model"], out)
    return out


def _base_dir(model, tokenizer, spec: str, out: Path) -> Path:
    """Where the adapter's base lives: the checkpoint dir, or (built-in model) OUT/base."""
    if spec != BUILTIN_TINY:
        return Path(spec).resolve()
    base = out / "base"
    model.save_pretrained(base)
    _save_tokenizer(tokenizer, spec, base)
    return base.resolve()


def _save_tokenizer(tokenizer, spec: str, out: Path) -> None:
    """The checkpoint's own tokenizer files, or the byte tokenizer as an HF fast tokenizer."""
    inner = getattr(tokenizer, "_tok", None)
    if inner is not None:
        inner.save_pretrained(out)
    else:   # the built-in model, or a checkpoint run with --byte-tokenizer
        from lemix.engine.tokenizer import hf_byte_tokenizer

        hf_byte_tokenizer().save_pretrained(out)
