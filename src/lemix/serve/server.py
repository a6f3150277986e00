"""`lemix serve` as a library call: build the app, run it under uvicorn until SIGINT/SIGTERM.

On a signal uvicorn stops accepting connections and lets in-flight requests finish (up to
drain_timeout_s); the app's lifespan then drains submitted training, stops the engine, writes
the final checkpoints and closes the journal.
"""
from __future__ import annotations

import logging

from lemix.config import LemixConfig
from lemix.serve.options import ServeOptions


def run_server(cfg: LemixConfig, opts: ServeOptions, **host_kwargs) -> None:
    """Blocks until the server has shut down. host_kwargs: hf_model, tokenizer, profile."""
    import uvicorn

    from lemix.serve.app import create_app

    level = getattr(logging, opts.log_level.upper(), logging.INFO)
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    app = create_app(cfg, opts, **host_kwargs)
    config = uvicorn.Config(app, host=opts.host, port=opts.port, log_level=opts.log_level.lower(),
                            timeout_graceful_shutdown=opts.drain_timeout_s, access_log=False)
    uvicorn.Server(config).run()
