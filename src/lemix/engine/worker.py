"""StageWorker: owns one pipeline stage and executes command messages on it.

The worker shares nothing with its caller: commands carry plain values and tensors (copied in),
results carry fresh CPU tensors. So the same class runs in a local thread or inside a Ray actor.
Errors propagate out of `handle`; nothing is swallowed.

Correctness rule for training: an optimizer step (or a weight overwrite) while a stashed
micro-batch still waits for its backward would change weights that backward needs, so Step and
SetWeights raise instead.
"""
from __future__ import annotations

import copy
import dataclasses
import time
from itertools import chain

import torch

from lemix.engine.adapt import DTYPES
from lemix.engine.kvcache import KVCache
from lemix.engine.messages import (Backward, BackwardResult, Decode, DecodeResult, Forward,
                                   ForwardResult, Free, FreeResult, GetState, GetWeights, Memory,
                                   MemoryState, MoveResult, Offload, Reload, SetState, SetWeights,
                                   StateResult, Step, VersionResult, WeightsResult)
from lemix.engine.optim import StageOptimizer
from lemix.engine.sampling import sample, token_logprobs
from lemix.engine.stage import StageModule, causal_lm_loss, mask_labels, sequence_nll
from lemix.engine import chunks
from lemix.engine.stash import ActivationStash


class _Timer:
    """Wall time of a block of model compute (waits for the GPU before stopping)."""

    def __init__(self, device: torch.device):
        self.device, self.s = device, 0.0

    def __enter__(self):
        self._t0 = time.perf_counter()
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.s = time.perf_counter() - self._t0


class StageWorker:
    def __init__(self, stage_module: StageModule, stage_index: int, num_stages: int,
                 device: str = "cpu", lr: float = 1e-4, weight_decay: float = 0.0,
                 memory_budget_bytes: int | None = None):
        if (stage_module.stage_index, stage_module.num_stages) != (stage_index, num_stages):
            raise ValueError(f"stage module is {stage_module.stage_index}/{stage_module.num_stages}, "
                             f"worker was told {stage_index}/{num_stages}")
        self.device = torch.device(device)
        self.stage = stage_module.to(self.device)
        self._dtype = DTYPES[self.stage.adapt.dtype]          # of weights, hidden states, KV
        self.trainable = [p for p in self.stage.parameters() if p.requires_grad]
        # what merges, syncs and checkpoints move: with LoRA the adapters, else every weight
        self.shared_keys = [k for k, p in self.stage.named_parameters() if p.requires_grad] \
            if self.stage.adapt.lora else list(self.stage.state_dict())
        self.stage_index, self.num_stages = stage_index, num_stages
        self.memory_budget_bytes = memory_budget_bytes
        self.kv = KVCache(self.device)
        self.stashes: dict[int, ActivationStash] = {}
        self.optimizer = StageOptimizer(self.trainable, lr=lr, weight_decay=weight_decay)
        self.version = 0
        self._handlers = {
            Forward: self._forward, Backward: self._backward, Decode: self._decode,
            Free: self._free, Step: self._step, Offload: self._offload, Reload: self._reload,
            GetWeights: self._get_weights, SetWeights: self._set_weights, Memory: self._memory,
            GetState: self._get_state, SetState: self._set_state,
        }

    def handle(self, cmd):
        handler = self._handlers.get(type(cmd))
        if handler is None:
            raise TypeError(f"StageWorker cannot handle {type(cmd).__name__}")
        return handler(cmd)

    # ------------------------------------------------------------ inputs
    @property
    def _first(self) -> bool:
        return self.stage.is_first

    @property
    def _last(self) -> bool:
        return self.stage.is_last

    def _input(self, ids: torch.Tensor | None, hidden: torch.Tensor | None) -> torch.Tensor:
        """A private device copy of this stage's input: ids on stage 0, hidden elsewhere."""
        if self._first:
            if ids is None:
                raise ValueError("stage 0 needs token ids")
            return ids.to(self.device, dtype=torch.long, copy=True)
        if hidden is None:
            raise ValueError(f"stage {self.stage_index} needs the previous stage's hidden states")
        return hidden.to(self.device, dtype=self._dtype, copy=True)

    # ------------------------------------------------------------ forward
    def _forward(self, cmd: Forward) -> ForwardResult:
        if cmd.layers:   # hook (issue 10): a chunk of the stage's layers (engine/chunks.py)
            return chunks.chunk_forward(self, cmd, _Timer)
        x = self._input(cmd.input_ids, cmd.hidden)
        if len(cmd.lengths) != x.shape[0] or len(cmd.seq_ids) != x.shape[0]:
            raise ValueError(f"batch of {x.shape[0]} with {len(cmd.seq_ids)} seq_ids and "
                             f"{len(cmd.lengths)} lengths")
        lengths = torch.tensor(cmd.lengths, device=self.device)
        labels = None
        if self._last and cmd.labels is not None:
            labels = mask_labels(cmd.labels.to(self.device, dtype=torch.long), lengths)
        if cmd.train:
            return self._train_forward(cmd, x, lengths, labels)
        return self._infer_forward(cmd, x, lengths, labels)

    def _train_forward(self, cmd: Forward, x, lengths, labels) -> ForwardResult:
        if cmd.keep_kv:
            raise ValueError("a training forward cannot keep KV")
        if cmd.batch_id in self.stashes:
            raise ValueError(f"micro-batch {cmd.batch_id} already has a pending backward")
        if self._last and labels is None:
            raise ValueError("the last stage needs labels for a training forward")
        params = {p.untyped_storage().data_ptr() for p in self.stage.parameters()}
        stash = ActivationStash(params)
        if self.stage.adapt.recompute:     # no graph now: keep the input, replay in backward
            with torch.no_grad(), _Timer(self.device) as t:
                out = self.stage(x, lengths)
                loss = causal_lm_loss(out, labels) if self._last else None
            stash.keep_input(x, lengths, labels, cmd.loss_scale)
            hidden = None if self._last else out.to("cpu", copy=True)
        else:
            inp = None if self._first else x.requires_grad_()
            loss = None
            with _Timer(self.device) as t, stash.hooks():
                out = self.stage(x, lengths)                              # [B,T,H] or [B,T,V]
                if self._last:
                    loss = causal_lm_loss(out, labels)
                    out = loss * cmd.loss_scale
            hidden = None if self._last else out.detach().to("cpu", copy=True)
            stash.hold(inp, out)   # after the copy: hold() drops the tensors' data
        self.stashes[cmd.batch_id] = stash
        return ForwardResult(cmd.batch_id, hidden=hidden,
                             loss=None if loss is None else float(loss.detach()), compute_s=t.s)

    def _infer_forward(self, cmd: Forward, x, lengths, labels) -> ForwardResult:
        if cmd.keep_kv:   # check before computing, so a bad prefill changes no cache entry
            taken = [sid for sid in cmd.seq_ids if sid in self.kv]
            if taken or len(set(cmd.seq_ids)) != len(cmd.seq_ids):
                raise ValueError(f"prefill of {cmd.seq_ids}: duplicate ids or KV already held "
                                 f"for {taken}; free them first")
        kv_out = [] if cmd.keep_kv else None
        seq_nll = draws = prompt_lps = None
        with torch.no_grad(), _Timer(self.device) as t:
            out = self.stage(x, lengths, kv_out)
            if cmd.keep_kv:
                self.kv.write_prefill(cmd.seq_ids, cmd.lengths, kv_out)
            if self._last and labels is not None:
                seq_nll = tuple(sequence_nll(out, labels).tolist())
            if self._last and cmd.keep_kv:
                last_logits = out[torch.arange(out.shape[0]), lengths - 1]       # [B,V]
                prompts = self._prompts(cmd)
                history = None if prompts is None else [(p, ()) for p in prompts]
                draws = sample(last_logits, cmd.sampling, cmd.lengths, history)
                prompt_lps = self._prompt_logprobs(cmd, out, prompts)
        hidden = None if self._last else out.to("cpu", copy=True)
        return ForwardResult(cmd.batch_id, hidden=hidden, seq_nll=seq_nll,
                             next_tokens=None if draws is None else draws.tokens, compute_s=t.s,
                             logprobs=None if draws is None else draws.logprobs,
                             prompt_logprobs=prompt_lps)

    @staticmethod
    def _prompts(cmd: Forward) -> list[tuple[int, ...]] | None:
        """Each prompt's ids (the labels), when a sequence's sampling needs them."""
        wants = cmd.sampling and any(p.needs_history or p.prompt_logprobs is not None for p in cmd.sampling)
        if not wants or cmd.labels is None:
            return None
        return [tuple(cmd.labels[b, :n].tolist()) for b, n in enumerate(cmd.lengths)]

    @staticmethod
    def _prompt_logprobs(cmd: Forward, logits: torch.Tensor, prompts) -> tuple | None:
        """Per sequence that asked: the model's logprob of prompt tokens 1.. given those before."""
        if prompts is None or not any(p.prompt_logprobs is not None for p in cmd.sampling):
            return None
        out = []
        for b, (p, ids) in enumerate(zip(cmd.sampling, prompts)):
            if p.prompt_logprobs is None or len(ids) < 2:
                out.append(None if p.prompt_logprobs is None else ())
                continue
            n = len(ids)
            out.append(tuple(token_logprobs(logits[b, : n - 1], torch.tensor(ids[1:]), p.prompt_logprobs)))
        return tuple(out)

    # ------------------------------------------------------------ backward / step
    def _stash(self, batch_id: int) -> ActivationStash:
        if batch_id not in self.stashes:
            raise KeyError(f"stage {self.stage_index} has no stashed micro-batch {batch_id}")
        return self.stashes[batch_id]

    def _backward(self, cmd: Backward) -> BackwardResult:
        if cmd.layers:   # hook (issue 10): a chunk of the stage's layers (engine/chunks.py)
            return chunks.chunk_backward(self, cmd, _Timer)
        stash = self._stash(cmd.batch_id)
        if stash.on_host:
            raise RuntimeError(f"micro-batch {cmd.batch_id}: activations are offloaded; reload first")
        if self._last != (cmd.grad_output is None):
            raise ValueError("grad_output must be None exactly on the last stage")
        with _Timer(self.device) as t:
            out, inp = self._replay(stash) if stash.recompute else (stash.out, stash.inp)
            grad = None if self._last else cmd.grad_output.to(self.device, dtype=out.dtype)
            torch.autograd.backward(out, grad)                             # accumulates .grad
        del self.stashes[cmd.batch_id]
        grad_in = None if self._first else inp.grad.to("cpu", copy=True)
        return BackwardResult(cmd.batch_id, grad_input=grad_in, compute_s=t.s)

    def _replay(self, stash: ActivationStash) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Recompute: the stage forward again, with autograd, from the stashed input."""
        lengths, loss_scale = stash.recompute
        x = stash.saved[0]
        inp = None if self._first else x.detach().requires_grad_()
        out = self.stage(x if inp is None else inp, lengths)
        if self._last:
            out = causal_lm_loss(out, stash.saved[1]) * loss_scale
        return out, inp

    def _check_no_pending(self, what: str) -> None:
        if self.stashes:
            raise RuntimeError(
                f"stage {self.stage_index}: {what} while micro-batches {sorted(self.stashes)} still "
                "wait for their backward, which needs the current weights")

    def _step(self, cmd: Step) -> VersionResult:
        self._check_no_pending("optimizer step")
        with _Timer(self.device) as t:
            self.optimizer.step()
            self.optimizer.zero_grad()
        self.version += 1
        return VersionResult(self.version, compute_s=t.s)

    # ------------------------------------------------------------ decode
    def _decode(self, cmd: Decode) -> DecodeResult:
        if len(set(cmd.seq_ids)) != len(cmd.seq_ids):
            raise ValueError(f"duplicate sequence ids in decode batch {cmd.seq_ids}")
        x = self._input(cmd.token_ids, cmd.hidden)
        draws = None
        with torch.no_grad(), _Timer(self.device) as t:
            past, past_lengths = self.kv.gather(cmd.seq_ids)              # [B,nkv,P,hd] per layer
            kv_out: list = []
            out = self.stage.decode(x, past, past_lengths, kv_out)       # [B,1,H] / [B,1,V]
            self.kv.append(cmd.seq_ids, kv_out)
            if self._last:
                positions = (past_lengths + 1).tolist()                  # of the tokens drawn now
                draws = sample(out[:, 0], cmd.sampling, positions, cmd.history)
        hidden = None if self._last else out.to("cpu", copy=True)
        return DecodeResult(cmd.iter_id, hidden=hidden, next_tokens=None if draws is None else draws.tokens,
                            compute_s=t.s, logprobs=None if draws is None else draws.logprobs)

    # ------------------------------------------------------------ memory moves
    def _free(self, cmd: Free) -> FreeResult:
        freed = self.kv.free(cmd.seq_ids)
        for batch_id in cmd.batch_ids:
            stash = self.stashes.pop(batch_id, None)
            freed += stash.nbytes if stash is not None else 0
        return FreeResult(freed)

    def _move(self, kind: str, keys: tuple[int, ...], to_host: bool) -> MoveResult:
        with _Timer(self.device) as t:
            if kind == "kv":
                moved = self.kv.offload(keys) if to_host else self.kv.reload(keys)
            elif kind == "act":
                moved = sum(self._stash(k).move(to_host, self.device) for k in keys)
            else:
                raise ValueError(f"unknown kind {kind!r}: 'kv' or 'act'")
        return MoveResult(kind, tuple(keys), moved, compute_s=t.s)

    def _offload(self, cmd: Offload) -> MoveResult:
        return self._move(cmd.kind, cmd.keys, to_host=True)

    def _reload(self, cmd: Reload) -> MoveResult:
        return self._move(cmd.kind, cmd.keys, to_host=False)

    # ------------------------------------------------------------ weights and memory
    def _shared_state(self) -> dict[str, torch.Tensor]:
        own = self.stage.state_dict()
        return {k: own[k] for k in self.shared_keys}

    def _get_weights(self, cmd: GetWeights) -> WeightsResult:
        state = {k: v.detach().to("cpu", copy=True) for k, v in self._shared_state().items()}
        return WeightsResult(state, self.version)

    def _set_weights(self, cmd: SetWeights) -> VersionResult:
        self._check_no_pending("weight overwrite")
        own = self._shared_state()
        if set(own) != set(cmd.state_dict):
            missing, extra = set(own) - set(cmd.state_dict), set(cmd.state_dict) - set(own)
            raise KeyError(f"state_dict mismatch: missing {sorted(missing)}, unexpected {sorted(extra)}")
        with torch.no_grad(), _Timer(self.device) as t:
            for key, tensor in own.items():
                tensor.copy_(cmd.state_dict[key])
            self.optimizer.weights_changed()
        if cmd.version is not None:
            self.version = cmd.version
        return VersionResult(self.version, compute_s=t.s)

    def meta(self) -> dict:
        """What a checkpoint of this stage needs to be read back without the run's config."""
        st = self.stage
        return {"adapt": dataclasses.asdict(st.adapt), "base": dict(st.base_ref),
                "layers": [st.layer_start, st.layer_end], "hf_names": dict(st.hf_names),
                "shared_keys": list(self.shared_keys)}

    def _get_state(self, cmd: GetState) -> StateResult:
        """Weights + optimizer state; gradients accumulated but not yet stepped are not included."""
        def cpu(x):
            if torch.is_tensor(x):
                return x.detach().to("cpu", copy=True)
            if isinstance(x, dict):
                return {k: cpu(v) for k, v in x.items()}
            if isinstance(x, (list, tuple)):
                return type(x)(cpu(v) for v in x)
            return x
        with _Timer(self.device) as t:
            weights = cpu(self._shared_state())
            optim = cpu(self.optimizer.state_dict())
        return StateResult(weights, optim, self.version, compute_s=t.s, meta=self.meta())

    def _set_state(self, cmd: SetState) -> VersionResult:
        self._set_weights(SetWeights(cmd.weights, cmd.version))
        with _Timer(self.device) as t:
            # a private copy (the caller keeps its own); load_state_dict moves it onto the device
            self.optimizer.load_state_dict(copy.deepcopy(cmd.optimizer))
            self.optimizer.zero_grad()
        return VersionResult(self.version, compute_s=t.s)

    def _memory(self, cmd: Memory) -> MemoryState:
        weights = sum(t.nbytes for t in chain(self.stage.parameters(), self.stage.buffers()))
        grads = sum(p.grad.nbytes for p in self.stage.parameters() if p.grad is not None)
        optim = grads + self.optimizer.state_bytes
        kv = self.kv.device_bytes()
        act = sum(s.nbytes for s in self.stashes.values() if not s.on_host)
        host = self.kv.host_bytes() + sum(s.nbytes for s in self.stashes.values() if s.on_host)
        if self.device.type == "cuda":
            allocated = torch.cuda.memory_allocated(self.device)
        else:
            allocated = weights + optim + kv + act
        return MemoryState(weights, optim, kv, act, host, self.memory_budget_bytes, allocated)
