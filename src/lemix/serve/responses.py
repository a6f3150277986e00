"""Response bodies and stream chunks in OpenAI's formats, logprobs included.

Completions logprobs (the legacy format lm-evaluation-harness reads):
    {"tokens": [str], "token_logprobs": [float | None], "top_logprobs": [{str: float} | None],
     "text_offset": [int]}
one entry per token: with echo the prompt's first (whose logprob is None: nothing precedes
it), then the generated ones. `top_logprobs` holds the k most likely tokens and the chosen one
(vLLM's convention); tokens whose strings coincide (bytes of a split character) keep the most
likely one's logprob. `text_offset` is each token's character offset in prompt + completion.
Chat logprobs: {"content": [{"token", "logprob", "bytes", "top_logprobs": [{"token", "logprob",
"bytes"}]}]}. Token strings are each id decoded alone.
"""
from __future__ import annotations

from lemix.engine.messages import TokenLogprob


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def completion_body(rid: str, created: int, model: str, choices: list[dict], use: dict, extra: dict) -> dict:
    return {"id": rid, "object": "text_completion", "created": created, "model": model,
            "choices": choices, "usage": use, "lemix": extra}


def completion_choice(index: int, text: str, finish: str | None, logprobs: dict | None = None) -> dict:
    return {"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish}


def completion_chunk(rid: str, created: int, model: str, choice: dict) -> dict:
    return {"id": rid, "object": "text_completion", "created": created, "model": model, "choices": [choice]}


def chat_body(rid: str, created: int, model: str, choices: list[dict], use: dict, extra: dict) -> dict:
    return {"id": rid, "object": "chat.completion", "created": created, "model": model,
            "choices": choices, "usage": use, "lemix": extra}


def chat_choice(index: int, text: str, finish: str | None, logprobs: dict | None = None) -> dict:
    return {"index": index, "message": {"role": "assistant", "content": text},
            "logprobs": logprobs, "finish_reason": finish}


def chat_chunk(rid: str, created: int, model: str, index: int, delta: dict, finish: str | None,
               logprobs: dict | None = None) -> dict:
    return {"id": rid, "object": "chat.completion.chunk", "created": created, "model": model,
            "choices": [{"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish}]}


class LogprobFormat:
    """Token logprobs -> the two OpenAI formats, with the tokenizer's token strings."""

    def __init__(self, tokenizer) -> None:
        self.tok = tokenizer
        self._text: dict[int, str] = {}

    def text(self, token: int) -> str:
        if token not in self._text:
            if len(self._text) > 65536:
                self._text.clear()
            self._text[token] = self.tok.decode([token])
        return self._text[token]

    def completion(self, entries: list[TokenLogprob | int], k: int, offset: int) -> dict:
        """entries: a bare id for a token without a logprob (the prompt's first)."""
        out = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
        for e in entries:
            token = e if isinstance(e, int) else e.token
            s = self.text(token)
            out["tokens"].append(s)
            out["text_offset"].append(offset)
            offset += len(s)
            if isinstance(e, int):
                out["token_logprobs"].append(None)
                out["top_logprobs"].append(None)
                continue
            out["token_logprobs"].append(e.logprob)
            top: dict[str, float] = {}
            for t, lp in e.top[:k]:    # tokens whose strings coincide: the most likely one's
                top.setdefault(self.text(t), lp)
            top.setdefault(s, e.logprob)
            out["top_logprobs"].append(top)
        return out

    def chat(self, entries: list[TokenLogprob], k: int) -> dict:
        def one(token: int, lp: float) -> dict:
            s = self.text(token)
            return {"token": s, "logprob": lp, "bytes": list(s.encode("utf-8"))}
        return {"content": [{**one(e.token, e.logprob), "top_logprobs": [one(t, lp) for t, lp in e.top[:k]]}
                            for e in entries]}
