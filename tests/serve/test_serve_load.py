"""A bounded concurrent load on loopback (200 requests from 16 clients, streaming and not,
with training samples arriving meanwhile) completes with no 5xx."""
from __future__ import annotations

import asyncio

import httpx

from serve_factory import MODEL, server_thread


async def _load(url: str, n: int, clients: int) -> list[int]:
    sem = asyncio.Semaphore(clients)
    codes: list[int] = []

    async def one(c: httpx.AsyncClient, i: int) -> None:
        async with sem:
            if i % 25 == 0:
                r = await c.post("/v1/train", json=[{"text": f"load sample {i} {'x' * (i % 50)}"}] * 3)
                codes.append(r.status_code)
            body = {"model": MODEL, "max_tokens": 1 + i % 6, "temperature": 0.7, "seed": i,
                    "stream": i % 3 == 0}
            if i % 2:
                path, body["messages"] = "/v1/chat/completions", [{"role": "user", "content": f"q{i}"}]
            else:
                path, body["prompt"] = "/v1/completions", f"request {i} " * (1 + i % 7)
            if body["stream"]:
                async with c.stream("POST", path, json=body) as r:
                    text = (await r.aread()).decode()
                    assert r.status_code != 200 or text.endswith("data: [DONE]\n\n")
            else:
                r = await c.post(path, json=body)
            codes.append(r.status_code)

    limits = httpx.Limits(max_connections=clients)
    async with httpx.AsyncClient(base_url=url, timeout=120, limits=limits) as c:
        await asyncio.gather(*(one(c, i) for i in range(n)))
    return codes


def test_200_requests_from_16_clients_no_5xx(tmp_path):
    with server_thread(tmp_path, train_batch_wait_s=0.2) as (url, app):
        codes = asyncio.run(_load(url, 200, 16))
        assert len(codes) == 200 + 8
        assert all(c < 500 for c in codes), sorted(set(codes))
        assert set(codes) == {200}
        assert httpx.get(f"{url}/health").status_code == 200
        metrics = httpx.get(f"{url}/metrics").text
        assert 'lemix:request_success_total{finished_reason=' in metrics
