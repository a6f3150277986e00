"""Split stages compute the same logits as the unsplit HF model."""
import pytest
import torch

from engine_factories import padded_batch, pipeline_forward, make_workers, tiny_hf
from lemix.engine.model import build_builtin_tiny, load_model, split_stages
from lemix.engine.stage import layer_ranges

LENGTHS = [9, 4, 1, 7]


def _stage_chain(stages, ids, lengths):
    x = ids
    with torch.no_grad():
        for st in stages:
            x = st(x, torch.tensor(lengths))
    return x


def _assert_valid_close(got, ref, lengths, atol=1e-5):
    for b, n in enumerate(lengths):   # padding positions are unspecified
        torch.testing.assert_close(got[b, :n], ref[b, :n], atol=atol, rtol=1e-5)


@pytest.fixture(scope="module")
def builtin():
    return build_builtin_tiny(seed=0)


def test_layer_ranges_uneven():
    assert layer_ranges(5, 2) == [(0, 3), (3, 5)]
    assert layer_ranges(4, 3) == [(0, 2), (2, 3), (3, 4)]
    with pytest.raises(ValueError):
        layer_ranges(2, 3)


@pytest.mark.parametrize("num_stages", [1, 2, 3])
def test_builtin_tiny_split_matches_hf(builtin, num_stages):
    ids, mask = padded_batch(LENGTHS)
    with torch.no_grad():
        ref = builtin(input_ids=ids, attention_mask=mask).logits
    stages = split_stages(builtin, num_stages)
    assert sum(s.num_layers for s in stages) == 4
    _assert_valid_close(_stage_chain(stages, ids, LENGTHS), ref, LENGTHS)


@pytest.mark.parametrize("family", ["llama", "qwen2", "gpt2"])
def test_saved_checkpoint_split_matches_hf(tmp_path, family):
    src = tiny_hf(family, tie=(family == "gpt2"))
    src.save_pretrained(tmp_path)
    assert any(tmp_path.glob("*.safetensors"))
    model, _, fam = load_model(str(tmp_path), byte_tokenizer=True)
    assert fam == family
    ids, mask = padded_batch(LENGTHS)
    with torch.no_grad():
        ref = src(input_ids=ids, attention_mask=mask).logits
    for num_stages in (1, 2, 3):
        _assert_valid_close(_stage_chain(split_stages(model, num_stages), ids, LENGTHS), ref, LENGTHS)


def test_stages_own_their_parameters(builtin):
    stages = split_stages(builtin, 2)
    hf_ptrs = {p.data_ptr() for p in builtin.parameters()}
    assert not any(p.data_ptr() in hf_ptrs for st in stages for p in st.parameters())
    # every HF weight is owned by exactly one stage
    names = [n for st in stages for n in st.hf_names.values()]
    assert sorted(names) == sorted(builtin.state_dict())


def test_worker_pipeline_inference_matches_hf(builtin):
    ids, mask = padded_batch(LENGTHS, seed=3)
    with torch.no_grad():
        ref = builtin(input_ids=ids, attention_mask=mask, labels=None).logits
    workers = make_workers(builtin, 2)
    res = pipeline_forward(workers, 0, ids, LENGTHS, labels=ids)
    for b, n in enumerate(LENGTHS):
        if n < 2:
            assert res.seq_nll[b] != res.seq_nll[b]   # NaN: nothing predicted
            continue
        expect = torch.nn.functional.cross_entropy(ref[b, :n - 1], ids[b, 1:n])
        assert res.seq_nll[b] == pytest.approx(float(expect), abs=1e-5)
