"""Hostile input against a live server (issue 12): the key and the body limit are checked
before a body is read, every sampling value the schema allows is served, lone surrogates and
oversized samples are 400s, a batch that can never fit is 413, 405s say what is allowed,
/metrics needs the key, and finished requests leave no trace in memory (they go to CSV)."""
from __future__ import annotations

import csv
import socket
import time

import httpx
import pytest

from serve_factory import MODEL, server_thread

KEY = "hostile-key"
AUTH = {"Authorization": f"Bearer {KEY}"}


@pytest.fixture(scope="module")
def live(tmp_path_factory):
    root = tmp_path_factory.mktemp("hostile")
    with server_thread(root, api_key=KEY, max_body_bytes=64 * 1024, max_sample_chars=1000,
                       max_queued_samples=20, train_batch_wait_s=0.05) as (url, app):
        yield url, app, root / "state"


def raw_request(url: str, head: str, body: bytes = b"", timeout: float = 10.0) -> tuple[float, bytes]:
    """Send raw bytes; returns (seconds until the answer's first bytes, the answer)."""
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=timeout) as s:
        s.sendall(head.encode() + body)
        t0 = time.monotonic()
        first = s.recv(65536)
        dt = time.monotonic() - t0
        rest = b""
        try:
            while chunk := s.recv(65536):
                rest += chunk
        except OSError:
            pass
    return dt, first + rest


def test_no_key_is_401_before_the_body_is_read(live):
    url = live[0]
    # announces 200 MB and sends none of it: the answer cannot have waited for the body
    dt, answer = raw_request(url, "POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                                  "Content-Length: 200000000\r\n\r\n")
    assert answer.startswith(b"HTTP/1.1 401") and b'"invalid_api_key"' in answer and dt < 5


def test_a_body_over_the_limit_is_413_unread_with_an_openai_error(live):
    url = live[0]
    dt, answer = raw_request(url, f"POST /v1/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {KEY}\r\n"
                                  "Content-Type: application/json\r\nContent-Length: 200000000\r\n\r\n")
    assert answer.startswith(b"HTTP/1.1 413") and b'"request_too_large"' in answer and dt < 5
    # chunked (no Content-Length): cut while reading
    chunk = b"x" * 8192
    body = b"".join(b"%x\r\n%s\r\n" % (len(chunk), chunk) for _ in range(16)) + b"0\r\n\r\n"
    _, answer = raw_request(url, f"POST /v1/train HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {KEY}\r\n"
                                 "Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n", body)
    assert answer.startswith(b"HTTP/1.1 413")
    r = httpx.post(f"{url}/v1/train", headers=AUTH, json={"text": "y" * 70_000}, timeout=30)
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"
    assert httpx.get(f"{url}/health", timeout=10).status_code == 200


@pytest.mark.parametrize("field, value", [("top_p", 5e-324), ("temperature", 1e-46), ("temperature", 5e-324),
                                          ("top_p", 1e-300)])
def test_tiny_sampling_values_are_served(live, field, value):
    r = httpx.post(f"{live[0]}/v1/completions", headers=AUTH, timeout=60,
                   json={"model": MODEL, "prompt": "tiny", "max_tokens": 3, "seed": 1, field: value})
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["completion_tokens"] >= 1


@pytest.mark.parametrize("path, body, param", [
    ("/v1/completions", '{"model": "builtin-tiny", "prompt": "a\\ud800b"}', "prompt"),
    ("/v1/chat/completions", '{"model": "builtin-tiny", "messages": [{"role": "user", "content": "a\\udc00"}]}',
     "messages.0.content"),
    ("/v1/train", '{"text": "x\\ud800"}', "samples.0.text"),
    ("/v1/completions", '{"model": "builtin-tiny", "prompt": "ok", "stop": ["\\ud800"]}', "stop.0"),
])
def test_lone_surrogates_are_400_naming_the_field(live, path, body, param):
    r = httpx.post(f"{live[0]}{path}", headers={**AUTH, "Content-Type": "application/json"}, content=body,
                   timeout=30)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == param and "surrogate" in err["message"]


def test_a_training_sample_over_the_char_limit_is_400_and_not_stored(live):
    url, app, _ = live
    before = app.state.host.journal.counts()
    r = httpx.post(f"{url}/v1/train", headers=AUTH, timeout=30, json=[{"text": "ok"}, {"text": "z" * 1001}])
    assert r.status_code == 400 and r.json()["error"]["param"] == "samples.1"
    assert "--max-sample-chars" in r.json()["error"]["message"]
    assert app.state.host.journal.counts() == before


def test_a_batch_that_can_never_fit_is_413_not_429(live):
    r = httpx.post(f"{live[0]}/v1/train", headers=AUTH, timeout=30, json=[{"text": f"s{i}"} for i in range(21)])
    assert r.status_code == 413 and "Retry-After" not in r.headers
    assert r.json()["error"]["code"] == "too_many_samples"


def test_405_says_what_is_allowed(live):
    r = httpx.delete(f"{live[0]}/v1/completions", headers=AUTH, timeout=30)
    assert r.status_code == 405 and r.headers["Allow"] == "POST" and "error" in r.json()


def test_metrics_need_the_key(live):
    url = live[0]
    assert httpx.get(f"{url}/metrics", timeout=30).status_code == 401
    r = httpx.get(f"{url}/metrics", headers=AUTH, timeout=30)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    assert httpx.get(f"{url}/v1/nowhere", timeout=30).status_code == 401     # unknown paths too
    assert httpx.get(f"{url}/v1/nowhere", headers=AUTH, timeout=30).status_code == 404


def test_openapi_states_the_real_statuses_security_and_media_types(live):
    doc = httpx.get(f"{live[0]}/openapi.json", timeout=30).json()
    assert doc["components"]["securitySchemes"]["bearer"] == {**doc["components"]["securitySchemes"]["bearer"],
                                                             "type": "http", "scheme": "bearer"}
    for path, item in doc["paths"].items():
        for op in item.values():
            assert "422" not in op["responses"], path
    comp = doc["paths"]["/v1/completions"]["post"]
    assert {"400", "401", "413", "429", "503"} <= set(comp["responses"]) and comp["security"] == [{"bearer": []}]
    assert "text/event-stream" in comp["responses"]["200"]["content"]
    assert list(doc["paths"]["/metrics"]["get"]["responses"]["200"]["content"]) == ["text/plain"]
    assert "507" in doc["paths"]["/v1/train"]["post"]["responses"]


def test_finished_requests_leave_memory_and_go_to_csv(live):
    url, app, state = live
    host = app.state.host
    with httpx.Client(base_url=url, headers=AUTH, timeout=60) as c:
        for i in range(30):
            assert c.post("/v1/completions", json={"model": MODEL, "prompt": f"r{i}", "max_tokens": 2}).status_code == 200
        assert c.post("/v1/train", json=[{"text": f"mem {i}"} for i in range(8)]).status_code == 200
        deadline = time.monotonic() + 60
        while c.get("/v1/train/status").json()["queued"]:
            assert time.monotonic() < deadline
            time.sleep(0.1)
    time.sleep(0.3)
    res, sched, engine = host.engine.sched.result, host.engine.sched, host.engine
    assert res.requests == [] and res.train_tasks == [] and res.train_steps == []
    assert len(sched.ledger.tasks) <= 2 and len(engine._tasks) <= 2 and len(engine.inference_loss) <= 2
    host.records.flush()
    with open(state / "requests.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) >= 30 and {"task_id", "ttft_s", "e2e_s"} - set(rows[0]) <= {"ttft_s", "e2e_s"}
    assert all(r["failed"] == "False" for r in rows)
    with open(state / "train_tasks.csv") as fh:
        assert sum(int(r["samples"]) for r in csv.DictReader(fh)) >= 8
