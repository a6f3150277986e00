"""Greedy generation through workers with a KV cache and continuous batching equals HF generate."""
import pytest
import torch

from engine_factories import pipeline_decode, pipeline_forward, make_workers
from lemix.engine.messages import Free, Memory, SamplingParams
from lemix.engine.model import build_builtin_tiny
from lemix.engine.tokenizer import ByteTokenizer

EOS = ByteTokenizer.eos_id


def _prompt(n, seed):
    return torch.randint(0, 256, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def _prefill(workers, batch_id, reqs, sampling=None):
    """Prefill requests (dicts with id, prompt) as one right-padded batch; returns first tokens."""
    lengths = [len(r["prompt"]) for r in reqs]
    ids = torch.full((len(reqs), max(lengths)), ByteTokenizer.pad_id)
    for b, r in enumerate(reqs):
        ids[b, :lengths[b]] = torch.tensor(r["prompt"])
    res = pipeline_forward(workers, batch_id, ids, lengths, keep_kv=True,
                           seq_ids=[r["id"] for r in reqs], sampling=sampling)
    return res.next_tokens


def _run_continuous(workers, requests, join_after, sampling=None):
    """Iteration-level batching: requests[:-1] prefill together; the last joins after
    `join_after` decode iterations; a request leaves when it hits max_tokens or EOS."""
    out = {r["id"]: [] for r in requests}
    params = {r["id"]: (sampling or SamplingParams()) for r in requests}

    def admit(reqs, batch_id):
        for r, tok in zip(reqs, _prefill(workers, batch_id, reqs, [params[r["id"]] for r in reqs])):
            out[r["id"]].append(tok)
        return list(reqs)

    running = admit(requests[:-1], 0)
    it = 0
    while running:
        done = [r for r in running if len(out[r["id"]]) >= r["max_tokens"] or out[r["id"]][-1] == EOS]
        for r in done:
            for w in workers:
                w.handle(Free(seq_ids=(r["id"],)))
        running = [r for r in running if r not in done]
        if it == join_after:
            running += admit(requests[-1:], 1)
        if not running:
            break
        ids = [r["id"] for r in running]
        toks = pipeline_decode(workers, it, ids, [out[i][-1] for i in ids], [params[i] for i in ids])
        for i, tok in zip(ids, toks):
            out[i].append(tok)
        it += 1
    return out


REQUESTS = [dict(id=10, prompt=_prompt(5, 1), max_tokens=9),
            dict(id=11, prompt=_prompt(11, 2), max_tokens=3),    # leaves early
            dict(id=12, prompt=_prompt(3, 3), max_tokens=7)]     # joins after two iterations


@pytest.mark.parametrize("num_stages", [1, 3])
def test_continuous_batching_greedy_matches_hf_generate(num_stages):
    model = build_builtin_tiny(seed=0)
    workers = make_workers(model, num_stages)
    got = _run_continuous(workers, REQUESTS, join_after=2)
    for r in REQUESTS:
        with torch.no_grad():
            ref = model.generate(torch.tensor([r["prompt"]]), max_new_tokens=r["max_tokens"],
                                 do_sample=False, pad_token_id=ByteTokenizer.pad_id)
        assert got[r["id"]] == ref[0, len(r["prompt"]):].tolist()
    assert all(w.handle(Memory()).kv_bytes == 0 for w in workers)


def test_sampling_is_reproducible_and_batch_independent():
    workers = make_workers(build_builtin_tiny(seed=0), 2)
    sampling = SamplingParams(temperature=1.5, top_p=0.9, seed=42)
    together = _run_continuous(workers, REQUESTS, join_after=1, sampling=sampling)
    # Request 10 alone, then the same request again under another id joining mid-way.
    alone = _run_continuous(workers, [REQUESTS[0], REQUESTS[0] | {"id": 99}],
                            join_after=0, sampling=sampling)
    assert together[10] == alone[10] == alone[99]
    greedy = _run_continuous(workers, REQUESTS, join_after=1)
    assert together[10] != greedy[10]
