"""The official openai client and raw httpx against a live server: completions, chat,
streaming (SSE framing), models, stop strings, the lemix extension field, metrics."""
from __future__ import annotations

import httpx
import openai
import pytest

from serve_factory import MODEL, server_thread, sse_events


@pytest.fixture(scope="module")
def live(tmp_path_factory):
    with server_thread(tmp_path_factory.mktemp("openai"), stages=2) as (url, app):
        yield url, app


@pytest.fixture
def client(live):
    return openai.OpenAI(base_url=f"{live[0]}/v1", api_key="unused", max_retries=0, timeout=60)


def test_models_lists_the_served_model(client):
    models = client.models.list()
    assert [m.id for m in models.data] == [MODEL]


def test_completion_reports_usage_finish_reason_and_lemix_fields(client):
    out = client.completions.create(model=MODEL, prompt="The quick brown fox", max_tokens=5,
                                    temperature=0)
    choice = out.choices[0]
    assert out.object == "text_completion" and choice.finish_reason in ("stop", "length")
    assert out.usage.prompt_tokens == len("The quick brown fox") + 1          # bytes + BOS
    assert 1 <= out.usage.completion_tokens <= 5
    assert out.usage.total_tokens == out.usage.prompt_tokens + out.usage.completion_tokens
    extra = out.model_extra["lemix"]
    assert extra["inference_loss"] > 0 and extra["weight_version"] == 0 and extra["ttft_s"] >= 0


def test_greedy_with_a_seed_is_reproducible_and_sampling_seed_matters(client):
    kw = dict(model=MODEL, prompt="Once upon a time", max_tokens=12)
    a = client.completions.create(temperature=0, **kw).choices[0].text
    b = client.completions.create(temperature=0, **kw).choices[0].text
    assert a == b
    s1 = client.completions.create(temperature=1.0, seed=7, **kw).choices[0].text
    s2 = client.completions.create(temperature=1.0, seed=7, **kw).choices[0].text
    assert s1 == s2


def test_length_finish_reason_at_max_tokens(client):
    out = client.completions.create(model=MODEL, prompt="abc", max_tokens=3, temperature=0, seed=1)
    # the random model rarely emits EOS; when it does not, 3 tokens end by length
    if out.usage.completion_tokens == 3 and out.choices[0].finish_reason == "length":
        return
    assert out.choices[0].finish_reason == "stop"


def test_stop_string_cuts_the_text_and_finishes_with_stop(client):
    kw = dict(model=MODEL, prompt="Hello", max_tokens=24, temperature=0)
    full = client.completions.create(**kw).choices[0].text
    candidates = [ch for ch in full[1:] if ch != "\ufffd"]
    if not candidates:
        pytest.skip("the random model produced no whole character to stop on")
    stop = candidates[0]
    cut = client.completions.create(stop=[stop], **kw)
    assert cut.choices[0].finish_reason == "stop"
    assert stop not in cut.choices[0].text
    assert full.startswith(cut.choices[0].text.rstrip("\ufffd"))


def test_chat_completion(client):
    out = client.chat.completions.create(model=MODEL, max_tokens=6, temperature=0, messages=[
        {"role": "system", "content": "be brief"}, {"role": "user", "content": "hello"}])
    assert out.object == "chat.completion"
    msg = out.choices[0].message
    assert msg.role == "assistant" and isinstance(msg.content, str)
    assert out.usage.completion_tokens <= 6


def test_streaming_completion_matches_non_streaming(client):
    kw = dict(model=MODEL, prompt="Streaming test", max_tokens=10, temperature=0)
    whole = client.completions.create(**kw).choices[0].text
    chunks = list(client.completions.create(stream=True, **kw))
    assert "".join(c.choices[0].text for c in chunks) == whole
    assert chunks[-1].choices[0].finish_reason in ("stop", "length")
    assert all(c.choices[0].finish_reason is None for c in chunks[:-1])


def test_streaming_chat_with_usage(client):
    stream = client.chat.completions.create(model=MODEL, max_tokens=8, temperature=0, stream=True,
                                            stream_options={"include_usage": True},
                                            messages=[{"role": "user", "content": "hi"}])
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-1].usage is not None and chunks[-1].choices == []
    assert chunks[-2].choices[0].finish_reason in ("stop", "length")
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert len(text) <= 8 * 4   # at most 8 byte tokens, each shown as at most one replacement char


def test_raw_sse_framing(live):
    url, _ = live
    body = {"model": MODEL, "prompt": "raw", "max_tokens": 4, "temperature": 0, "stream": True}
    with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=60) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        text = r.read().decode()
    assert text.endswith("data: [DONE]\n\n")
    events = sse_events(text)
    assert events[-1] == "[DONE]"
    objs = events[:-1]
    assert all(o["object"] == "text_completion" and o["id"] == objs[0]["id"] for o in objs)
    assert objs[-1]["choices"][0]["finish_reason"] in ("stop", "length")
    assert "lemix" in objs[-1]


def test_priority_field_is_accepted(live):
    url, _ = live
    r = httpx.post(f"{url}/v1/completions", json={"model": MODEL, "prompt": "p", "max_tokens": 2,
                                                   "priority": 5}, timeout=60)
    assert r.status_code == 200


def test_metrics_and_health(live):
    url, _ = live
    httpx.post(f"{url}/v1/completions", json={"model": MODEL, "prompt": "m", "max_tokens": 2}, timeout=60)
    assert httpx.get(f"{url}/health").json() == {"status": "ok"}
    text = httpx.get(f"{url}/metrics").text
    for name in ("lemix:num_requests_running", "lemix:num_requests_waiting",
                 "lemix:time_to_first_token_seconds_bucket", "lemix:time_per_output_token_seconds_bucket",
                 "lemix:e2e_request_latency_seconds_count", "lemix:prompt_tokens_total",
                 "lemix:generation_tokens_total", "lemix:train_samples_applied_total",
                 "lemix:train_step_seconds_bucket", "lemix:deprioritized_training_tasks_total",
                 "lemix:offload_events_total", 'lemix:idle_ratio{node="0",stage="1"}',
                 'lemix:weight_version{node="0"}', "lemix:slo_attainment"):
        assert name in text, name
