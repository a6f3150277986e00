"""The HTTP surface as data: OpenAI-style request bodies (validated strictly: a field of the
wrong type is a 400, never coerced), the error body, and the response/chunk builders.

Error body, for every status:  {"error": {"message", "type", "param", "code"}}

Every string is checked for lone surrogates (`"a\\ud800b"` is valid JSON but not Unicode: no
tokenizer or database can take it), so such text is a 400 naming the field.
"""
from __future__ import annotations

import time
import uuid
from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, model_validator

MAX_STOP_CHARS = 256


def _no_surrogates(text: str) -> str:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ValueError(f"the text holds a lone surrogate ({text[exc.start]!r} at character "
                         f"{exc.start}), which is not valid Unicode") from None
    return text


Text = Annotated[str, AfterValidator(_no_surrogates)]
TokenIds = Annotated[list[Annotated[int, Field(ge=0)]], Field(min_length=1)]


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
    model: Text
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    n: int | None = Field(None, ge=1, le=1, description="only 1")
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    stop: (Annotated[Text, Field(max_length=MAX_STOP_CHARS)]
           | Annotated[list[Annotated[Text, Field(max_length=MAX_STOP_CHARS)]], Field(max_length=4)]
           | None) = None
    seed: int | None = None
    priority: int | None = Field(None, ge=-1000, le=1000, description="lemix: higher is served first")

    @property
    def stops(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])


class CompletionRequest(_Sampling):
    prompt: (Annotated[Text, Field(min_length=1)]
             | Annotated[list[Annotated[Text, Field(min_length=1)]], Field(min_length=1, max_length=1)]
             | TokenIds)
    echo: Literal[False] | None = Field(None, description="not supported")
    logprobs: None = Field(None, description="not supported; see lemix.inference_loss")
    suffix: Literal[""] | None = Field(None, description="not supported")

    # echo, logprobs and suffix can only be off (their types say so): the response's
    # lemix.inference_loss gives the prompt's per-token NLL instead of logprobs


class TextPart(_Body):
    type: Literal["text"]
    text: Text


class ChatMessage(_Body):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Text | list[TextPart] | None = None

    @property
    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(p.text for p in self.content)
        return self.content or ""


class ChatRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: Literal[False] | None = Field(None, description="not supported")

    @model_validator(mode="after")
    def _check_chat(self):
        if self.logprobs:
            raise ValueError("logprobs are not supported")
        return self


class TrainSample(_Body):
    text: Text | None = None
    prompt: Text | None = None
    completion: Text | None = None

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

    @property
    def chars(self) -> int:
        return len(self.text) if self.text is not None else len(self.prompt or "") + len(self.completion or "")

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
