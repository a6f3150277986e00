"""lm-evaluation-harness against a real `lemix serve`, offline: a loglikelihood task and a
generate_until task of our own (local JSONL data, task YAML in a temp dir, `--include_path`),
through `local-completions` with the checkpoint's BPE tokenizer, with text and with token-id
requests. Its loglikelihoods equal the model's own (log_softmax of the logits)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from serve_factory import free_port, save_hand_profile, server_log, wait_healthy

pytest.importorskip("lm_eval")
pytestmark = pytest.mark.slow

LL_DOCS = [
    {"context": "The interpreter reads", "continuation": " a statement"},
    {"context": "A class defines", "continuation": " the attributes of its instances"},
    {"context": "Exceptions are raised", "continuation": " when an error"},
]
GEN_DOCS = [{"question": "Objects are", "answer": " x"}, {"question": "A module is", "answer": " y"}]


def make_checkpoint(path: Path) -> None:
    """A tiny random Llama plus a byte-level BPE trained on the built-in corpus, saved as HF
    files. No BOS token: lm-eval and the server then tokenize a text the same way."""
    from pydoc_data.topics import topics
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=512, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    core.train_from_iterator(list(topics.values())[:20], trainer)
    tok = PreTrainedTokenizerFast(tokenizer_object=core, eos_token="<|endoftext|>")
    tok.save_pretrained(path)
    config = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         bos_token_id=None, eos_token_id=tok.eos_token_id, pad_token_id=tok.eos_token_id)
    torch.manual_seed(0)
    LlamaForCausalLM(config).float().eval().save_pretrained(path)


def write_tasks(root: Path) -> Path:
    tasks = root / "tasks"
    tasks.mkdir()
    for name, docs in (("ll", LL_DOCS), ("gen", GEN_DOCS)):
        (root / f"{name}.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
    (tasks / "lemix_ll.yaml").write_text(f"""task: lemix_ll
dataset_path: json
dataset_kwargs:
  data_files:
    test: {root / 'll.jsonl'}
test_split: test
output_type: loglikelihood
doc_to_text: "{{{{context}}}}"
doc_to_target: "{{{{continuation}}}}"
metric_list:
  - metric: perplexity
  - metric: acc
""")
    (tasks / "lemix_gen.yaml").write_text(f"""task: lemix_gen
dataset_path: json
dataset_kwargs:
  data_files:
    test: {root / 'gen.jsonl'}
test_split: test
output_type: generate_until
doc_to_text: "{{{{question}}}}"
doc_to_target: "{{{{answer}}}}"
generation_kwargs:
  until: ["\\n\\n"]
  max_gen_toks: 6
  do_sample: false
metric_list:
  - metric: exact_match
""")
    return tasks


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    root = tmp_path_factory.mktemp("lmeval")
    ckpt = root / "ckpt"
    make_checkpoint(ckpt)
    port = free_port()
    state = root / "state"
    state.mkdir()
    profile = save_hand_profile(root / "profile.json")
    cmd = [sys.executable, "-m", "lemix.cli", "serve", "--model", str(ckpt), "--stages", "1",
           "--profile", str(profile), "--force-profile", "--port", str(port), "--state-dir", str(state),
           "--log-level", "warning"]
    log = open(root / "state.log", "a")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=dict(os.environ, PYTHONUNBUFFERED="1"))
    proc.log_path = log.name
    log.close()
    try:
        wait_healthy(proc, port, timeout_s=180)
        yield root, ckpt, port
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
        print(server_log(proc)[-3000:])


def run_lm_eval(root: Path, ckpt: Path, port: int, tokenized: bool) -> dict[str, list[dict]]:
    out = root / f"out-{tokenized}"
    args = (f"model={ckpt},base_url=http://127.0.0.1:{port}/v1/completions,tokenizer={ckpt},"
            f"tokenized_requests={tokenized},max_length=256,num_concurrent=1,max_retries=1")
    env = dict(os.environ, HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               HF_DATASETS_CACHE=str(root / "hf-datasets"), HF_HOME=str(root / "hf-home"))
    cmd = [sys.executable, "-m", "lm_eval", "--model", "local-completions", "--model_args", args,
           "--tasks", "lemix_ll,lemix_gen", "--include_path", str(root / "tasks"), "--output_path", str(out),
           "--log_samples", "--batch_size", "1"]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-6000:]
    samples = {}
    for task in ("lemix_ll", "lemix_gen"):
        (path,) = out.rglob(f"samples_{task}_*.jsonl")
        samples[task] = sorted((json.loads(line) for line in path.read_text().splitlines()),
                               key=lambda s: s["doc_id"])
    return samples


def direct_loglikelihood(ckpt: Path, doc: dict) -> tuple[float, bool]:
    """As lm-eval scores a pair: tokens of context + continuation, the continuation's summed
    log-probability, and whether each continuation token is the argmax."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    tok = AutoTokenizer.from_pretrained(ckpt)
    model = AutoModelForCausalLM.from_pretrained(ckpt).float().eval()
    whole = tok.encode(doc["context"] + doc["continuation"], add_special_tokens=False)
    ctx = len(tok.encode(doc["context"], add_special_tokens=False))
    with torch.no_grad():
        lp = torch.log_softmax(model(torch.tensor([whole])).logits[0].float(), -1)
    rows = range(ctx, len(whole))
    return (sum(float(lp[i - 1, whole[i]]) for i in rows),
            all(int(lp[i - 1].argmax()) == whole[i] for i in rows))


@pytest.mark.parametrize("tokenized", [False, True])
def test_lm_eval_loglikelihood_and_generate_until_offline(served, tokenized):
    root, ckpt, port = served
    if not (root / "tasks").exists():
        write_tasks(root)
    samples = run_lm_eval(root, ckpt, port, tokenized)
    ll = samples["lemix_ll"]
    assert len(ll) == len(LL_DOCS)
    for s, doc in zip(ll, LL_DOCS):
        got_lp, got_greedy = s["resps"][0][0]
        want_lp, want_greedy = direct_loglikelihood(ckpt, doc)
        assert float(got_lp) == pytest.approx(want_lp, abs=1e-3)
        assert str(got_greedy) == str(want_greedy)
    gen = samples["lemix_gen"]
    assert len(gen) == len(GEN_DOCS)
    for s, doc in zip(gen, GEN_DOCS):
        assert s["resps"][0][0] == direct_greedy(ckpt, doc["question"], 6).split("\n\n")[0]
        assert s["exact_match"] == float(s["resps"][0][0] == doc["answer"])


def direct_greedy(ckpt: Path, text: str, n: int) -> str:
    from transformers import AutoModelForCausalLM, AutoTokenizer
    tok = AutoTokenizer.from_pretrained(ckpt)
    model = AutoModelForCausalLM.from_pretrained(ckpt).float().eval()
    ids = tok.encode(text, add_special_tokens=False)
    out = model.generate(torch.tensor([ids]), max_new_tokens=n, do_sample=False, eos_token_id=tok.eos_token_id,
                         pad_token_id=tok.eos_token_id)
    return tok.decode(out[0, len(ids):], skip_special_tokens=True)
