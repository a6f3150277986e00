"""The HTTP surface as data: OpenAI-style request bodies (validated strictly: a field of the
wrong type is a 400, never coerced), the error body, and the response/chunk builders.

Error body, for every status:  {"error": {"message", "type", "param", "code"}}
"""
from __future__ import annotations

import time
import uuid
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator


class APIError(Exception):
    """An error answered as an OpenAI error body."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers or {}

    def body(self) -> dict:
        return error_body(self.message, self.type, self.param, self.code)


def error_body(message: str, type: str, param: str | None = None, code: str | None = None) -> dict:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


# ---------------------------------------------------------------------- requests

class _Body(BaseModel):
    # unknown fields (user, logit_bias, ...) are ignored, as OpenAI-compatible servers do
    model_config = ConfigDict(extra="ignore", strict=True)


class StreamOptions(_Body):
    include_usage: bool = False


class _Sampling(_Body):
    model: str
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    n: int | None = Field(None, ge=1)
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    priority: int | None = Field(None, ge=-1000, le=1000, description="lemix: higher is served first")

    @model_validator(mode="after")
    def _check(self):
        if self.n not in (None, 1):
            raise ValueError("only n=1 is supported")
        if isinstance(self.stop, list) and len(self.stop) > 4:
            raise ValueError("stop takes at most 4 strings")
        return self

    @property
    def stops(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])


class CompletionRequest(_Sampling):
    prompt: str | list[str] | list[int]
    echo: bool | None = None
    logprobs: int | None = None
    suffix: str | None = None

    @model_validator(mode="after")
    def _check_prompt(self):
        if self.echo or self.logprobs is not None or self.suffix:
            raise ValueError("echo, logprobs and suffix are not supported; the response's "
                             "lemix.inference_loss gives the prompt's per-token NLL")
        if isinstance(self.prompt, list) and self.prompt and isinstance(self.prompt[0], str):
            if len(self.prompt) != 1:
                raise ValueError("one prompt per request (a list of prompts is not supported)")
        return self


class TextPart(_Body):
    type: Literal["text"]
    text: str


class ChatMessage(_Body):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None

    @property
    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(p.text for p in self.content)
        return self.content or ""


class ChatRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool | None = None

    @model_validator(mode="after")
    def _check_chat(self):
        if self.logprobs:
            raise ValueError("logprobs are not supported")
        return self


class TrainSample(_Body):
    text: str | None = None
    prompt: str | None = None
    completion: str | None = None

    @model_validator(mode="after")
    def _check(self):
        if self.text is not None:
            if self.prompt is not None or self.completion is not None:
                raise ValueError("a sample has either text, or prompt and completion")
            if not self.text:
                raise ValueError("text is empty")
        elif self.prompt is None or self.completion is None:
            raise ValueError("a sample needs text, or prompt and completion")
        elif not (self.prompt + self.completion):
            raise ValueError("prompt and completion are both empty")
        return self

    def payload(self) -> dict:
        if self.text is not None:
            return {"text": self.text}
        return {"prompt": self.prompt, "completion": self.completion}


class TrainRequest(_Body):
    samples: list[TrainSample] = Field(min_length=1)

    @model_validator(mode="before")
    @classmethod
    def _wrap(cls, data):
        """Accept one sample, a list of samples, or {"samples": [...]}."""
        if isinstance(data, list):
            return {"samples": data}
        if isinstance(data, dict) and "samples" not in data:
            return {"samples": [data]}
        return data


# ---------------------------------------------------------------------- responses

def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def now_unix() -> int:
    return int(time.time())


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def completion_body(rid: str, created: int, model: str, text: str, finish: str, use: dict, extra: dict) -> dict:
    return {"id": rid, "object": "text_completion", "created": created, "model": model,
            "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": finish}],
            "usage": use, "lemix": extra}


def completion_chunk(rid: str, created: int, model: str, text: str, finish: str | None) -> dict:
    return {"id": rid, "object": "text_completion", "created": created, "model": model,
            "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": finish}]}


def chat_body(rid: str, created: int, model: str, text: str, finish: str, use: dict, extra: dict) -> dict:
    return {"id": rid, "object": "chat.completion", "created": created, "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                         "logprobs": None, "finish_reason": finish}],
            "usage": use, "lemix": extra}


def chat_chunk(rid: str, created: int, model: str, delta: dict, finish: str | None) -> dict:
    return {"id": rid, "object": "chat.completion.chunk", "created": created, "model": model,
            "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]}
