"""Checking that a directory is a checkpoint we can load, with errors that say what we expected."""
from __future__ import annotations

import json
from pathlib import Path

SUPPORTED_MODEL_TYPES = ("llama", "qwen2", "gpt2")
EXPECTED = ("expected a Hugging Face causal-LM checkpoint directory with config.json "
            "(model_type llama, qwen2 or gpt2) and *.safetensors weights")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


class CheckpointError(ValueError):
    """A path that is not a checkpoint this engine can load."""


def _found(path: Path) -> str:
    if not path.exists():
        return f"{path} does not exist"
    if not path.is_dir():
        return f"{path} is not a directory"
    names = sorted(p.name for p in path.iterdir())
    shown = ", ".join(names[:10]) + (", ..." if len(names) > 10 else "")
    return f"{path} containing [{shown}]" if names else f"{path} is empty"


def check_checkpoint_dir(path: str | Path) -> dict:
    """Return the parsed config.json of a supported checkpoint dir, else raise CheckpointError."""
    path = Path(path)
    if not path.is_dir() or not (path / "config.json").is_file():
        raise CheckpointError(f"{EXPECTED}; found {_found(path)}")
    try:
        config = json.loads((path / "config.json").read_text())
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{EXPECTED}; found an unreadable config.json in {path}: {exc}") from exc
    model_type = config.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise CheckpointError(f"{EXPECTED}; found model_type {model_type!r} in {path / 'config.json'}")
    if not any(path.glob("*.safetensors")):
        raise CheckpointError(f"{EXPECTED}; found no *.safetensors in {_found(path)}")
    return config


def has_tokenizer_files(path: str | Path) -> bool:
    return any((Path(path) / name).is_file() for name in TOKENIZER_FILES)
