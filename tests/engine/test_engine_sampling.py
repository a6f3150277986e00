"""lemix.engine.sampling on hand-made logits: processors, warpers, seeds and logprobs."""
from __future__ import annotations

import pytest
import torch

from lemix.engine.messages import SamplingParams
from lemix.engine.sampling import sample


def logits() -> torch.Tensor:
    return torch.tensor([[2.0, 1.0, 0.5, -1.0, 3.0], [0.0, 0.1, 0.2, 0.3, 0.4]])    # [B=2, V=5]


def test_greedy_argmax_and_logprobs_are_the_raw_log_softmax():
    lg = logits()
    d = sample(lg, [SamplingParams(logprobs=2), SamplingParams()], [3, 3])
    assert d.tokens == (4, 4) and d.logprobs[1] is None
    lp = torch.log_softmax(lg[0], -1)
    assert d.logprobs[0].logprob == pytest.approx(float(lp[4]))
    assert [t for t, _ in d.logprobs[0].top] == [4, 0]
    # a bias changes the choice, not the reported (model) logprob of the chosen token
    d = sample(lg, [SamplingParams(logit_bias=((4, -100.0),), logprobs=0)] * 2, [3, 3])
    assert d.tokens == (0, 3) and d.logprobs[0].logprob == pytest.approx(float(lp[0]))


def test_penalties_need_history_and_apply_to_what_it_holds():
    lg = logits()[:1]
    with pytest.raises(ValueError, match="history"):
        sample(lg, [SamplingParams(frequency_penalty=1.0)], [3])
    # token 4 generated twice: 3 - 2*1.5 = 0 < 2 -> token 0
    assert sample(lg, [SamplingParams(frequency_penalty=1.5)], [3], [((), (4, 4))]).tokens == (0,)
    # presence counts once: 3 - 1.5 = 1.5 < 2 -> token 0
    assert sample(lg, [SamplingParams(presence_penalty=1.5)], [3], [((), (4, 4))]).tokens == (0,)
    # repetition over the prompt too: 3 / 2 = 1.5 < 2
    assert sample(lg, [SamplingParams(repetition_penalty=2.0)], [3], [((4,), ())]).tokens == (0,)


def test_seeded_draws_repeat_and_top_k_min_p_bound_them():
    lg = logits()[:1]
    p = SamplingParams(temperature=1.5, seed=7)
    draws = [sample(lg, [p], [pos]).tokens[0] for pos in range(40)]
    assert draws == [sample(lg, [p], [pos]).tokens[0] for pos in range(40)] and len(set(draws)) > 2
    k2 = SamplingParams(temperature=2.0, seed=1, top_k=2)
    assert {sample(lg, [k2], [pos]).tokens[0] for pos in range(40)} <= {4, 0}
    assert {sample(lg, [SamplingParams(temperature=2.0, seed=1, min_p=1.0)], [pos]).tokens[0]
            for pos in range(20)} == {4}
