"""Commands to a StageWorker and its results: small dataclasses holding only plain values and
tensors, so they pickle (Ray actor calls) and share no mutable state with the caller.

Tensors sent to a worker are copied onto its device; tensors it returns are fresh CPU copies.
Batches are right-padded: sequence b has `lengths[b]` valid tokens at positions 0..len-1.
Every result carries `compute_s`, the seconds spent in model compute inside the worker.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass(frozen=True)
class SamplingParams:
    """How the next token is chosen (lemix.engine.sampling).

    Always, on the model's logits: logit_bias (token id, bias) pairs, repetition_penalty (over
    prompt and output tokens), presence/frequency penalties (over output tokens). Then
    temperature 0 = greedy (argmax); else temperature, top_k (0 = off), top_p, min_p (0 = off),
    and a draw with a generator seeded from (seed, token position), so runs are reproducible.
    logprobs k (None = off) returns the drawn token's log-probability under the model (raw
    log_softmax of the logits) and the k most likely alternatives; prompt_logprobs k the same for
    every prompt token after the first. ignore_eos: do not stop at the EOS token.
    """

    temperature: float = 0.0
    top_p: float = 1.0
    seed: int = 0
    top_k: int = 0
    min_p: float = 0.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logit_bias: tuple[tuple[int, float], ...] = ()
    logprobs: int | None = None
    prompt_logprobs: int | None = None
    ignore_eos: bool = False

    @property
    def needs_history(self) -> bool:
        """The penalties read the tokens so far (prompt and output)."""
        return bool(self.presence_penalty or self.frequency_penalty or self.repetition_penalty != 1.0)

    @property
    def plain_greedy(self) -> bool:
        """argmax of the raw logits, nothing else to compute."""
        return (self.temperature <= 0 and not self.needs_history and not self.logit_bias
                and self.logprobs is None)


@dataclass(frozen=True)
class TokenLogprob:
    """A token's log-probability under the model and the `top` most likely tokens at its place
    ((id, logprob), most likely first)."""

    token: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()


# A sequence's tokens so far, for the penalties: (prompt ids, generated ids).
History = tuple[tuple[int, ...], tuple[int, ...]]


# ---------------------------------------------------------------- commands

@dataclass(frozen=True)
class Forward:
    """Forward of a micro-batch on this stage (training, loss evaluation or prefill).

    input_ids [B,T] long on stage 0, else hidden [B,T,H]. labels [B,T] long (unshifted, -100 =
    ignore; positions >= length are ignored anyway) are needed on the last stage for training
    and give per-sequence NLL in inference. keep_kv (inference only) writes each sequence's K/V
    into the cache; on the last stage it also samples the first generated token per sequence
    (sampling None = greedy). Training backpropagates loss * loss_scale (1/M averages M
    micro-batches).
    """

    batch_id: int
    train: bool
    seq_ids: tuple[int, ...]
    lengths: tuple[int, ...]
    input_ids: torch.Tensor | None = None
    hidden: torch.Tensor | None = None
    labels: torch.Tensor | None = None
    keep_kv: bool = False
    sampling: tuple[SamplingParams, ...] | None = None
    loss_scale: float = 1.0
    layers: tuple[int, int] | tuple[()] = ()   # training chunk: layers [lo, hi) of `of_layers` (engine/chunks.py)
    of_layers: int = 0                          # ... the scheduler's layer count of the stage (0: the stage's own)
    cuts: tuple[int, ...] = ()                  # ... chunk boundaries inside it (several chunks as one op)


@dataclass(frozen=True)
class Backward:
    """Backward of a stashed training micro-batch; grad_output [B,T,H] (None on the last stage)."""

    batch_id: int
    grad_output: torch.Tensor | None = None
    layers: tuple[int, int] | tuple[()] = ()   # training chunk: layers [lo, hi) of `of_layers` (engine/chunks.py)
    of_layers: int = 0                          # ... the scheduler's layer count of the stage (0: the stage's own)


@dataclass(frozen=True)
class Decode:
    """One decode iteration: one token for each sequence, using and extending the KV cache.

    token_ids [B] long on stage 0, else hidden [B,1,H]. Sequences may have different lengths.
    """

    iter_id: int
    seq_ids: tuple[int, ...]
    token_ids: torch.Tensor | None = None
    hidden: torch.Tensor | None = None
    sampling: tuple[SamplingParams, ...] | None = None
    history: tuple[History | None, ...] | None = None   # last stage, for the penalties


@dataclass(frozen=True)
class Free:
    """Drop the KV of finished sequences and/or the stashes of abandoned training batches."""

    seq_ids: tuple[int, ...] = ()
    batch_ids: tuple[int, ...] = ()


@dataclass(frozen=True)
class Step:
    """AdamW step on this stage, zero the grads, bump the weight version."""


@dataclass(frozen=True)
class Offload:
    """Move KV entries (kind 'kv', keys = seq ids) or training stashes (kind 'act', keys = batch
    ids) from the device to host memory."""

    kind: str
    keys: tuple[int, ...]


@dataclass(frozen=True)
class Reload:
    """Move offloaded KV entries / stashes back to the device (same fields as Offload)."""

    kind: str
    keys: tuple[int, ...]


@dataclass(frozen=True)
class GetWeights:
    """Ask for this stage's shared weights (CPU tensors): every weight, or with LoRA only the
    adapters (what merges and syncs move)."""


@dataclass(frozen=True)
class SetWeights:
    """Overwrite this stage's weights; version None keeps the current version number."""

    state_dict: dict[str, torch.Tensor]
    version: int | None = None


@dataclass(frozen=True)
class GetState:
    """Ask for this stage's weights and optimizer state (CPU copies), for a checkpoint."""


@dataclass(frozen=True)
class SetState:
    """Restore weights and optimizer state from a checkpoint (GetState's StateResult fields);
    version None keeps the current version number."""

    weights: dict[str, torch.Tensor]
    optimizer: dict
    version: int | None = None


@dataclass(frozen=True)
class Memory:
    """Ask for the stage's memory state."""


# ---------------------------------------------------------------- results

@dataclass(frozen=True)
class ForwardResult:
    batch_id: int
    hidden: torch.Tensor | None = None                # non-last stage: [B,T,H] for the next stage
    loss: float | None = None                         # last stage, training: mean token NLL
    seq_nll: tuple[float, ...] | None = None          # last stage, inference with labels
    next_tokens: tuple[int, ...] | None = None        # last stage with keep_kv
    compute_s: float = 0.0
    logprobs: tuple[TokenLogprob | None, ...] | None = None     # of next_tokens, where asked
    prompt_logprobs: tuple[tuple[TokenLogprob, ...] | None, ...] | None = None   # tokens 1.. of each prompt


@dataclass(frozen=True)
class BackwardResult:
    batch_id: int
    grad_input: torch.Tensor | None = None            # [B,T,H] for the previous stage; None on stage 0
    compute_s: float = 0.0


@dataclass(frozen=True)
class DecodeResult:
    iter_id: int
    hidden: torch.Tensor | None = None                # non-last stage: [B,1,H]
    next_tokens: tuple[int, ...] | None = None        # last stage
    compute_s: float = 0.0
    logprobs: tuple[TokenLogprob | None, ...] | None = None     # of next_tokens, where asked


@dataclass(frozen=True)
class FreeResult:
    freed_bytes: int
    compute_s: float = 0.0


@dataclass(frozen=True)
class VersionResult:
    """After Step or SetWeights."""

    version: int
    compute_s: float = 0.0


@dataclass(frozen=True)
class MoveResult:
    """After Offload or Reload."""

    kind: str
    keys: tuple[int, ...]
    moved_bytes: int
    compute_s: float = 0.0


@dataclass(frozen=True)
class WeightsResult:
    state_dict: dict[str, torch.Tensor] = field(default_factory=dict)
    version: int = 0
    compute_s: float = 0.0


@dataclass(frozen=True)
class StateResult:
    """After GetState: the stage's weights and its optimizer's state_dict, as CPU copies. With
    LoRA `weights` holds only the adapters; `meta` says the mode, the base reference and the
    stage's layers and HF key names (what `lemix export` needs)."""

    weights: dict[str, torch.Tensor] = field(default_factory=dict)
    optimizer: dict = field(default_factory=dict)
    version: int = 0
    compute_s: float = 0.0
    meta: dict = field(default_factory=dict)


@dataclass(frozen=True)
class MemoryState:
    """Bytes this stage holds. On CPU the worker's own accounting; on CUDA allocated_bytes is
    torch.cuda.memory_allocated, the other device fields stay the worker's accounting."""

    weights_bytes: int
    optim_bytes: int          # optimizer state + accumulated gradients
    kv_bytes: int
    act_bytes: int            # stashed training activations on the device
    host_bytes: int           # offloaded KV + activations in host memory
    budget_bytes: int | None
    allocated_bytes: int      # device total: sum of the above on CPU, allocator's count on CUDA
    compute_s: float = 0.0

    @property
    def free_bytes(self) -> int | None:
        return None if self.budget_bytes is None else self.budget_bytes - self.allocated_bytes
