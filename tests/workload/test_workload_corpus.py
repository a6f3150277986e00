import json

import numpy as np
import pytest

from lemix.workload import (
    DatasetError,
    DatasetSource,
    Sample,
    TextSource,
    Topic,
    TopicDrift,
    builtin_corpus,
    load_jsonl,
    shift_times_s,
)


def rng(seed: int = 0) -> np.random.Generator:
    return np.random.default_rng(seed)


@pytest.fixture(scope="module")
def corpus():
    return builtin_corpus()


@pytest.fixture(scope="module")
def drift(corpus):
    return TopicDrift(corpus, 4, duration_s=100.0, rng=rng(0))


def test_builtin_corpus(corpus):
    assert len(corpus) >= 70
    assert all(isinstance(t, Topic) and t.text for t in corpus)
    assert sum(len(t.text) for t in corpus) > 300_000
    names = [t.name for t in corpus]
    assert names == sorted(names) and len(set(names)) == len(names)
    assert len(builtin_corpus(dedupe=False)) == 79


def test_dedupe_keeps_each_paragraph_once(corpus):
    seen = set()
    for t in corpus:
        for para in t.text.split("\n\n"):
            assert para.strip() not in seen
            seen.add(para.strip())


def test_groups_partition_topics(corpus, drift):
    names = [n for g in drift.group_topics for n in g]
    assert sorted(names) == sorted(t.name for t in corpus)
    sizes = [len(drift.train_text(g)) for g in range(4)]
    assert max(sizes) < 1.5 * min(sizes)        # balanced by characters


def test_drift_moves_groups_over_time(drift):
    assert [drift.group_at(t) for t in (0.0, 24.9, 25.0, 49.9, 50.0, 75.0, 99.9)] == [0, 0, 1, 1, 2, 3, 3]
    assert drift.group_at(-5.0) == 0 and drift.group_at(1e9) == 3
    for t, g in ((10.0, 0), (60.0, 2)):
        text = drift.train_text(g)
        for s in range(20):
            window = drift.sample_text(t, 300, rng(s))
            assert len(window) == 300 and window in text + text   # from the current group


def test_sample_text_deterministic_and_wraps(drift):
    assert drift.sample_text(30.0, 500, rng(5)) == drift.sample_text(30.0, 500, rng(5))
    n = len(drift.train_text(1)) + 10
    assert len(drift.sample_text(30.0, n, rng(5))) == n


def test_heldout_is_disjoint_from_training_text(drift):
    all_train = "\n".join(drift.train_text(g) for g in range(4))
    for g in range(4):
        held = drift.heldout_text(g)
        assert len(held) > 5000
        assert drift.heldout_text(g, 1000) == held[:1000]
        for i in range(0, len(held) - 100, 50):
            assert held[i:i + 100] not in all_train


def test_sampled_windows_never_contain_heldout_text(drift):
    held = [drift.heldout_text(g) for g in range(4)]
    probes = [h[i:i + 80] for h in held for i in range(0, len(h) - 80, 400)]
    for s in range(200):
        window = drift.sample_text(s / 2.0, 2000, rng(s))
        assert not any(p in window for p in probes)


def test_topic_drift_invalid(corpus, drift):
    with pytest.raises(ValueError, match="groups"):
        TopicDrift(corpus, 0, duration_s=10.0, rng=rng())
    with pytest.raises(ValueError, match="at least 5 topics"):
        TopicDrift(corpus[:4], 5, duration_s=10.0, rng=rng())
    with pytest.raises(ValueError, match="duration_s"):
        TopicDrift(corpus, 4, duration_s=0.0, rng=rng())
    with pytest.raises(ValueError, match="group must be"):
        drift.heldout_text(4)
    with pytest.raises(ValueError, match="only"):
        drift.heldout_text(0, 10**7)
    with pytest.raises(ValueError, match="n_chars"):
        drift.sample_text(0.0, 0, rng())


# ------------------------------------------------------------------ JSONL

def write_lines(tmp_path, lines, name="d.jsonl"):
    p = tmp_path / name
    p.write_text("\n".join(lines) + "\n")
    return p


def test_load_jsonl(tmp_path):
    p = write_lines(tmp_path, [
        json.dumps({"text": "hello world", "id": 1}),
        "",
        json.dumps({"prompt": "Q: 2+2?\nA:", "completion": " 4"}),
    ])
    samples = load_jsonl(p)
    assert samples == [Sample("hello world"), Sample("Q: 2+2?\nA: 4", prompt="Q: 2+2?\nA:")]
    assert samples[1].completion == " 4" and samples[0].completion == "hello world"


@pytest.mark.parametrize(
    "bad, match",
    [
        ('{"text": "unterminated', "malformed JSON"),
        ('["text", "x"]', "expected a JSON object"),
        ('{"body": "x"}', "expected key 'text' or keys 'prompt' and 'completion'"),
        ('{"prompt": "x"}', "expected key 'text'"),
        ('{"text": "   "}', "empty text"),
        ('{"text": 5}', "'text' must be a string"),
        ('{"prompt": "q", "completion": ""}', "empty completion"),
        ('{"prompt": 1, "completion": "a"}', "'prompt' must be a string"),
        ('{"text": "a", "prompt": "b", "completion": "c"}', "not both"),
    ],
)
def test_jsonl_errors_name_the_line(tmp_path, bad, match):
    p = write_lines(tmp_path, [json.dumps({"text": "ok"}), "", bad, json.dumps({"text": "ok"})])
    with pytest.raises(DatasetError, match=match) as info:
        load_jsonl(p)
    assert info.value.line == 3
    assert str(info.value).startswith(f"{p}:3: ")


def test_jsonl_empty_and_missing(tmp_path):
    with pytest.raises(DatasetError, match="empty dataset"):
        load_jsonl(write_lines(tmp_path, ["", "  "]))
    with pytest.raises(DatasetError, match="cannot read"):
        load_jsonl(tmp_path / "absent.jsonl")


def test_dataset_source_cycles():
    src = DatasetSource([Sample("aaaa"), Sample("bbbbbbbb"), Sample("cc")])
    assert isinstance(src, TextSource) and isinstance(TopicDrift(builtin_corpus(), 2, duration_s=1.0, rng=rng()), TextSource)
    got = [src.sample_text(0.0, 5, rng()) for _ in range(4)]
    assert got == ["aaaa", "bbbbb", "cc", "aaaa"]
    with pytest.raises(ValueError):
        DatasetSource([])


# ------------------------------------------------------------------ drift: shift times, dataset segments

def test_topic_drift_shift_times():
    drift = TopicDrift(builtin_corpus(), 4, duration_s=20.0, rng=rng())
    assert drift.shift_times_s == (5.0, 10.0, 15.0)
    assert [drift.group_at(t - 1e-9) for t in drift.shift_times_s] == [0, 1, 2]
    assert [drift.group_at(t) for t in drift.shift_times_s] == [1, 2, 3]
    assert shift_times_s(drift) == (5.0, 10.0, 15.0) and shift_times_s(object()) == ()


def test_dataset_segments_drift_over_the_run(tmp_path):
    p = write_lines(tmp_path, [json.dumps({"text": t, "segment": s})
                               for t, s in [("a1", "A"), ("b1", 7), ("a2", "A"), ("b2", 7), ("c1", "C")]])
    samples = load_jsonl(p)
    assert [s.segment for s in samples] == ["A", "7", "A", "7", "C"]
    src = DatasetSource(samples, duration_s=30.0)
    assert src.segment_labels == ("A", "7", "C") and src.shift_times_s == (10.0, 20.0)
    assert [src.sample_text(t, 5, rng()) for t in (0.0, 9.9, 0.5, 10.0, 19.0, 12.0, 25.0, 99.0)] == \
           ["a1", "a2", "a1", "b1", "b2", "b1", "c1", "c1"]
    with pytest.raises(ValueError, match="duration_s"):
        DatasetSource(samples)
    assert DatasetSource([Sample("x")]).shift_times_s == ()


def test_dataset_segments_on_every_record_or_none(tmp_path):
    p = write_lines(tmp_path, [json.dumps({"text": "a", "segment": "A"}), json.dumps({"text": "b"})])
    with pytest.raises(DatasetError, match="'segment' is given on some records") as info:
        load_jsonl(p)
    assert info.value.line == 2
    with pytest.raises(DatasetError, match="'segment' must be a string or an integer"):
        load_jsonl(write_lines(tmp_path, [json.dumps({"text": "a", "segment": [1]})], "e.jsonl"))
