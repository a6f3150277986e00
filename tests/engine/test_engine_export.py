"""`lemix export`: trained stages -> a Hugging Face directory that transformers (and peft) load
with the engine's logits."""
import json
from pathlib import Path

import pytest
import torch

from engine_factories import make_workers, padded_batch, pipeline_backward, pipeline_forward, tiny_hf
from lemix.cli import main
from lemix.engine.adapt import AdaptSpec
from lemix.engine.messages import GetState, Step
from lemix.engine.model import load_model
from lemix.export import ExportError, export_state_dir, export_stages
from lemix.serve.checkpoint import write_node
from lemix.serve.journal import Journal


def trained_workers(spec: str, adapt: AdaptSpec, stages: int = 2, steps: int = 2):
    model, tok, _ = load_model(spec, seed=3, adapt=adapt, byte_tokenizer=spec != "builtin-tiny")
    workers = make_workers(model, stages, lr=5e-3)
    for i in range(steps):
        ids, mask = padded_batch([9, 6], seed=i)
        pipeline_forward(workers, i, ids, mask.sum(1).tolist(), train=True, labels=ids)
        pipeline_backward(workers, i)
        for w in workers:
            w.handle(Step())
    return workers, tok


def engine_logits(workers, ids):
    h, lengths = ids, torch.full((ids.shape[0],), ids.shape[1])
    with torch.no_grad():
        for w in workers:
            h = w.stage(h, lengths)
    return h.float()


def states(workers):
    return [(st.weights, st.meta) for st in (w.handle(GetState()) for w in workers)]


@pytest.fixture(scope="module")
def qwen2_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("qwen2")
    tiny_hf("qwen2").save_pretrained(d)
    return str(d)


@pytest.mark.parametrize("adapt", [AdaptSpec(lora_rank=4), AdaptSpec(), AdaptSpec(dtype="bfloat16", lora_rank=4)])
def test_export_of_builtin_model_loads_with_the_engines_logits(tmp_path, adapt):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    workers, tok = trained_workers("builtin-tiny", adapt)
    ids = torch.tensor([tok.encode("The quick brown fox jumps")])
    out = export_stages(states(workers), tmp_path / "merged")
    loaded = AutoModelForCausalLM.from_pretrained(out, local_files_only=True).eval()
    assert loaded.dtype == (torch.bfloat16 if adapt.dtype == "bfloat16" else torch.float32)
    with torch.no_grad():
        got = loaded(input_ids=ids).logits.float()
    want = engine_logits(workers, ids)
    # merging B@A into a bf16 weight rounds it once more than the engine's unmerged forward
    tol = 0.05 if adapt.dtype == "bfloat16" else 1e-5
    torch.testing.assert_close(got, want, atol=tol, rtol=0)
    hf_tok = AutoTokenizer.from_pretrained(out)
    assert hf_tok.encode("The quick", add_special_tokens=False) == tok.encode("The quick", add_bos=False)
    assert json.loads((out / "config.json").read_text())["model_type"] == "llama"


def test_adapter_export_loads_with_peft_on_its_base(tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    workers, tok = trained_workers("builtin-tiny", AdaptSpec(lora_rank=4))
    out = export_stages(states(workers), tmp_path / "adapter", adapter=True)
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["r"] == 4 and config["base_model_name_or_path"] == str((out / "base").resolve())
    assert not (out / "model.safetensors").exists() and (out / "adapter_model.safetensors").is_file()
    base = AutoModelForCausalLM.from_pretrained(config["base_model_name_or_path"], local_files_only=True)
    ids = torch.tensor([tok.encode("adapters only")])
    with torch.no_grad():
        untrained = base(input_ids=ids).logits
    model = PeftModel.from_pretrained(base, out).eval()
    with torch.no_grad():
        got = model(input_ids=ids).logits
    assert (got - untrained).abs().max() > 1e-3          # the adapters carry what was trained
    torch.testing.assert_close(got, engine_logits(workers, ids), atol=1e-5, rtol=0)


def test_adapter_of_a_saved_checkpoint_references_it(tmp_path, qwen2_dir):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    workers, _ = trained_workers(qwen2_dir, AdaptSpec(lora_rank=4, lora_targets=("q_proj", "v_proj")), stages=3)
    out = export_stages(states(workers), tmp_path / "adapter", adapter=True)
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(Path(qwen2_dir).resolve())
    assert sorted(config["target_modules"]) == ["q_proj", "v_proj"]
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(qwen2_dir), out).eval()
    ids = torch.randint(0, 256, (2, 11), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        got = model(input_ids=ids).logits
    torch.testing.assert_close(got, engine_logits(workers, ids), atol=1e-5, rtol=0)


def test_cli_export_reads_a_serve_state_dir(tmp_path, qwen2_dir, capsys):
    from transformers import AutoModelForCausalLM

    workers, _ = trained_workers(qwen2_dir, AdaptSpec(), stages=2, steps=1)
    state = tmp_path / "state"
    journal = Journal(state / "journal.sqlite")
    write_node([w.handle(GetState()) for w in workers], journal, state / "checkpoints", 0, 1, qwen2_dir)
    journal.close()
    assert main(["export", "--state-dir", str(state), "--out", str(tmp_path / "hf")]) == 0
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    ids = torch.randint(0, 256, (1, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, engine_logits(workers, ids), atol=1e-5, rtol=0)
    with pytest.raises(ExportError, match="needs a LoRA run"):
        export_state_dir(state, tmp_path / "x", adapter=True)
    assert main(["export", "--state-dir", str(tmp_path / "empty"), "--out", str(tmp_path / "y")]) == 2
    assert "no checkpoint" in capsys.readouterr().err
