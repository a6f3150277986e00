"""Model specs, checkpoint errors, tokenizers, and the worker's message contract."""
import json
import pickle

import pytest
import torch

from engine_factories import padded_batch, make_workers, tiny_hf
from lemix.engine.checkpoint import EXPECTED, CheckpointError
from lemix.engine.messages import Backward, Forward, Memory, SamplingParams
from lemix.engine.model import build_builtin_tiny, load_model
from lemix.engine.tokenizer import ByteTokenizer, HFTokenizer, load_tokenizer


@pytest.mark.parametrize("setup,found", [
    (lambda d: None, "is empty"),
    (lambda d: (d / "weights.bin").write_text("x"), "weights.bin"),
    (lambda d: (d / "config.json").write_text(json.dumps({"model_type": "bert"})), "'bert'"),
    (lambda d: (d / "config.json").write_text(json.dumps({"model_type": "llama"})), "no *.safetensors"),
])
def test_non_checkpoint_dir_raises_checkpoint_error(tmp_path, setup, found):
    setup(tmp_path)
    with pytest.raises(CheckpointError) as err:
        load_model(str(tmp_path))
    assert str(err.value).startswith(EXPECTED) and found in str(err.value)
    assert "model_type llama, qwen2 or gpt2" in str(err.value)


def test_missing_path_raises_checkpoint_error(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_model(str(tmp_path / "nope"))


def test_builtin_tiny_is_deterministic_per_seed():
    model, tok, family = load_model("builtin-tiny", seed=3)
    assert family == "llama" and isinstance(tok, ByteTokenizer)
    assert model.config.vocab_size == 259 and model.config.num_key_value_heads == 2
    again, other = build_builtin_tiny(seed=3), build_builtin_tiny(seed=4)
    w = "model.layers.0.self_attn.q_proj.weight"
    assert torch.equal(model.state_dict()[w], again.state_dict()[w])
    assert not torch.equal(model.state_dict()[w], other.state_dict()[w])


def test_byte_tokenizer_roundtrip():
    tok = ByteTokenizer()
    ids = tok.encode("héllo")
    assert ids[0] == tok.bos_id and len(ids) == 1 + len("héllo".encode())
    assert tok.decode(ids + [tok.eos_id, tok.pad_id]) == "héllo"
    assert tok.encode("a", add_bos=False) == [97]


def test_load_tokenizer_fallback_rules():
    assert isinstance(load_tokenizer(None, 259), ByteTokenizer)
    with pytest.raises(ValueError, match="vocab_size >= 259"):
        load_tokenizer(None, 100)


def test_checkpoint_with_its_own_tokenizer(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    words = ["<unk>", "<s>", "</s>", "hello", "world", "again"]
    core = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=core, unk_token="<unk>", bos_token="<s>",
                            eos_token="</s>").save_pretrained(tmp_path)
    tiny_hf("llama").save_pretrained(tmp_path)
    _, tok, _ = load_model(str(tmp_path))
    assert isinstance(tok, HFTokenizer)
    assert tok.encode("hello world") == [1, 3, 4]
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (1, 2, 2)
    assert tok.decode([1, 3, 5, 2]).split() == ["hello", "again"]


def test_unknown_command_and_errors_propagate():
    (worker,) = make_workers(build_builtin_tiny(seed=0), 1)
    with pytest.raises(TypeError, match="cannot handle"):
        worker.handle("step")
    with pytest.raises(KeyError, match="no stashed micro-batch 5"):
        worker.handle(Backward(5))


def test_messages_pickle_and_results_carry_compute_time():
    ids, _ = padded_batch([4, 2])
    cmd = Forward(1, False, (0, 1), (4, 2), input_ids=ids, keep_kv=True,
                  sampling=(SamplingParams(0.7, 0.9, 1), SamplingParams()))
    again = pickle.loads(pickle.dumps(cmd))
    assert torch.equal(again.input_ids, ids) and again.sampling == cmd.sampling
    (worker,) = make_workers(build_builtin_tiny(seed=0), 1)
    res = pickle.loads(pickle.dumps(worker.handle(again)))
    assert res.compute_s > 0 and len(res.next_tokens) == 2
    mem = worker.handle(Memory())
    assert mem.allocated_bytes == mem.weights_bytes + mem.optim_bytes + mem.kv_bytes + mem.act_bytes
    assert mem.kv_bytes > 0 and mem.free_bytes is None


def test_prefill_of_a_cached_sequence_is_refused_without_side_effects():
    (worker,) = make_workers(build_builtin_tiny(seed=0), 1)
    ids, _ = padded_batch([3, 3])
    worker.handle(Forward(0, False, (0, 1), (3, 3), input_ids=ids, keep_kv=True))
    before = worker.handle(Memory()).kv_bytes
    with pytest.raises(ValueError, match="already held"):
        worker.handle(Forward(1, False, (2, 1), (3, 3), input_ids=ids, keep_kv=True))
    assert 2 not in worker.kv and worker.handle(Memory()).kv_bytes == before


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_worker_trains_offloads_and_reports_allocator_bytes():
    from engine_factories import pipeline_backward, pipeline_forward
    from lemix.engine.messages import Offload, Reload, Step
    workers = make_workers(build_builtin_tiny(seed=0), 2, device="cuda:0")
    ids, _ = padded_batch([6, 4])
    pipeline_forward(workers, 0, ids, [6, 4], train=True, labels=ids)
    w = workers[1]
    dev_before = w.handle(Memory()).allocated_bytes
    w.handle(Offload("act", (0,)))
    assert w.handle(Memory()).allocated_bytes < dev_before
    w.handle(Reload("act", (0,)))
    pipeline_backward(workers, 0)
    assert all(w.handle(Step()).version == 1 for w in workers)


def test_checkpoint_without_tokenizer_is_refused_unless_asked(tmp_path):
    """No silent byte-level fallback: the error says what to pass; --byte-tokenizer or
    --tokenizer DIR (here: a tokenizer saved elsewhere) make it load."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    ckpt, tok_dir = tmp_path / "ckpt", tmp_path / "tok"
    tiny_hf("llama").save_pretrained(ckpt)
    with pytest.raises(CheckpointError, match="no tokenizer files.*--tokenizer DIR.*--byte-tokenizer"):
        load_model(str(ckpt))
    _, tok, _ = load_model(str(ckpt), byte_tokenizer=True)
    assert isinstance(tok, ByteTokenizer)
    core = Tokenizer(models.WordLevel({"<unk>": 0, "<s>": 1, "</s>": 2, "hi": 3}, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=core, unk_token="<unk>", bos_token="<s>",
                            eos_token="</s>").save_pretrained(tok_dir)
    _, tok, _ = load_model(str(ckpt), tokenizer=str(tok_dir))
    assert isinstance(tok, HFTokenizer) and tok.encode("hi") == [1, 3]
