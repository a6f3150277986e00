"""`lemix serve` as a library call: bind the port, build the app, run it under uvicorn until
SIGTERM/SIGINT, drain, and say how it ended.

Order of start-up: the port is bound first (a taken or invalid port fails at once), then the
state dir, journal and checkpoints are checked (all before any slow work), then the server
listens while the engine is built on a thread (profiling, if no profile is cached, can take
minutes; /health answers 503 "starting" meanwhile). A failure at any step raises ServeError.

Shutdown on SIGTERM or SIGINT (uvicorn's own handlers are replaced, so a clean exit is status
0, not the re-raised signal):
  1. stop taking requests (503, /health "draining"), let in-flight ones finish for up to
     drain_timeout_s; a second signal skips the wait;
  2. cut what is left: a stream gets an error event and `data: [DONE]`, a plain request a 503;
  3. uvicorn closes the connections; the app's lifespan then stops feeding training, lets the
     engine finish its micro-batches, writes every node's final checkpoint, closes the journal.
"""
from __future__ import annotations

import asyncio
import logging
import socket
import time

from lemix.config import LemixConfig
from lemix.serve.options import ServeOptions
from lemix.serve.state import ServeError

log = logging.getLogger("lemix.serve")


def bind(host: str, port: int) -> socket.socket:
    """A listening socket on host:port, or ServeError saying why not."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise ServeError(f"cannot listen on {host}:{port}: {exc.strerror}") from None
    family, kind, proto, _, addr = infos[0]
    # proto IPPROTO_TCP, not 0: asyncio sets TCP_NODELAY only on sockets that say they are TCP
    # (without it, Nagle and delayed ACKs add ~40 ms per response)
    sock = socket.socket(family, kind, proto or socket.IPPROTO_TCP)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(addr)
        sock.listen(2048)
    except OSError as exc:
        sock.close()
        raise ServeError(f"cannot listen on {host}:{port}: {exc.strerror or exc}"
                         f"{' (is another server running?)' if exc.errno == 98 else ''}") from None
    sock.set_inheritable(True)
    return sock


def run_server(cfg: LemixConfig, opts: ServeOptions, **host_kwargs) -> None:
    """Blocks until the server has shut down. host_kwargs: hf_model, tokenizer, profile.
    Raises ServeError when it could not start or did not shut down cleanly."""
    import uvicorn

    from lemix.serve.app import create_app
    from lemix.serve.host import EngineHost

    level = getattr(logging, opts.log_level.upper())
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    sock = bind(opts.host, opts.port)
    try:
        host = EngineHost(cfg, opts, **host_kwargs)
        port = sock.getsockname()[1]
        log.info("listening on http://%s:%d/v1 (state in %s)", opts.host, port, opts.state_dir)
        app = create_app(host=host)
        config = uvicorn.Config(app, log_level=opts.log_level.lower(), access_log=False,
                                timeout_graceful_shutdown=10)
        server = _uvicorn_server(config, host, opts.drain_timeout_s)
        host.on_fatal = server.fatal
        server.run(sockets=[sock])
    finally:
        sock.close()
    if host.phase not in ("closed", "failed"):   # the lifespan never ran its shutdown
        host.close()
    if host.phase == "failed":
        raise ServeError(f"could not start: {host.failure}")
    if host.close_error:
        raise ServeError(f"shut down with errors: {host.close_error}")


def _uvicorn_server(config, host, drain_timeout_s: float):
    """A uvicorn.Server with LeMix's drain in place of uvicorn's signal handling."""
    import uvicorn

    class Server(uvicorn.Server):
        def __init__(self) -> None:
            super().__init__(config)
            self.signals = 0
            self._drain: asyncio.Task | None = None

        def handle_exit(self, sig, frame) -> None:   # signal handler: no re-raise at the end
            self.signals += 1

        def fatal(self) -> None:
            self.should_exit = True

        async def on_tick(self, counter: int) -> bool:
            if self.signals and self._drain is None:
                self._drain = asyncio.get_running_loop().create_task(self.drain())
            return await super().on_tick(counter)

        async def drain(self) -> None:
            log.info("shutting down: no new requests; %d in flight get up to %.0f s",
                     host.open_streams(), drain_timeout_s)
            host.begin_drain()
            deadline = time.monotonic() + drain_timeout_s
            while host.open_streams() and time.monotonic() < deadline and self.signals < 2:
                await asyncio.sleep(0.05)
            cut = host.cut_streams("the server is shutting down; this request was cut before it finished")
            if cut:
                log.warning("drain: %d requests cut", cut)
                await asyncio.sleep(0.2)    # let their handlers send the error event and [DONE]
            self.should_exit = True
    return Server()
