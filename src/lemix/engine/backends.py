"""Choosing a backend by name: `local` (a thread per stage worker) or `ray` (an actor per stage
worker, imported only when chosen: Ray is an optional dependency)."""
from __future__ import annotations

from typing import Callable

from lemix.engine.backend import Backend, LocalBackend


def _ray(**kwargs) -> Backend:
    from lemix.engine.ray_backend import RayBackend

    return RayBackend(**kwargs)


BACKENDS: dict[str, Callable[..., Backend]] = {"local": LocalBackend, "ray": _ray}


def make_backend(name: str, **kwargs) -> Backend:
    if name not in BACKENDS:
        raise ValueError(f"unknown backend {name!r}; allowed: {', '.join(sorted(BACKENDS))}")
    return BACKENDS[name](**kwargs)
