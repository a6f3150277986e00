"""Every sampling and output parameter, through the official openai client, checked for its
effect against the model itself (the server's initial weights: nothing trains here)."""
from __future__ import annotations

import httpx
import openai
import pytest
import torch

from serve_factory import MODEL, server_thread
from lemix.serve.text import chat_prompt

TOL = 2e-4


@pytest.fixture(scope="module")
def live(tmp_path_factory):
    with server_thread(tmp_path_factory.mktemp("params"), stages=2, max_queued=64) as (url, app):
        yield url, app


@pytest.fixture(scope="module")
def client(live):
    return openai.OpenAI(base_url=f"{live[0]}/v1", api_key="unused", max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def ref(live):
    return Ref(live[1].state.host)


class Ref:
    """The served model run directly: log_softmax of its logits, greedy decoding by hand."""

    def __init__(self, host) -> None:
        self.model, self.tok = host._hf_model, host.tok

    @torch.no_grad()
    def logprobs(self, ids: list[int]) -> torch.Tensor:
        """[len(ids), V]: row i is log p(. | ids[:i+1])."""
        return torch.log_softmax(self.model(torch.tensor([ids])).logits[0].float(), -1)

    def greedy(self, ids: list[int], n: int, adjust=None) -> list[int]:
        """n greedy tokens; adjust(logits [V], prompt, out) -> logits changes the choice."""
        out: list[int] = []
        for _ in range(n):
            with torch.no_grad():
                logits = self.model(torch.tensor([ids + out])).logits[0, -1].float()
            if adjust is not None:
                logits = adjust(logits, ids, out)
            out.append(int(logits.argmax()))
        return out


PROMPT = "The quick brown fox"


def test_logprobs_of_greedy_tokens_equal_log_softmax_of_the_model(client, ref):
    ids = ref.tok.encode(PROMPT)
    want = ref.greedy(ids, 4)
    r = client.completions.create(model=MODEL, prompt=ids, max_tokens=4, temperature=0, logprobs=3)
    lp = r.choices[0].logprobs
    rows = ref.logprobs(ids + want)
    assert lp.tokens == [ref.tok.decode([t]) for t in want]
    for i, t in enumerate(want):
        row = rows[len(ids) - 1 + i]
        assert lp.token_logprobs[i] == pytest.approx(float(row[t]), abs=TOL)
        assert lp.token_logprobs[i] == pytest.approx(max(lp.top_logprobs[i].values()), abs=1e-6)
        top: dict[str, float] = {}
        for v, j in zip(*row.topk(3)):
            top.setdefault(ref.tok.decode([int(j)]), float(v))
        assert set(lp.top_logprobs[i]) == set(top)
        assert [lp.top_logprobs[i][s] for s in top] == pytest.approx(list(top.values()), abs=TOL)
    offsets = lp.text_offset
    assert offsets[0] == len(ref.tok.decode(ids))
    assert all(b - a == len(s) for a, b, s in zip(offsets, offsets[1:], lp.tokens))


def test_echo_returns_the_prompt_and_its_logprobs_and_max_tokens_0_scores_only(client, ref):
    ids = ref.tok.encode(PROMPT)
    r = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=0, echo=True, logprobs=1)
    c = r.choices[0]
    assert c.text == PROMPT and r.usage.completion_tokens == 0 and r.usage.prompt_tokens == len(ids)
    lp = c.logprobs
    assert len(lp.token_logprobs) == len(ids) and lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    rows = ref.logprobs(ids)
    want = [float(rows[i - 1, ids[i]]) for i in range(1, len(ids))]
    assert lp.token_logprobs[1:] == pytest.approx(want, abs=TOL)
    # with a completion: prompt entries, then the generated ones
    r = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=2, echo=True, logprobs=0, temperature=0)
    assert r.choices[0].text.startswith(PROMPT) and len(r.choices[0].logprobs.tokens) == len(ids) + 2


def test_logit_bias_minus_100_removes_a_token_and_plus_100_forces_one(client, ref):
    ids = ref.tok.encode(PROMPT)
    first = ref.greedy(ids, 1)[0]
    r = client.completions.create(model=MODEL, prompt=ids, max_tokens=1, temperature=0, logprobs=0,
                                  logit_bias={str(first): -100})
    row = ref.logprobs(ids)[-1].clone()
    row[first] = -float("inf")
    runner_up = float(row.max())      # what greedy picks once the first choice is gone
    assert r.choices[0].logprobs.token_logprobs[0] == pytest.approx(runner_up, abs=TOL)
    assert float(ref.logprobs(ids)[-1, first]) > runner_up
    forced = ref.tok.encode("z", add_bos=False)[0]
    r = client.completions.create(model=MODEL, prompt=ids, max_tokens=5, temperature=0,
                                  logit_bias={str(forced): 100})
    assert r.choices[0].text == "zzzzz"


def test_n_3_with_a_seed_gives_3_reproducible_choices_that_differ(client):
    kw = dict(model=MODEL, prompt=PROMPT, max_tokens=8, temperature=1.0, n=3, seed=11)
    a, b = client.completions.create(**kw), client.completions.create(**kw)
    texts = [c.text for c in a.choices]
    assert [c.index for c in a.choices] == [0, 1, 2] and len(set(texts)) == 3
    assert texts == [c.text for c in b.choices]
    single = client.completions.create(**{**kw, "n": 1})
    assert single.choices[0].text == texts[0]        # choice j samples with seed + j
    assert a.usage.completion_tokens == 24


def test_best_of_returns_the_choice_with_the_highest_cumulative_logprob(client):
    kw = dict(model=MODEL, prompt=PROMPT, max_tokens=6, temperature=1.0, seed=5)
    three = client.completions.create(**kw, n=3, logprobs=0)
    cum = [sum(c.logprobs.token_logprobs) for c in three.choices]
    best = client.completions.create(**kw, n=1, best_of=3)
    assert len(best.choices) == 1 and best.choices[0].text == three.choices[cum.index(max(cum))].text
    assert best.choices[0].logprobs is None   # ranked by logprob, returned only when asked


@pytest.mark.parametrize("kw", [{"top_k": 1}, {"min_p": 1.0}, {"top_p": 1e-9}])
def test_top_k_1_min_p_1_and_tiny_top_p_sample_the_greedy_tokens(client, ref, kw):
    ids = ref.tok.encode(PROMPT)
    r = client.completions.create(model=MODEL, prompt=ids, max_tokens=5, temperature=1.5, seed=3, extra_body=kw)
    assert r.choices[0].text == ref.tok.decode(ref.greedy(ids, 5))


def test_top_k_limits_the_draws_to_the_k_most_likely(client, ref):
    ids = ref.tok.encode(PROMPT)
    top2 = ref.logprobs(ids)[-1].topk(2).indices.tolist()
    for seed in range(6):
        r = client.completions.create(model=MODEL, prompt=ids, max_tokens=1, temperature=2.0,
                                      extra_body={"top_k": 2}, seed=seed, logprobs=0)
        got = r.choices[0].logprobs.token_logprobs[0]
        assert any(abs(got - float(ref.logprobs(ids)[-1, t])) < TOL for t in top2)


def _counts(out: list[int], v: int) -> torch.Tensor:
    return torch.bincount(torch.tensor(out, dtype=torch.long), minlength=v).float() if out else torch.zeros(v)


@pytest.mark.parametrize("field, value, adjust", [
    ("frequency_penalty", 2.0, lambda lg, p, o: lg - 2.0 * _counts(o, lg.numel())),
    ("presence_penalty", 2.0, lambda lg, p, o: lg - 2.0 * (_counts(o, lg.numel()) > 0).float()),
    ("repetition_penalty", 1.8, lambda lg, p, o: _repetition(lg, p + o, 1.8)),
])
def test_penalties_change_the_output_as_predicted(client, ref, field, value, adjust):
    ids = ref.tok.encode("aaaa")
    plain = ref.greedy(ids, 12)
    want = ref.greedy(ids, 12, adjust)
    assert want != plain    # the penalty matters on this prompt
    r = client.completions.create(model=MODEL, prompt=ids, max_tokens=12, temperature=0, logprobs=0,
                                  extra_body={field: value})
    assert r.choices[0].logprobs.tokens == [ref.tok.decode([t]) for t in want]


def _repetition(logits: torch.Tensor, seen: list[int], p: float) -> torch.Tensor:
    """vLLM/CTRL repetition penalty, by hand: seen tokens' positive logits / p, negative * p."""
    out = logits.clone()
    for t in set(seen):
        out[t] = out[t] / p if out[t] > 0 else out[t] * p
    return out


def test_stop_token_ids_end_the_text_before_the_token(client, ref):
    ids = ref.tok.encode(PROMPT)
    want = ref.greedy(ids, 8)
    i = 3
    while want[i] in want[:i]:
        i += 1
    r = client.completions.create(model=MODEL, prompt=ids, max_tokens=8, temperature=0,
                                  extra_body={"stop_token_ids": [want[i]]})
    c = r.choices[0]
    assert c.text == ref.tok.decode(want[:i]) and c.finish_reason == "stop"
    assert r.usage.completion_tokens == i + 1


def test_ignore_eos_generates_past_the_eos_token(client, ref):
    eos = {str(ref.tok.eos_id): 100}
    r = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=4, temperature=0, logit_bias=eos)
    assert (r.choices[0].text, r.choices[0].finish_reason, r.usage.completion_tokens) == ("", "stop", 1)
    r = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=4, temperature=0, logit_bias=eos,
                                  extra_body={"ignore_eos": True})
    assert (r.choices[0].finish_reason, r.usage.completion_tokens) == ("length", 4)


def test_prompt_lists_and_token_id_prompts_match_single_requests(client, ref):
    def one(p):
        return client.completions.create(model=MODEL, prompt=p, max_tokens=4, temperature=0).choices[0].text
    prompts = ["ab", "xyz q"]
    r = client.completions.create(model=MODEL, prompt=prompts, max_tokens=4, temperature=0)
    assert [c.text for c in r.choices] == [one(p) for p in prompts]
    ids = [ref.tok.encode(p) for p in prompts]
    r2 = client.completions.create(model=MODEL, prompt=ids, max_tokens=4, temperature=0)
    assert [c.text for c in r2.choices] == [c.text for c in r.choices]
    assert one(ids[0]) == one(prompts[0])
    assert r2.usage.prompt_tokens == sum(len(i) for i in ids)


def test_chat_logprobs_and_top_logprobs(client, ref):
    messages = [{"role": "user", "content": "hi there"}]
    ids = chat_prompt(ref.tok, messages)
    want = ref.greedy(ids, 3)
    r = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=3, temperature=0,
                                       logprobs=True, top_logprobs=2)
    content = r.choices[0].logprobs.content
    rows = ref.logprobs(ids + want)
    assert [c.token for c in content] == [ref.tok.decode([t]) for t in want]
    for i, (c, t) in enumerate(zip(content, want)):
        assert c.logprob == pytest.approx(float(rows[len(ids) - 1 + i, t]), abs=TOL)
        assert len(c.top_logprobs) == 2 and c.top_logprobs[0].logprob == pytest.approx(c.logprob, abs=1e-6)
        assert bytes(c.bytes).decode() == c.token
    r = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=3, n=2, seed=1)
    assert [c.index for c in r.choices] == [0, 1]


def test_streaming_several_choices_with_logprobs_matches_the_plain_response(client):
    kw = dict(model=MODEL, prompt=["ab", "cd"], max_tokens=5, temperature=1.0, seed=9, n=2, logprobs=1)
    plain = client.completions.create(**kw)
    texts, tokens = {}, {}
    for ch in client.completions.create(**kw, stream=True, stream_options={"include_usage": True}):
        for c in ch.choices:
            texts[c.index] = texts.get(c.index, "") + c.text
            tokens[c.index] = tokens.get(c.index, []) + (c.logprobs.tokens if c.logprobs else [])
        if ch.usage is not None:
            assert ch.usage.completion_tokens == plain.usage.completion_tokens
    assert [texts[i] for i in range(4)] == [c.text for c in plain.choices]
    assert [tokens[i] for i in range(4)] == [c.logprobs.tokens for c in plain.choices]


@pytest.mark.parametrize("path, extra, param", [
    ("/v1/completions", {"suffix": "tail"}, "suffix"),
    ("/v1/completions", {"user": "me"}, "user"),
    ("/v1/completions", {"stream_options": {"include_usage": True}}, "stream_options"),
    ("/v1/completions", {"best_of": 2, "n": 3}, "best_of"),
    ("/v1/completions", {"best_of": 3, "stream": True}, "best_of"),
    ("/v1/completions", {"logit_bias": {"99999": 1}}, "logit_bias"),
    ("/v1/completions", {"logit_bias": {"x": 1}}, "logit_bias"),
    ("/v1/completions", {"logprobs": 21}, "logprobs"),
    ("/v1/completions", {"n": 4, "prompt": ["a", "b", "c", "d", "e"]}, "n"),
    ("/v1/chat/completions", {"tools": [{"type": "function", "function": {"name": "f"}}]}, "tools"),
    ("/v1/chat/completions", {"tool_choice": "auto"}, "tool_choice"),
    ("/v1/chat/completions", {"functions": [{"name": "f"}]}, "functions"),
    ("/v1/chat/completions", {"function_call": "auto"}, "function_call"),
    ("/v1/chat/completions", {"parallel_tool_calls": True}, "parallel_tool_calls"),
    ("/v1/chat/completions", {"response_format": {"type": "json_object"}}, "response_format.type"),
    ("/v1/chat/completions", {"top_logprobs": 2}, "top_logprobs"),
    ("/v1/chat/completions", {"guided_json": {}}, "guided_json"),
])
def test_what_the_server_does_not_implement_is_400_naming_it(live, path, extra, param):
    body = {"model": MODEL, **({"prompt": "x"} if "chat" not in path else
                               {"messages": [{"role": "user", "content": "x"}]}), "max_tokens": 2, **extra}
    r = httpx.post(live[0] + path, json=body, timeout=60)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param and param.split(".")[0] in r.json()["error"]["message"]


def test_off_values_of_unimplemented_fields_are_accepted(client):
    r = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "x"}], max_tokens=2,
                                       response_format={"type": "text"}, tool_choice="none", tools=[])
    assert r.choices[0].finish_reason in ("stop", "length")
    r = client.completions.create(model=MODEL, prompt="x", max_tokens=2, suffix="")
    assert r.choices[0].finish_reason in ("stop", "length")


def test_tokenize_detokenize_version_and_model_retrieve(live, client, ref):
    url = live[0]
    t = httpx.post(f"{url}/tokenize", json={"model": MODEL, "prompt": PROMPT, "return_token_strs": True}).json()
    assert t["tokens"] == ref.tok.encode(PROMPT) and t["count"] == len(t["tokens"])
    assert t["max_model_len"] == 2048 and "".join(t["token_strs"]) == PROMPT
    bare = httpx.post(f"{url}/tokenize", json={"prompt": PROMPT, "add_special_tokens": False}).json()
    assert bare["tokens"] == t["tokens"][1:]
    messages = [{"role": "user", "content": "hi"}]
    chat = httpx.post(f"{url}/tokenize", json={"messages": messages}).json()
    assert chat["tokens"] == chat_prompt(ref.tok, messages)
    no_gen = httpx.post(f"{url}/tokenize", json={"messages": messages, "add_generation_prompt": False}).json()
    assert chat["tokens"][:no_gen["count"]] == no_gen["tokens"] and no_gen["count"] < chat["count"]
    assert httpx.post(f"{url}/detokenize", json={"tokens": t["tokens"]}).json() == {"prompt": PROMPT}
    assert httpx.post(f"{url}/detokenize", json={"tokens": [10**6]}).status_code == 400
    assert httpx.post(f"{url}/tokenize", json={"model": "other", "prompt": "x"}).status_code == 404
    from lemix import __version__
    assert httpx.get(f"{url}/version").json() == {"version": __version__}
    assert client.models.retrieve(MODEL).id == MODEL
    with pytest.raises(openai.NotFoundError) as err:
        client.models.retrieve("gpt-9")
    assert err.value.body["code"] == "model_not_found"


def test_chat_max_completion_tokens_text_parts_and_roles(client, ref):
    def ask(messages, **kw):
        return client.chat.completions.create(model=MODEL, messages=messages, temperature=0, **kw)
    r = ask([{"role": "user", "content": "hi"}], max_completion_tokens=2)
    assert (r.usage.completion_tokens, r.choices[0].finish_reason) == (2, "length")
    parts = [{"type": "text", "text": "hel"}, {"type": "text", "text": "lo"}]
    assert ask([{"role": "user", "content": parts}], max_tokens=4).choices[0].message.content == \
        ask([{"role": "user", "content": "hello"}], max_tokens=4).choices[0].message.content
    # the role is in the prompt: the byte template tags each message with it
    assert chat_prompt(ref.tok, [{"role": "system", "content": "x"}]) != chat_prompt(ref.tok, [{"role": "user", "content": "x"}])
    r = ask([{"role": "developer", "content": "be brief"}, {"role": "user", "content": "hi"}], max_tokens=1)
    assert r.usage.prompt_tokens == len(chat_prompt(ref.tok, [{"role": "developer", "content": "be brief"},
                                                              {"role": "user", "content": "hi"}]))
