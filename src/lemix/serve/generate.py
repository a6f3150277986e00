"""Completions and chat: a request body -> its choices in the engine -> the response or stream.

One HTTP request becomes one engine request per (prompt, choice): `n` choices of each prompt
(`best_of` of them when best_of > n, the n with the highest cumulative logprob returned, as
vLLM's best_of). Choice j of a prompt samples with seed + j, so a seeded request is
reproducible and its choices differ. Choices are indexed prompt-major (prompt i, choice j ->
i * n + j), as OpenAI does.
"""
from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass

from fastapi.responses import StreamingResponse

from lemix.engine.messages import SamplingParams
from lemix.serve import protocol as P
from lemix.serve import responses as R
from lemix.serve.protocol import APIError
from lemix.serve.stream import Done, Failure, Stream


@dataclass
class Prompt:
    ids: list[int]
    text: str           # as given, or the decoded ids


def sampling_params(host, body: P._Sampling, *, logprobs: int | None, prompt_logprobs: int | None,
                    seed: int) -> SamplingParams:
    vocab = host.tok.vocab_size
    bias = []
    for key, value in (body.logit_bias or {}).items():
        try:
            token = int(key)
        except ValueError:
            raise APIError(400, f"logit_bias: {key!r} is not a token id", param="logit_bias",
                           code="invalid_value") from None
        if not 0 <= token < vocab:
            raise APIError(400, f"logit_bias: token id {token} is outside the vocabulary [0, {vocab})",
                           param="logit_bias", code="invalid_value")
        bias.append((token, float(value)))
    for t in body.stop_token_ids or ():
        if t >= vocab:
            raise APIError(400, f"stop_token_ids: token id {t} is outside the vocabulary [0, {vocab})",
                           param="stop_token_ids", code="invalid_value")
    return SamplingParams(
        temperature=1.0 if body.temperature is None else body.temperature,
        top_p=1.0 if body.top_p is None else body.top_p, seed=seed,
        top_k=max(0, body.top_k or 0), min_p=body.min_p or 0.0,
        presence_penalty=body.presence_penalty or 0.0, frequency_penalty=body.frequency_penalty or 0.0,
        repetition_penalty=1.0 if body.repetition_penalty is None else body.repetition_penalty,
        logit_bias=tuple(bias), logprobs=logprobs, prompt_logprobs=prompt_logprobs,
        ignore_eos=bool(body.ignore_eos))


def submit(host, body: P._Sampling, prompts: list[Prompt], max_tokens: list[int], *, per_prompt: int,
           logprobs: int | None, prompt_logprobs: int | None) -> list[Stream]:
    seed = body.seed if body.seed is not None else host.random_seed()
    asks = []
    for prompt, mt in zip(prompts, max_tokens):
        for j in range(per_prompt):
            asks.append((prompt.ids, mt, sampling_params(host, body, logprobs=logprobs,
                                                         prompt_logprobs=prompt_logprobs, seed=seed + j)))
    return host.submit_group(asyncio.get_running_loop(), asks, body.priority or 0, body.stops,
                             body.stop_token_ids or ())


class Choice:
    """What one choice collected: its text, logprobs and end."""

    def __init__(self, stream: Stream) -> None:
        self.stream = stream
        self.parts: list[str] = []
        self.done: Done | None = None

    @property
    def text(self) -> str:
        return "".join(self.parts)


async def collect(streams: list[Stream]) -> list[Choice]:
    """Wait until every choice is done; the first failure fails the request (and stops the rest)."""
    choices = [Choice(s) for s in streams]
    left = len(streams)
    events = streams[0].events
    while left:
        index, kind, value = await events.get()
        if kind == "delta":
            choices[index].parts.append(value[0])
        elif kind == "done":
            choices[index].done = value
            left -= 1
        else:
            for s in streams:
                s.cancelled = True
            raise APIError(value.status, value.message, type="server_error", code=value.code)
    return choices


def best(choices: list[Choice], per_prompt: int, n: int) -> list[Choice]:
    """Of each prompt's per_prompt choices, the n with the highest cumulative logprob (in order)."""
    if per_prompt == n:
        return choices
    out = []
    for i in range(0, len(choices), per_prompt):
        group = choices[i:i + per_prompt]
        ranked = sorted(range(len(group)), key=lambda j: -group[j].stream.cumulative_logprob)[:n]
        out += [group[j] for j in sorted(ranked)]
    return out


def total_usage(prompts: list[Prompt], choices: list[Choice]) -> dict:
    return R.usage(sum(len(p.ids) for p in prompts), sum(c.done.completion_tokens for c in choices))


def stream_error(f: Failure) -> dict:
    """The SSE error event: OpenAI's error body (its status in the body, the stream is 200)."""
    body = P.error_body(f.message, "server_error", None, f.code)
    body["error"]["status"] = f.status
    return body


def sse(streams: list[Stream], body: P._Sampling, chunk, usage_of, first=None) -> StreamingResponse:
    """Server-sent events in OpenAI's chunk format: chunk(index, text, logprobs, finish, done)
    per event; first(index) (if given) opens each choice; usage_of(dones) for include_usage.
    A client that goes away stops every choice."""
    include_usage = bool(body.stream_options and body.stream_options.include_usage)
    events = streams[0].events

    def event(obj) -> str:
        return f"data: {json.dumps(obj)}\n\n"

    async def gen():
        finished = False
        try:
            if first is not None:
                for s in streams:
                    yield event(first(s.index))
            left, dones = len(streams), {}
            while left:
                index, kind, value = await events.get()
                if kind == "delta":
                    yield event(chunk(index, value[0], value[1], None, None))
                elif kind == "done":
                    left -= 1
                    dones[index] = value
                    yield event(chunk(index, "", [], value.finish_reason, value))
                else:
                    finished = True
                    for s in streams:
                        s.cancelled = True
                    yield event(stream_error(value))
                    yield "data: [DONE]\n\n"
                    return
            finished = True
            if include_usage:
                yield event(usage_of([dones[i] for i in sorted(dones)]))
            yield "data: [DONE]\n\n"
        finally:
            if not finished:
                for s in streams:
                    s.cancelled = True
    return StreamingResponse(gen(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


# ---------------------------------------------------------------------- the two endpoints

def prompt_of(host, prompt: str | list[int]) -> Prompt:
    if isinstance(prompt, str):
        return Prompt(host.tok.encode(prompt), prompt)
    vocab = host.tok.vocab_size
    bad = [t for t in prompt if not 0 <= t < vocab]
    if bad:
        raise APIError(400, f"token ids {bad[:5]} are outside the vocabulary [0, {vocab})",
                       param="prompt", code="invalid_value")
    return Prompt(list(prompt), host.tok.decode(prompt))


def _choice_count(prompts: int, per_prompt: int) -> None:
    if prompts * per_prompt > P.MAX_CHOICES:
        raise APIError(400, f"{prompts} prompts x {per_prompt} choices each is more than this server's "
                       f"limit of {P.MAX_CHOICES} per request", param="n", code="invalid_value")


async def completions(host, body: P.CompletionRequest, check_lengths):
    prompts = [prompt_of(host, p) for p in body.prompts]
    n = body.n or 1
    per = body.best_of or n
    _choice_count(len(prompts), per)
    k = body.logprobs
    wanted = k if k is not None else (0 if per > n else None)   # best_of ranks by logprob
    echo_lp = k if body.echo and k is not None else None
    limits = [check_lengths(len(p.ids), body.max_tokens, host.opts.default_max_tokens) for p in prompts]
    streams = submit(host, body, prompts, limits, per_prompt=per, logprobs=wanted, prompt_logprobs=echo_lp)
    rid, ts, fmt = P.new_id("cmpl"), P.now_unix(), R.LogprobFormat(host.tok)

    def head(prompt: Prompt, stream: Stream) -> tuple[str, list, int]:
        """(text, logprob entries, offset of the first generated token): the echoed prompt or nothing."""
        if not body.echo:
            return "", [], len(prompt.text)
        entries = [prompt.ids[0], *(stream.prompt_logprobs or ())] if echo_lp is not None else []
        return prompt.text, entries, 0

    if body.stream:
        offsets: dict[int, int] = {}     # choice -> text offset of its next token

        def chunk(index, text, lps, finish, done):
            entries = list(lps)
            if index not in offsets:    # its first chunk carries the echoed prompt
                pre, pre_lps, offsets[index] = head(prompts[index // per], streams[index])
                text, entries = pre + text, pre_lps + entries
            lp = None
            if k is not None:
                lp = fmt.completion(entries, k, offsets[index])
                offsets[index] += sum(len(t) for t in lp["tokens"])
            c = R.completion_chunk(rid, ts, host.model_name, R.completion_choice(index, text, finish, lp))
            if done is not None:
                c["lemix"] = done.extra()
            return c
        return sse(streams, body, chunk, lambda dones: {
            **R.completion_chunk(rid, ts, host.model_name, None), "choices": [],
            "usage": R.usage(sum(len(p.ids) for p in prompts), sum(d.completion_tokens for d in dones))})
    choices = best(await collect(streams), per, n)
    out = []
    for i, c in enumerate(choices):
        prompt = prompts[c.stream.index // per]
        pre, entries, offset = head(prompt, c.stream)
        lp = fmt.completion(entries + c.stream.logprobs, k, offset) if k is not None else None
        out.append(R.completion_choice(i, pre + c.text, c.done.finish_reason, lp))
    return R.completion_body(rid, ts, host.model_name, out, total_usage(prompts, choices),
                             choices[0].done.extra())


async def chat(host, body: P.ChatRequest, ids: list[int], check_lengths):
    n = body.n or 1
    _choice_count(1, n)
    k = (body.top_logprobs or 0) if body.logprobs else None
    prompts = [Prompt(ids, "")]
    limits = [check_lengths(len(ids), body.max_completion_tokens or body.max_tokens,
                            host.cfg.workload.max_output_tokens)]
    streams = submit(host, body, prompts, limits, per_prompt=n, logprobs=k, prompt_logprobs=None)
    rid, ts, fmt = P.new_id("chatcmpl"), P.now_unix(), R.LogprobFormat(host.tok)
    if body.stream:
        def chunk(index, text, lps, finish, done):
            lp = fmt.chat(list(lps), k) if k is not None else None
            c = R.chat_chunk(rid, ts, host.model_name, index, {"content": text} if text else {}, finish, lp)
            if done is not None:
                c["lemix"] = done.extra()
            return c
        first = lambda index: R.chat_chunk(rid, ts, host.model_name, index,  # noqa: E731
                                           {"role": "assistant", "content": ""}, None)
        return sse(streams, body, chunk, lambda dones: {
            "id": rid, "object": "chat.completion.chunk", "created": ts, "model": host.model_name,
            "choices": [], "usage": R.usage(len(ids), sum(d.completion_tokens for d in dones))}, first=first)
    choices = await collect(streams)
    out = [R.chat_choice(i, c.text, c.done.finish_reason,
                         fmt.chat(c.stream.logprobs, k) if k is not None else None)
           for i, c in enumerate(choices)]
    return R.chat_body(rid, ts, host.model_name, out, total_usage(prompts, choices), choices[0].done.extra())
