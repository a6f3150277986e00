"""One inference request in flight: engine-thread events turned into an asyncio queue.

The engine calls `on_token` / `finish` on its own thread; each event is handed to the request's
event loop with `loop.call_soon_threadsafe`, where the HTTP handler reads it from `events`:

    ("delta", text)    newly safe text (stop strings cut, partial characters held back)
    ("done", info)     finish_reason, token counts, ttft/e2e, weight version, inference loss
    ("error", Failure) the request failed in the engine, or was cut at shutdown
"""
from __future__ import annotations

import asyncio
import math
from dataclasses import dataclass

from lemix.serve.text import Detokenizer
from lemix.types import RequestRecord


@dataclass(frozen=True)
class Done:
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int
    ttft_s: float | None
    e2e_s: float | None
    weight_version: int
    node: int
    inference_loss: float | None
    staleness_steps: int = 0

    def extra(self) -> dict:
        """The response's `lemix` field."""
        return {"inference_loss": self.inference_loss, "weight_version": self.weight_version,
                "staleness_steps": self.staleness_steps, "node": self.node, "ttft_s": self.ttft_s,
                "e2e_s": self.e2e_s}


@dataclass(frozen=True)
class Failure:
    message: str
    status: int = 500
    code: str = "engine_error"


class Stream:
    def __init__(self, task_id: int, loop: asyncio.AbstractEventLoop, detok: Detokenizer,
                 prompt_tokens: int, max_tokens: int) -> None:
        self.task_id = task_id
        self.loop = loop
        self.detok = detok
        self.prompt_tokens = prompt_tokens
        self.max_tokens = max_tokens
        self.events: asyncio.Queue = asyncio.Queue()
        self.first_token = False
        self.cancelled = False     # the client went away (or it was cut): stop at the next token
        self.closed = False        # its last event (done or error) is queued

    # ------------------------------------------------------------------ engine thread
    def on_token(self, token: int) -> bool:
        self.first_token = True
        if self.closed:
            return True
        delta = self.detok.push(token)
        if delta:
            self._put(("delta", delta))
        return self.detok.stopped or self.cancelled

    def finish(self, rec: RequestRecord, version: int) -> Done | None:
        if rec.failed:
            self.fail(rec.error or "the request failed in the engine")
            return None
        tail = self.detok.flush()
        if tail and not self.closed:
            self._put(("delta", tail))
        n = len(self.detok.ids)
        by_length = n >= self.max_tokens and not self.detok.stopped
        eos = not by_length and not self.detok.stopped   # ended early on the EOS token
        loss = rec.inference_loss
        done = Done("length" if by_length else "stop", self.prompt_tokens, n + int(eos), rec.ttft_s,
                    rec.e2e_s, version, rec.node,
                    None if loss is None or math.isnan(loss) else float(loss), rec.staleness_steps)
        if not self.closed:
            self.closed = True
            self._put(("done", done))
        return done

    def fail(self, message: str, status: int = 500, code: str = "engine_error") -> None:
        """End the request with an error (once: a later finish or failure adds nothing)."""
        if not self.closed:
            self.closed = True
            self._put(("error", Failure(message, status, code)))

    def _put(self, item: tuple) -> None:
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, item)
        except RuntimeError:   # the event loop is closed: nobody is listening any more
            pass
