"""Policies are registered by name; choosing one is a registry lookup, never an if-chain."""
from __future__ import annotations

from typing import Callable

_REGISTRY: dict[str, Callable] = {}


def register(name: str) -> Callable:
    """Class decorator: register a policy factory under `name` (a duplicate name is an error)."""

    def deco(cls):
        if name in _REGISTRY:
            raise ValueError(f"policy {name!r} is already registered")
        _REGISTRY[name] = cls
        return cls

    return deco


def _load_builtin() -> None:
    # Importing the package registers every built-in policy exactly once.
    import lemix.sched.policies  # noqa: F401


def policy_names() -> list[str]:
    _load_builtin()
    return list(_REGISTRY)


def make_policy(name: str, params):
    _load_builtin()
    if name not in _REGISTRY:
        raise ValueError(f"unknown policy {name!r}; allowed: {', '.join(_REGISTRY)}")
    return _REGISTRY[name](name, params)
