"""Choosing the next token from last-position logits, and the log-probabilities asked for.

The order follows Hugging Face `generate` (whose processors we use where one exists):
processors on the model's logits (logit bias: `SequenceBiasLogitsProcessor`; repetition penalty:
`RepetitionPenaltyLogitsProcessor`, over prompt and output tokens as vLLM applies it; presence
and frequency penalties, OpenAI's definition over output tokens, by hand: transformers has no
such processor), then, unless greedy, the warpers `Temperature`, `TopK`, `TopP`, `MinP`.

Sampling is stateless: each draw uses a generator seeded from (seed, position of the token being
generated), so a request's tokens do not depend on batching, offloads or retries. Log-probabilities
are the model's own (log_softmax of the raw logits, vLLM's default `raw_logprobs`), whatever the
processors did.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from typing import NamedTuple

import torch
from transformers.generation.logits_process import (MinPLogitsWarper, RepetitionPenaltyLogitsProcessor,
                                                    SequenceBiasLogitsProcessor, TemperatureLogitsWarper,
                                                    TopKLogitsWarper, TopPLogitsWarper)

from lemix.engine.messages import History, SamplingParams, TokenLogprob

_GREEDY = SamplingParams()


class Draws(NamedTuple):
    tokens: tuple[int, ...]
    logprobs: tuple[TokenLogprob | None, ...] | None   # None when no sequence asked


def _draw_seed(seed: int, position: int) -> int:
    return (seed * 1_000_003 + position) % (2 ** 63)


def _process(logits: torch.Tensor, p: SamplingParams, history: History | None) -> torch.Tensor:
    """logits [V] -> scores [1,V] after logit bias and penalties."""
    scores = logits.float().reshape(1, -1).clone()                          # [1,V]
    if p.logit_bias:
        scores = SequenceBiasLogitsProcessor([[[t], float(b)] for t, b in p.logit_bias])(None, scores)
    if p.needs_history:
        if history is None:
            raise ValueError("penalties need the sequence's tokens so far (history)")
        prompt, output = history
        if p.repetition_penalty != 1.0 and (prompt or output):
            seen = torch.tensor([[*prompt, *output]], dtype=torch.long, device=scores.device)
            scores = RepetitionPenaltyLogitsProcessor(p.repetition_penalty)(seen, scores)
        if output and (p.presence_penalty or p.frequency_penalty):
            counts = torch.bincount(torch.tensor(output, device=scores.device),
                                    minlength=scores.shape[1])[: scores.shape[1]].float()   # [V]
            scores = scores - p.frequency_penalty * counts - p.presence_penalty * (counts > 0).float()
    return scores


def _warp(scores: torch.Tensor, p: SamplingParams) -> torch.Tensor:
    """[1,V] -> [1,V]: temperature, then top-k, top-p, min-p (filtered tokens get -inf)."""
    scores = TemperatureLogitsWarper(p.temperature)(None, scores)
    if p.top_k > 0:
        scores = TopKLogitsWarper(p.top_k)(None, scores)
    if p.top_p < 1.0:
        scores = TopPLogitsWarper(p.top_p)(None, scores)
    if p.min_p > 0.0:
        scores = MinPLogitsWarper(p.min_p)(None, scores)
    return scores


def _sample_one(logits: torch.Tensor, p: SamplingParams, position: int, history: History | None) -> int:
    """logits [V] -> one token id."""
    scores = _process(logits, p, history)
    if p.temperature <= 0:
        return int(scores.argmax())
    scaled = scores / p.temperature
    if not bool(torch.isfinite(scaled.max())):   # a temperature so close to 0 that it is greedy
        return int(scores.argmax())
    probs = torch.softmax(_warp(scores, p), dim=-1)[0].cpu()                 # [V]
    gen = torch.Generator().manual_seed(_draw_seed(p.seed, position))
    return int(torch.multinomial(probs, 1, generator=gen))


def token_logprobs(logits: torch.Tensor, tokens: torch.Tensor, k: int) -> list[TokenLogprob]:
    """logits [N,V], tokens [N] -> each token's model log-probability and the top k, on CPU."""
    lp = torch.log_softmax(logits.float(), dim=-1)                           # [N,V]
    chosen = lp.gather(1, tokens.reshape(-1, 1).to(lp.device))[:, 0].tolist()
    if k > 0:
        top_lp, top_id = lp.topk(min(k, lp.shape[1]), dim=-1)                # [N,k]
        tops = [tuple(zip(i, v)) for i, v in zip(top_id.tolist(), top_lp.tolist())]
    else:
        tops = [()] * len(chosen)
    return [TokenLogprob(int(t), float(c), top) for t, c, top in zip(tokens.tolist(), chosen, tops)]


def sample(logits: torch.Tensor, params: Sequence[SamplingParams] | None, positions: Sequence[int],
           history: Sequence[History | None] | None = None) -> Draws:
    """logits [B,V]; params per sequence (None = greedy); positions of the new tokens [B];
    history per sequence (needed by the penalties)."""
    params = params if params is not None else [_GREEDY] * logits.shape[0]
    if len(params) != logits.shape[0]:
        raise ValueError(f"{len(params)} sampling params for {logits.shape[0]} sequences")
    if all(p.plain_greedy for p in params):
        return Draws(tuple(int(t) for t in logits.argmax(-1).tolist()), None)
    hist = history if history is not None else [None] * len(params)
    tokens = tuple(int(logits[b].argmax()) if p.plain_greedy else _sample_one(logits[b], p, pos, h)
                   for b, (p, pos, h) in enumerate(zip(params, positions, hist)))
    lps: list[TokenLogprob | None] = [None] * len(params)
    asked = [b for b, p in enumerate(params) if p.logprobs is not None]
    if asked:
        idx = torch.tensor(asked, device=logits.device)
        k = max(params[b].logprobs or 0 for b in asked)
        got = token_logprobs(logits[idx], torch.tensor([tokens[b] for b in asked]), k)
        for b, g in zip(asked, got):
            lps[b] = replace(g, top=g.top[: params[b].logprobs])
    return Draws(tokens, tuple(lps) if asked else None)


def sample_tokens(logits: torch.Tensor, params: Sequence[SamplingParams] | None,
                  positions: Sequence[int]) -> tuple[int, ...]:
    """The tokens alone (no penalties' history): `sample(...).tokens`."""
    return sample(logits, params, positions).tokens
