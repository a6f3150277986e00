"""OpenAI-compatible serving with continuous training (`lemix serve`).

    from lemix.serve import ServeOptions, create_app, run_server
    run_server(cfg, ServeOptions(port=8000, state_dir="state"))      # blocks

FastAPI/uvicorn and torch are imported when an app is built, not by this package.
"""
from __future__ import annotations

from lemix.serve.options import SERVE_DEFAULTS, ServeOptions

__all__ = ["SERVE_DEFAULTS", "ServeOptions", "create_app", "run_server"]


def __getattr__(name: str):
    if name == "create_app":
        from lemix.serve.app import create_app
        return create_app
    if name == "run_server":
        from lemix.serve.server import run_server
        return run_server
    raise AttributeError(f"module 'lemix.serve' has no attribute {name!r}")
