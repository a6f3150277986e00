"""The serve package's parts without a server: detokenizer and stop strings, the micro-batch
feed, the journal's exactly-once bookkeeping, request parsing, idle ratios."""
from __future__ import annotations

import threading

import pytest

from lemix.engine.tokenizer import ByteTokenizer
from lemix.serve.feed import FeedSample, TrainFeed
from lemix.serve.journal import Journal
from lemix.serve.metrics import idle_ratios
from lemix.serve.protocol import CompletionRequest, TrainRequest
from lemix.serve.text import Detokenizer, chat_prompt, sample_tokens
from lemix.types import OpKind, OpRecord

TOK = ByteTokenizer()


def feed_text(detok: Detokenizer, text: str) -> str:
    out = []
    for b in text.encode():
        out.append(detok.push(b))
        if detok.stopped:
            break
    return "".join(out)


def test_stop_string_is_cut_and_never_streamed():
    d = Detokenizer(TOK, ["END", "\n\n"])
    streamed = feed_text(d, "hello ENDING")
    assert d.stopped and streamed == "hello " and d.flush() == ""


def test_a_partial_stop_prefix_is_held_back_then_released():
    d = Detokenizer(TOK, ["STOP"])
    assert feed_text(d, "a ST") == "a "
    assert d.push(ord("x")) == "STx"
    assert not d.stopped


def test_partial_utf8_waits_for_the_whole_character():
    d = Detokenizer(TOK, [])
    euro = "€".encode()
    assert d.push(euro[0]) == "" and d.push(euro[1]) == ""
    assert d.push(euro[2]) == "€"


def test_flush_releases_held_text_at_the_end():
    d = Detokenizer(TOK, ["abc"])
    assert feed_text(d, "xab") == "x"
    assert d.flush() == "ab"


def test_sample_tokens_and_chat_prompt():
    ids = sample_tokens(TOK, {"prompt": "Q:", "completion": " A"}, 100)
    assert ids == [TOK.bos_id, *b"Q: A", TOK.eos_id]
    assert len(sample_tokens(TOK, {"text": "x" * 50}, 10)) == 10
    prompt = TOK.decode(chat_prompt(TOK, [{"role": "user", "content": "hi"}]))
    assert prompt.endswith("<|user|>\nhi\n<|assistant|>\n")


class FakeClock:
    def __init__(self):
        self.t = 0.0

    def now(self):
        return self.t


def test_feed_fills_micro_batches_and_waits_at_most_wait_s():
    clock, sent = FakeClock(), []
    feed = TrainFeed(lambda s: sent.append(s) or len(sent), batch_size=3, wait_s=1.0, now=clock.now)
    feed.add([FeedSample(i, (1, 2)) for i in range(4)])
    assert [s.sample_id for s in feed._next_batch()] == [0, 1, 2]
    assert feed._next_batch() is None            # one sample, not yet waited wait_s
    clock.t = 1.0
    assert [s.sample_id for s in feed._next_batch()] == [3]


def test_feed_thread_submits_and_tracks_tasks_until_applied():
    clock, sent, done = FakeClock(), [], threading.Event()

    def submit(samples):
        sent.append(samples)
        done.set()
        return 100 + len(sent)
    feed = TrainFeed(submit, batch_size=2, wait_s=0.0, now=clock.now)
    feed.start()
    feed.add([FeedSample(1, (5,)), FeedSample(2, (6,))])
    assert done.wait(5)
    feed.stop()
    assert feed.queued == 2 and feed.in_engine == 1
    assert feed.requeue(101) == 2 and feed.in_engine == 0 and feed.queued == 2
    feed._tasks[7] = [FeedSample(1, (5,))]
    assert feed.applied((7, 99)) == [1]


def test_journal_rolls_back_applications_no_checkpoint_holds(tmp_path):
    j = Journal(tmp_path / "j.sqlite")
    rows = j.add([({"text": "a"}, 2), ({"text": "b"}, 2), ({"text": "c"}, 2)], version=0)
    ids = [r.sample_id for r in rows]
    j.mark_applied(ids[:1], node=0, version=1)
    j.add_checkpoint(0, 1, "ckpt-1")
    j.mark_applied(ids[1:], node=0, version=2)
    with pytest.raises(RuntimeError, match="applied twice"):
        j.mark_applied(ids[1:2], node=0, version=3)
    assert j.counts() == {"queued": 0, "applied": 3}
    assert j.roll_back(0, after_version=j.latest_checkpoints()[0][0]) == 2
    assert [q.sample_id for q in j.queued()] == ids[1:]
    j.mark_applied(ids[1:], node=0, version=2)
    assert j.audit() == {"samples": 3, "applied": 3, "not_exactly_once": 0}
    j.close()


def test_train_request_accepts_one_a_list_or_samples():
    assert len(TrainRequest.model_validate({"text": "a"}).samples) == 1
    assert len(TrainRequest.model_validate([{"text": "a"}, {"prompt": "p", "completion": "c"}]).samples) == 2
    assert len(TrainRequest.model_validate({"samples": [{"text": "a"}]}).samples) == 1


def test_completion_request_is_strict():
    with pytest.raises(ValueError):
        CompletionRequest.model_validate({"model": "m", "prompt": "x", "max_tokens": "5"})
    req = CompletionRequest.model_validate({"model": "m", "prompt": "x", "stop": "END", "temperature": 0})
    assert req.stops == ["END"] and req.temperature == 0.0


def test_idle_ratio_counts_overlap_with_the_window():
    ops = [OpRecord(0, 0, OpKind.FWD, 0.0, 5.0, 0, (1,), False),
           OpRecord(0, 1, OpKind.FWD, 5.0, 10.0, 0, (1,), False)]
    r = idle_ratios(ops, nodes=1, stages=2, now=10.0, window_s=10.0)
    assert r == {(0, 0): 0.5, (0, 1): 0.5}


def test_hf_tokenizer_chat_template_and_incremental_decoding():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from lemix.engine.tokenizer import HFTokenizer
    words = ["<unk>", "<s>", "</s>", "hello", "world", "again", "END"]
    core = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    hf = PreTrainedTokenizerFast(tokenizer_object=core, unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    hf.chat_template = "{% for m in messages %}{{ m['content'] }} {% endfor %}"
    tok = HFTokenizer(hf)
    assert chat_prompt(tok, [{"role": "user", "content": "hello world"}]) == [3, 4]
    d = Detokenizer(tok, ["END"])
    out = [d.push(t) for t in (3, 4, 5, 6)]
    assert d.push(3) == ""   # nothing after a stop
    assert "".join(out) + d.flush() == "hello world again "
    assert d.stopped
