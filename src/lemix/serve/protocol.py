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

MAX_LOGPROBS = 20     # top alternatives per token (OpenAI: 5 for completions, 20 for chat)
MAX_CHOICES = 16      # n, best_of and prompts x n per request


class _Body(BaseModel):
    # A field this server does not know is a 400 naming it, as OpenAI answers ("unrecognized
    # request argument"): no accepted field is silently ignored. (vLLM ignores unknown fields
    # with a warning.) Fields of the API this server does not implement are declared below and
    # rejected by `_unsupported` with a message that says so.
    model_config = ConfigDict(extra="forbid", strict=True)


def _unsupported(what: str, allowed=(None,)):
    """A field accepted only at its "off" values; anything else is a 400 naming the field."""
    def check(value):
        if value not in allowed:
            raise ValueError(f"{what} is not supported by this server (it generates plain text)")
        return value
    return AfterValidator(check)


class StreamOptions(_Body):
    include_usage: bool = False


Penalty = Annotated[float, Field(ge=-2.0, le=2.0)]
TokenId = Annotated[int, Field(ge=0)]


class _Sampling(_Body):
    model: Text
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    top_k: int | None = Field(None, ge=-1, description="vLLM: 0 or -1 = off")
    min_p: float | None = Field(None, ge=0.0, le=1.0, description="vLLM: 0 = off")
    presence_penalty: Penalty | None = None
    frequency_penalty: Penalty | None = None
    repetition_penalty: float | None = Field(None, gt=0.0, le=10.0, description="vLLM: 1 = off")
    logit_bias: dict[str, Annotated[float, Field(ge=-100.0, le=100.0)]] | None = Field(
        None, description="token id (as a string) -> bias added to its logit")
    n: int | None = Field(None, ge=1, le=MAX_CHOICES)
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    stop: (Annotated[Text, Field(max_length=MAX_STOP_CHARS)]
           | Annotated[list[Annotated[Text, Field(max_length=MAX_STOP_CHARS)]], Field(max_length=4)]
           | None) = None
    stop_token_ids: list[TokenId] | None = Field(None, description="vLLM: stop at any of these tokens")
    ignore_eos: bool | None = Field(None, description="vLLM: do not stop at the EOS token")
    seed: int | None = None
    priority: int | None = Field(None, ge=-1000, le=1000, description="lemix: higher is served first")

    @property
    def stops(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])

    @model_validator(mode="after")
    def _check_stream_options(self):
        if self.stream_options is not None and not self.stream:
            raise ValueError("stream_options is only allowed with stream: true")
        return self


class CompletionRequest(_Sampling):
    prompt: (Annotated[Text, Field(min_length=1)]
             | Annotated[list[Annotated[Text, Field(min_length=1)]], Field(min_length=1, max_length=MAX_CHOICES)]
             | TokenIds
             | Annotated[list[TokenIds], Field(min_length=1, max_length=MAX_CHOICES)])
    max_tokens: int | None = Field(None, ge=0, description="0 only with echo")
    echo: bool | None = Field(None, description="return the prompt (and its logprobs) before the completion")
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    best_of: int | None = Field(None, ge=1, le=MAX_CHOICES, description="draw best_of, return the n "
                                "with the highest cumulative logprob")
    suffix: Annotated[str | None, _unsupported("suffix (insertion)", (None, ""))] = None

    @model_validator(mode="after")
    def _check_completion(self):
        n, best_of = self.n or 1, self.best_of or self.n or 1
        if best_of < n:
            raise ValueError(f"best_of ({best_of}) must be at least n ({n})")
        if best_of > n and self.stream:
            raise ValueError("best_of > n cannot stream (the best are known only at the end)")
        if self.max_tokens == 0 and not self.echo:
            raise ValueError("max_tokens 0 is only allowed with echo (scoring the prompt)")
        return self

    @property
    def prompts(self) -> list[str | list[int]]:
        p = self.prompt
        if isinstance(p, str):
            return [p]
        if p and isinstance(p[0], int):
            return [p]
        return list(p)


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


class ResponseFormat(_Body):
    type: Annotated[str, _unsupported("response_format other than {\"type\": \"text\"}", ("text",))]


_NO_TOOLS = "tool and function calling"


class ChatRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool | None = None
    top_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    response_format: ResponseFormat | None = None
    tools: Annotated[list | None, _unsupported(_NO_TOOLS, (None, []))] = None
    tool_choice: Annotated[str | dict | None, _unsupported(_NO_TOOLS, (None, "none"))] = None
    functions: Annotated[list | None, _unsupported(_NO_TOOLS, (None, []))] = None
    function_call: Annotated[str | dict | None, _unsupported(_NO_TOOLS, (None, "none"))] = None
    parallel_tool_calls: Annotated[bool | None, _unsupported(_NO_TOOLS)] = None

    @model_validator(mode="after")
    def _check_chat(self):
        if self.top_logprobs is not None and not self.logprobs:
            raise ValueError("top_logprobs needs logprobs: true")
        return self


class TokenizeRequest(_Body):
    """vLLM's /tokenize: a prompt (add_special_tokens: BOS first, as completions encode it), or
    chat messages (add_generation_prompt: end where the assistant's reply starts)."""

    model: Text | None = None
    prompt: Text | None = None
    messages: list[ChatMessage] | None = None
    add_special_tokens: bool | None = None
    add_generation_prompt: bool | None = None
    return_token_strs: bool | None = None

    @model_validator(mode="after")
    def _one(self):
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("give prompt or messages (one of them)")
        if self.prompt is not None and self.add_generation_prompt is not None:
            raise ValueError("add_generation_prompt goes with messages")
        if self.messages is not None and self.add_special_tokens is not None:
            raise ValueError("add_special_tokens goes with prompt (a chat prompt is built as chat completions build it)")
        return self


class DetokenizeRequest(_Body):
    model: Text | None = None
    tokens: list[TokenId]


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
