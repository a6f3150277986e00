"""Two small adapters the server puts around the engine."""
from __future__ import annotations


class NoText:
    """Every served task brings its own tokens; the engine must never draw text for one."""

    def sample_text(self, t_s, n_chars, rng):
        raise RuntimeError("lemix serve: a task reached the engine without its tokens")


class HeldBackend:
    """The engine shuts its backend down when its loop ends; the server still needs the
    workers then (the final checkpoint), so that shutdown waits for `release()`."""

    def __init__(self, inner) -> None:
        self.inner = inner
        self.completions = inner.completions

    def start(self, *a, **k):
        return self.inner.start(*a, **k)

    def submit(self, node, stage, cmd, tag):
        return self.inner.submit(node, stage, cmd, tag)

    def call(self, node, stage, cmd):
        return self.inner.call(node, stage, cmd)

    def restart_node(self, node, stages) -> None:
        return self.inner.restart_node(node, stages)

    def describe(self) -> dict:
        return self.inner.describe()

    def shutdown(self) -> None:
        pass

    def release(self) -> None:
        self.inner.shutdown()
