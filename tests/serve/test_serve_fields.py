"""No accepted request field is silently ignored: every field of every request model is listed
here with the test that shows its effect (or its 400 for values the server does not implement).
A field added to a model without such a test fails this walk."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest
from pydantic import BaseModel

from lemix.serve import protocol as P

HERE = Path(__file__).parent
PARAMS = "serve/test_serve_params.py"
OPENAI = "serve/test_serve_openai.py"
ERRORS = "serve/test_serve_errors.py"

EFFECTS: dict[str, dict[str, str]] = {
    "_Sampling": {
        "model": f"{ERRORS}::test_unknown_model_is_404",
        "max_tokens": f"{OPENAI}::test_length_finish_reason_at_max_tokens",
        "temperature": f"{OPENAI}::test_greedy_with_a_seed_is_reproducible_and_sampling_seed_matters",
        "seed": f"{OPENAI}::test_greedy_with_a_seed_is_reproducible_and_sampling_seed_matters",
        "top_p": f"{PARAMS}::test_top_k_1_min_p_1_and_tiny_top_p_sample_the_greedy_tokens",
        "top_k": f"{PARAMS}::test_top_k_limits_the_draws_to_the_k_most_likely",
        "min_p": f"{PARAMS}::test_top_k_1_min_p_1_and_tiny_top_p_sample_the_greedy_tokens",
        "presence_penalty": f"{PARAMS}::test_penalties_change_the_output_as_predicted",
        "frequency_penalty": f"{PARAMS}::test_penalties_change_the_output_as_predicted",
        "repetition_penalty": f"{PARAMS}::test_penalties_change_the_output_as_predicted",
        "logit_bias": f"{PARAMS}::test_logit_bias_minus_100_removes_a_token_and_plus_100_forces_one",
        "n": f"{PARAMS}::test_n_3_with_a_seed_gives_3_reproducible_choices_that_differ",
        "stream": f"{OPENAI}::test_streaming_completion_matches_non_streaming",
        "stream_options": f"{OPENAI}::test_streaming_chat_with_usage",
        "stop": f"{OPENAI}::test_stop_string_cuts_the_text_and_finishes_with_stop",
        "stop_token_ids": f"{PARAMS}::test_stop_token_ids_end_the_text_before_the_token",
        "ignore_eos": f"{PARAMS}::test_ignore_eos_generates_past_the_eos_token",
        "priority": "sched/test_sched_policies.py::test_naivemix_round_robin_in_queue_order_at_one_instant",
    },
    "CompletionRequest": {
        "prompt": f"{PARAMS}::test_prompt_lists_and_token_id_prompts_match_single_requests",
        "echo": f"{PARAMS}::test_echo_returns_the_prompt_and_its_logprobs_and_max_tokens_0_scores_only",
        "logprobs": f"{PARAMS}::test_logprobs_of_greedy_tokens_equal_log_softmax_of_the_model",
        "best_of": f"{PARAMS}::test_best_of_returns_the_choice_with_the_highest_cumulative_logprob",
        "suffix": f"{PARAMS}::test_what_the_server_does_not_implement_is_400_naming_it",
    },
    "ChatRequest": {
        "messages": f"{OPENAI}::test_chat_completion",
        "max_completion_tokens": f"{PARAMS}::test_chat_max_completion_tokens_text_parts_and_roles",
        "logprobs": f"{PARAMS}::test_chat_logprobs_and_top_logprobs",
        "top_logprobs": f"{PARAMS}::test_chat_logprobs_and_top_logprobs",
        **{f: f"{PARAMS}::test_what_the_server_does_not_implement_is_400_naming_it"
           for f in ("response_format", "tools", "tool_choice", "functions", "function_call",
                     "parallel_tool_calls")},
    },
    "ResponseFormat": {"type": f"{PARAMS}::test_what_the_server_does_not_implement_is_400_naming_it"},
    "StreamOptions": {"include_usage": f"{OPENAI}::test_streaming_chat_with_usage"},
    "ChatMessage": {"role": f"{PARAMS}::test_chat_max_completion_tokens_text_parts_and_roles",
                    "content": f"{OPENAI}::test_chat_completion"},
    "TextPart": {"type": f"{PARAMS}::test_chat_max_completion_tokens_text_parts_and_roles",
                 "text": f"{PARAMS}::test_chat_max_completion_tokens_text_parts_and_roles"},
    "TokenizeRequest": {f: f"{PARAMS}::test_tokenize_detokenize_version_and_model_retrieve"
                        for f in ("model", "prompt", "messages", "add_special_tokens",
                                  "add_generation_prompt", "return_token_strs")},
    "DetokenizeRequest": {f: f"{PARAMS}::test_tokenize_detokenize_version_and_model_retrieve"
                          for f in ("model", "tokens")},
    "TrainRequest": {"samples": "serve/test_serve_units.py::test_train_request_accepts_one_a_list_or_samples"},
    "TrainSample": {f: "serve/test_serve_units.py::test_sample_tokens_and_chat_prompt"
                    for f in ("text", "prompt", "completion")},
}


def request_models() -> list[type[BaseModel]]:
    return [m for m in vars(P).values()
            if isinstance(m, type) and issubclass(m, BaseModel) and m not in (BaseModel, P._Body)]


def effect_of(model: type[BaseModel], field: str) -> str | None:
    for cls in model.__mro__:   # a field declared on a base class is listed there
        if field in EFFECTS.get(cls.__name__, {}) and field in getattr(cls, "__annotations__", {}):
            return EFFECTS[cls.__name__][field]
    return None


def test_every_request_field_has_an_effect_test_or_a_400():
    missing = [f"{m.__name__}.{f}" for m in request_models() for f in m.model_fields if effect_of(m, f) is None]
    assert not missing, f"fields with no test of their effect: {missing}"


def test_every_request_model_forbids_unknown_fields():
    assert all(m.model_config.get("extra") == "forbid" for m in request_models())


@pytest.mark.parametrize("ref", sorted({r for fields in EFFECTS.values() for r in fields.values()}))
def test_the_named_tests_exist(ref):
    path, name = ref.split("::")
    tree = ast.parse((HERE.parent / path).read_text())
    assert name in {n.name for n in ast.walk(tree) if isinstance(n, ast.FunctionDef)}, ref
