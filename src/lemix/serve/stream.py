"""One inference request in flight: engine-thread events turned into an asyncio queue.

The engine calls `on_token` / `finish` on its own thread; each event is handed to the request's
event loop with `loop.call_soon_threadsafe`, where the HTTP handler reads it from `events` (a
queue the choices of one HTTP request share) as (choice index, kind, value):

    ("delta", (text, logprobs))  newly safe text (stop strings cut, partial characters held
                                 back) and the logprobs of the tokens generated since the last
    ("done", info)               finish_reason, token counts, ttft/e2e, weight version, inference loss
    ("error", Failure)           the request failed in the engine, or was cut at shutdown
"""
from __future__ import annotations

import asyncio
import math
from dataclasses import dataclass

from lemix.engine.messages import TokenLogprob
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
                 prompt_tokens: int, max_tokens: int, *, index: int = 0,
                 events: asyncio.Queue | None = None, stop_ids=()) -> None:
        """max_tokens 0 (echo only): the engine draws one token, which is dropped here."""
        self.task_id = task_id
        self.index = index
        self.loop = loop
        self.detok = detok
        self.prompt_tokens = prompt_tokens
        self.max_tokens = max_tokens
        self.stop_ids = frozenset(stop_ids)
        self.events: asyncio.Queue = events if events is not None else asyncio.Queue()
        self.logprobs: list[TokenLogprob] = []     # of the tokens given to the detokenizer
        self.prompt_logprobs: tuple[TokenLogprob, ...] | None = None
        self.stop_token: int | None = None          # the stop_token_ids member that ended it
        self._unsent = 0                            # logprobs[_unsent:] not yet in a delta
        self.first_token = False
        self.cancelled = False     # the client went away (or it was cut): stop at the next token
        self.closed = False        # its last event (done or error) is queued

    # ------------------------------------------------------------------ engine thread
    def on_token(self, token: int, logprob: TokenLogprob | None = None) -> bool:
        self.first_token = True
        if self.closed or len(self.detok.ids) >= self.max_tokens:
            return True
        if token in self.stop_ids:
            self.stop_token = token
            return True
        if logprob is not None:
            self.logprobs.append(logprob)
        delta = self.detok.push(token)
        if delta:
            self._put(("delta", (delta, self._new_logprobs())))
        return self.detok.stopped or self.cancelled

    def _new_logprobs(self) -> list[TokenLogprob]:
        new, self._unsent = self.logprobs[self._unsent:], len(self.logprobs)
        return new

    @property
    def cumulative_logprob(self) -> float:
        return sum(lp.logprob for lp in self.logprobs)

    def finish(self, rec: RequestRecord, version: int) -> Done | None:
        if rec.failed:
            self.fail(rec.error or "the request failed in the engine")
            return None
        tail = self.detok.flush()
        if (tail or self._unsent < len(self.logprobs)) and not self.closed:
            self._put(("delta", (tail, self._new_logprobs())))
        n = len(self.detok.ids)
        by_length = n >= self.max_tokens and not self.detok.stopped
        eos = not by_length and not self.detok.stopped   # ended early: EOS or a stop_token_ids token
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
            self.loop.call_soon_threadsafe(self.events.put_nowait, (self.index, *item))
        except RuntimeError:   # the event loop is closed: nobody is listening any more
            pass
