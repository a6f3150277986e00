"""Built-in placement policies; importing this package registers them all."""
from __future__ import annotations

from lemix.sched.policies import baselines, lemix, separate  # noqa: F401  (they register themselves)
from lemix.sched.registry import registered


def policy_names() -> list[str]:
    return list(registered())


def make_policy(name: str, params):
    factories = registered()
    if name not in factories:
        raise ValueError(f"unknown policy {name!r}; allowed: {', '.join(factories)}")
    return factories[name](name, params)
