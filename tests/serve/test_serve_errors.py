"""Bad input answers 400, a wrong key 401, a full queue 429 (with Retry-After), a bug 500 —
all with OpenAI's error body — and nothing takes the server down."""
from __future__ import annotations

import time

import httpx
import openai
import pytest

from serve_factory import MODEL, server_thread


@pytest.fixture(scope="module")
def live(tmp_path_factory):
    with server_thread(tmp_path_factory.mktemp("errors"), api_key="sekret", max_queued=1,
                       cfg_overrides={"workload.max_output_tokens": 400,
                                      "workload.max_prompt_tokens": 1800}) as (url, app):
        yield url, app


AUTH = {"Authorization": "Bearer sekret"}


def post(url: str, path: str, **kw) -> httpx.Response:
    headers = {**AUTH, **kw.pop("headers", {})}
    return httpx.post(f"{url}{path}", headers=headers, timeout=60, **kw)


def assert_error(r: httpx.Response, status: int, param: str | None = "any") -> dict:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    if param != "any":
        assert err["param"] == param
    return err


@pytest.mark.parametrize("body, param", [
    ({"model": MODEL, "prompt": ""}, "prompt"),
    ({"model": MODEL, "prompt": []}, "prompt"),
    ({"model": MODEL}, "prompt"),
    ({"model": MODEL, "prompt": "x", "max_tokens": "ten"}, "max_tokens"),
    ({"model": MODEL, "prompt": "x", "max_tokens": 0}, "max_tokens"),
    ({"model": MODEL, "prompt": "x", "max_tokens": 401}, "max_tokens"),
    ({"model": MODEL, "prompt": "x", "temperature": "hot"}, "temperature"),
    ({"model": MODEL, "prompt": "x", "stream": "yes"}, "stream"),
    ({"model": MODEL, "prompt": "x", "n": 0}, "n"),
    ({"model": MODEL, "prompt": 42}, "prompt"),
    ({"model": MODEL, "prompt": [1, 2, 99999]}, "prompt"),
    ({"model": MODEL, "prompt": "y" * 1700, "max_tokens": 400}, "max_tokens"),   # over the 2048 context
    ({"model": MODEL, "prompt": "y" * 1900}, "prompt"),                          # over max_prompt_tokens
])
def test_bad_completion_requests_are_400(live, body, param):
    err = assert_error(post(live[0], "/v1/completions", json=body), 400, param)
    assert err["type"] == "invalid_request_error"


def test_context_length_error_says_so(live):
    r = post(live[0], "/v1/completions", json={"model": MODEL, "prompt": "y" * 1700, "max_tokens": 400})
    assert assert_error(r, 400)["code"] == "context_length_exceeded"


@pytest.mark.parametrize("content", [b"{not json", b"", b"[1, 2"])
def test_malformed_json_is_400(live, content):
    r = post(live[0], "/v1/chat/completions", content=content, headers={"Content-Type": "application/json"})
    assert_error(r, 400)


@pytest.mark.parametrize("body", [
    {"model": MODEL, "messages": []},
    {"model": MODEL, "messages": [{"role": "wizard", "content": "hi"}]},
    {"model": MODEL, "messages": "hi"},
    {"model": MODEL, "messages": [{"role": "user", "content": 5}]},
])
def test_bad_chat_requests_are_400(live, body):
    assert_error(post(live[0], "/v1/chat/completions", json=body), 400)


@pytest.mark.parametrize("body", [{"text": ""}, {"prompt": "only a prompt"}, [], {"text": 3},
                                  {"text": "a", "prompt": "b", "completion": "c"}])
def test_bad_training_samples_are_400(live, body):
    assert_error(post(live[0], "/v1/train", json=body), 400)


def test_unknown_model_is_404(live):
    err = assert_error(post(live[0], "/v1/completions", json={"model": "gpt-9", "prompt": "x"}), 404, "model")
    assert err["code"] == "model_not_found"


def test_missing_or_wrong_key_is_401_and_health_stays_open(live):
    url = live[0]
    body = {"model": MODEL, "prompt": "x", "max_tokens": 1}
    assert_error(httpx.post(f"{url}/v1/completions", json=body, timeout=30), 401)
    assert_error(httpx.post(f"{url}/v1/completions", json=body, timeout=30,
                            headers={"Authorization": "Bearer wrong"}), 401)
    assert_error(httpx.get(f"{url}/v1/models", timeout=30), 401)
    assert httpx.get(f"{url}/health", timeout=30).status_code == 200
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{url}/v1", api_key="wrong", max_retries=0).models.list()
    ok = openai.OpenAI(base_url=f"{url}/v1", api_key="sekret", max_retries=0)
    assert ok.completions.create(model=MODEL, prompt="x", max_tokens=1).usage.prompt_tokens == 2


def test_queue_over_max_queued_is_429_with_retry_after(live):
    url = live[0]
    body = {"model": MODEL, "prompt": "long one", "max_tokens": 400, "temperature": 0, "stream": True}
    with httpx.stream("POST", f"{url}/v1/completions", json=body, headers=AUTH, timeout=120) as first:
        assert first.status_code == 200
        lines = first.iter_lines()
        next(lines)                              # the first request is in flight now
        r = post(url, "/v1/completions", json={"model": MODEL, "prompt": "x", "max_tokens": 1})
        err = assert_error(r, 429)
        assert err["type"] == "rate_limit_error" and int(r.headers["Retry-After"]) >= 1
        rest = list(lines)
    assert rest[-2:] == ["data: [DONE]", ""] or rest[-1] == "data: [DONE]"
    assert post(url, "/v1/completions", json={"model": MODEL, "prompt": "x", "max_tokens": 1}).status_code == 200


def test_a_client_that_goes_away_stops_its_sequence(live):
    url, app = live
    host = app.state.host
    body = {"model": MODEL, "prompt": "abandoned", "max_tokens": 400, "temperature": 0, "stream": True}
    tokens = lambda: host.metrics.registry.get_sample_value("lemix:generation_tokens_total") or 0  # noqa: E731
    before, t0 = tokens(), time.monotonic()
    with httpx.stream("POST", f"{url}/v1/completions", json=body, headers=AUTH, timeout=120) as r:
        next(r.iter_lines())
    while host.in_flight() != (0, 0):
        assert time.monotonic() - t0 < 30
        time.sleep(0.02)
    # 400 tokens take seconds; the disconnect stopped it at the next token
    assert 1 <= tokens() - before < 100
    assert post(url, "/v1/completions", json={"model": MODEL, "prompt": "x", "max_tokens": 1}).status_code == 200


def test_unexpected_exception_is_500_with_the_same_body_and_the_server_lives(live, monkeypatch):
    url, app = live
    host = app.state.host

    def broken():
        raise RuntimeError("boom")
    monkeypatch.setattr(host, "train_status", broken)
    err = assert_error(httpx.get(f"{url}/v1/train/status", headers=AUTH, timeout=30), 500)
    assert err["type"] == "server_error" and "boom" in err["message"]
    monkeypatch.undo()
    assert httpx.get(f"{url}/v1/train/status", headers=AUTH, timeout=30).status_code == 200
    assert httpx.get(f"{url}/health", timeout=30).status_code == 200
