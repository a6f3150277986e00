"""SLOs: the end-to-end SLO from the one latency formula, and the TTFT limit (--slo-ttft).

Factory profile: forward 1 ms per token per stage, decode 1 ms per iteration per stage.
"""
from __future__ import annotations

import pytest
from sched_factory import MS, infer, make_params, make_scheduler, simulate, train

from lemix.sched.order import FirstReady, InferenceFirst
from lemix.sched.policies import make_policy
from lemix.sched.weights import LocalWeights, MergeEvery, SyncServersEvery
from lemix.types import RequestRecord


def test_slo_is_scale_times_unloaded_latency_by_hand():
    sched, _ = make_scheduler(make_params(generate=True, slo_scale=5.0))
    # prefill 10 tokens on 2 stages: 20 ms; 2 more tokens: 2 x (1 ms x 2 stages)
    assert sched.view.slo_s(infer(0, 0.0, 10, out=3)) == pytest.approx(5 * 24 * MS)
    assert sched.view.slo_s(infer(1, 0.0, 10, out=1)) == pytest.approx(5 * 20 * MS)
    # training: 3 x its forward pass (forward + backward of the factory's 2x cost)
    assert sched.view.slo_s(train(2, 0.0, 10)) == pytest.approx(5 * 60 * MS)


def test_ttft_limit_decides_slo_met_in_generate_mode():
    tasks = [infer(i, 0.0, 10, out=3) for i in range(3)]
    loose = simulate(make_params(policy="naivemix", nodes=1, generate=True, slo_scale=100.0), tasks)
    ttfts = sorted(r.ttft_s for r in loose.requests)
    assert all(r.slo_met and r.ttft_slo_s is None for r in loose.requests)
    assert ttfts[0] < ttfts[1] < ttfts[2]
    limit = (ttfts[0] + ttfts[1]) / 2
    tight = simulate(make_params(policy="naivemix", nodes=1, generate=True, slo_scale=100.0,
                                 slo_ttft_s=limit), tasks)
    assert [r.ttft_s for r in sorted(tight.requests, key=lambda r: r.ttft_s)] == pytest.approx(ttfts)
    assert sorted((r.ttft_s, r.slo_met) for r in tight.requests) == [
        (pytest.approx(ttfts[0]), True), (pytest.approx(ttfts[1]), False), (pytest.approx(ttfts[2]), False)]
    assert {r.ttft_slo_s for r in tight.requests} == {limit}


def test_ttft_limit_does_not_apply_in_prefill_mode():
    tasks = [infer(i, 0.0, 10) for i in range(3)]
    result = simulate(make_params(policy="naivemix", nodes=1, slo_scale=100.0, slo_ttft_s=1e-6), tasks)
    assert all(r.slo_met and r.ttft_slo_s is None for r in result.requests)


@pytest.mark.parametrize("ttft, limit, met", [(0.5, None, True), (0.5, 0.5, True), (0.5, 0.4, False),
                                              (None, 0.4, False)])
def test_request_record_slo_met_with_a_ttft_limit(ttft, limit, met):
    rec = RequestRecord(0, 0.0, 0, 10, 3, ttft, 1.0, 2.0, False, ttft_slo_s=limit)
    assert rec.slo_met is met


def test_policies_name_their_mechanisms():
    p = make_params(average_every=3)
    assert isinstance(make_policy("lemix", p).dispatch_order(), InferenceFirst)
    assert isinstance(make_policy("lemix/no-prioritization", p).dispatch_order(), FirstReady)
    assert isinstance(make_policy("luf", p).dispatch_order(), FirstReady)
    assert isinstance(make_policy("lemix", p).weight_regime(), MergeEvery)
    assert isinstance(make_policy("lemix", make_params()).weight_regime(), LocalWeights)
    assert isinstance(make_policy("separate", p).weight_regime(), SyncServersEvery)
