"""Policies are registered by name; choosing one is a registry lookup, never an if-chain.

This module is a leaf: policy modules import `register` from it, and `lemix.sched.policies`
(which imports every built-in policy) offers `make_policy` / `policy_names`."""
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


def registered() -> dict[str, Callable]:
    """Name -> policy factory, in registration order (read only)."""
    return _REGISTRY
