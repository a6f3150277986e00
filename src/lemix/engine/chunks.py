"""Chunked training ops on a stage worker (bounded blocking, lemix.sched.chunking).

A Forward or Backward with `layers = (lo, hi)` runs only the stage's own layers [lo, hi) of a
training micro-batch: forward chunks in ascending order, backward chunks over the same ranges in
descending order, so inference can run on the device between them. The worker keeps, per
micro-batch, one `ChunkedStash`: the activations every chunk saved for its backward (one list,
as ActivationStash, so offload/reload/free work unchanged), each chunk's input leaf and output,
the chunk-boundary activation (the last forward chunk's output, the next chunk's input) and,
during the backward, the gradient at the boundary below the last backward chunk. A backward
chunk drops what its chunk saved, so memory follows the chunks.

Messages: the first forward chunk (lo = 0) carries the stage input as an unchunked Forward does;
the others carry none. The last forward chunk (hi = the stage's layer count) returns the hidden
states for the next stage (or computes the loss on the last stage). The first backward chunk
(the top one) takes the next stage's grad_output; the last (lo = 0) returns grad_input.
Gradients equal the unchunked backward's: the chunks are the same computation, cut at layer
boundaries.

Several chunks as one op (adaptive chunks, while the node serves nothing): a Forward over
[lo, hi) with `cuts` runs the chunks [lo, c1), [c1, c2), ..., [ck, hi) one after the other and
keeps each one's input leaf and output as if each were its own op, so a backward may cover any
run of consecutive chunks (its range's top must be where the previous backward stopped, its
bottom a chunk's start): it backpropagates through them top down, each chunk's input gradient
feeding the one below. Forward and backward choose their runs independently.
"""
from __future__ import annotations

import torch

from lemix.engine.blocks import AttnContext, rotary_tables
from lemix.engine.messages import Backward, BackwardResult, Forward, ForwardResult
from lemix.engine.stage import causal_lm_loss, mask_labels
from lemix.engine.stash import ActivationStash, _copy_tensors, _placeholder


class ChunkedStash(ActivationStash):
    """ActivationStash of a micro-batch whose stage ops run as chunks of layers."""

    def __init__(self, param_storages: set[int], lengths: torch.Tensor):
        super().__init__(param_storages)
        self.lengths = lengths
        # per chunk, by its first layer: (input leaf, output, its span of `saved`, its end layer)
        self.io: dict[int, tuple[torch.Tensor | None, torch.Tensor, int, int, int]] = {}
        self.boundary: torch.Tensor | None = None    # output of the last forward chunk
        self.next_lo = 0                             # the forward chunk due next starts here
        self.grad_above: torch.Tensor | None = None  # d loss / d (input of the last backward chunk)
        self.bwd_hi: int | None = None               # the backward chunk due next ends here

    @property
    def nbytes(self) -> int:
        live = [t for t in self.saved if t is not None]
        if self.boundary is not None:
            live.append(self.boundary)
        storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in live}
        return sum(storages.values())

    def move(self, to_host: bool, device) -> int:
        if to_host == self.on_host:
            raise RuntimeError(f"stash is already on {'host' if to_host else 'device'}")
        idx = [i for i, t in enumerate(self.saved) if t is not None]
        copies = _copy_tensors([self.saved[i] for i in idx], "cpu" if to_host else device)
        for i, t in zip(idx, copies):
            self.saved[i] = t
        self.on_host = to_host
        return self.nbytes


def run_layers(stage, x: torch.Tensor, lengths: torch.Tensor, lo: int, hi: int,
               embed: bool | None = None) -> torch.Tensor:
    """StageModule.forward over its own layers [lo, hi) only: embeddings first on the first
    stage (for the first chunk: `embed`, default lo == 0), norm and head after the last layer on
    the last stage."""
    B, T = x.shape[:2]
    pos = torch.arange(T, device=x.device)
    positions = pos.expand(B, T)
    key_valid = pos[None, :] < lengths[:, None]
    causal = torch.ones(T, T, dtype=torch.bool, device=x.device).tril()
    ctx = AttnContext(mask=causal[None, None] & key_valid[:, None, None, :], past=None, new_kv=None)
    h = stage._embed(x, positions) if stage.is_first and (lo == 0 if embed is None else embed) else x
    if stage.cfg.family == "llama":
        ctx.cos, ctx.sin = rotary_tables(positions, stage.inv_freq, stage.cfg.rope_attention_scale, h.dtype)
    for i in range(lo, hi):
        h = stage.blocks[i](h, ctx, i)
    if stage.is_last and hi == stage.num_layers:
        h = stage.lm_head(stage.norm(h))
    return h


def _check_range(worker, layers: tuple, of_layers: int, what: str) -> tuple[int, int, int, int]:
    """(lo, hi) in the scheduler's units and the stage's own layers [lo', hi') they map to:
    a range of `of_layers` scaled to the stage's L (the virtual clock plans chunks on a modeled
    profile; a chunk may then cover no real layer and only pass its input on; the last maps to
    the last layer, the first to the stage input)."""
    lo, hi = layers
    L = worker.stage.num_layers
    total = of_layers or L
    if not 0 <= lo < hi <= total:
        raise ValueError(f"{what} chunk {layers} is not within stage {worker.stage_index}'s "
                         f"{total} layers")
    return lo, hi, lo * L // total, hi * L // total


def _check_cuts(cmd: Forward, lo: int, hi: int) -> tuple[int, ...]:
    """The chunk boundaries of a forward op: lo, its cuts (ascending, inside it), hi."""
    cuts = tuple(cmd.cuts)
    if any(not a < b for a, b in zip((lo, *cuts), (*cuts, hi))):
        raise ValueError(f"forward chunk {cmd.layers}: cuts {cuts} are not ascending inside it")
    return (lo, *cuts, hi)


def chunk_forward(worker, cmd: Forward, timer) -> ForwardResult:
    """A training forward over layers cmd.layers of the stage, one chunk after the other when
    it covers several (`cmd.cuts`; see the module doc)."""
    lo, hi, _, _ = _check_range(worker, cmd.layers, cmd.of_layers, "forward")
    L = cmd.of_layers or worker.stage.num_layers
    if not cmd.train:
        raise ValueError("only training forwards run in chunks")
    bounds = _check_cuts(cmd, lo, hi)
    if lo == 0:
        if cmd.batch_id in worker.stashes:
            raise ValueError(f"micro-batch {cmd.batch_id} already has a pending backward")
        x = worker._input(cmd.input_ids, cmd.hidden)
        lengths = torch.tensor(cmd.lengths, device=worker.device)
        params = {p.untyped_storage().data_ptr() for p in worker.stage.parameters()}
        stash = worker.stashes[cmd.batch_id] = ChunkedStash(params, lengths)
    else:
        stash = worker.stashes.get(cmd.batch_id)
        if not isinstance(stash, ChunkedStash) or stash.next_lo != lo or stash.boundary is None:
            raise ValueError(f"micro-batch {cmd.batch_id}: forward chunk {cmd.layers} out of order")
        if stash.on_host:
            raise RuntimeError(f"micro-batch {cmd.batch_id}: activations are offloaded; reload first")
        x = stash.boundary
        lengths = stash.lengths
    labels = None
    if worker._last and hi == L:
        if cmd.labels is None:
            raise ValueError("the last stage needs labels for a training forward")
        labels = mask_labels(cmd.labels.to(worker.device, dtype=torch.long), lengths)
    loss = None
    with timer(worker.device) as t:
        for a, b in zip(bounds, bounds[1:]):
            x, loss = _forward_chunk(worker, stash, x, lengths, a, b, L, labels if b == L else None,
                                     cmd.loss_scale)
    hidden = None
    if hi < L:
        stash.boundary = x                     # the next op's input (keeps the data)
    else:
        stash.boundary = None
        if not worker._last:
            hidden = x.to("cpu", copy=True)
    return ForwardResult(cmd.batch_id, hidden=hidden, loss=None if loss is None else float(loss.detach()),
                         compute_s=t.s)


def _forward_chunk(worker, stash: ChunkedStash, x: torch.Tensor, lengths: torch.Tensor, lo: int, hi: int,
                   L: int, labels: torch.Tensor | None, loss_scale: float):
    """One chunk [lo, hi) (of L) of a training forward: returns its output, detached (the
    next chunk's input), and the loss when it ends the last stage. The chunk's input leaf and
    output are kept in stash.io for its backward, without their memory."""
    _, _, rlo, rhi = _check_range(worker, (lo, hi), L, "forward")
    first_chunk = lo == 0
    inp = None if (first_chunk and worker._first) else x.requires_grad_()
    first_saved = len(stash.saved)
    loss = None
    with stash.hooks():
        out = run_layers(worker.stage, x, lengths, rlo, rhi, embed=first_chunk) \
            if first_chunk or rlo < rhi else x
        if labels is not None:
            loss = causal_lm_loss(out, labels)
            out = loss * loss_scale
    nxt = out.detach()
    stash.io[lo] = (inp, out, first_saved, len(stash.saved), hi)
    stash.next_lo = hi
    if inp is not None:
        inp.data = _placeholder(inp)           # its data lives on in the saved tensors if needed
    if out.dim() > 0:
        out.data = _placeholder(out)
    return nxt, loss


def chunk_backward(worker, cmd: Backward, timer) -> BackwardResult:
    """A backward over layers cmd.layers of the stage, top chunk first: the chunks the
    forward kept inside that range, each in turn (see the module doc)."""
    lo, hi, _, _ = _check_range(worker, cmd.layers, cmd.of_layers, "backward")
    L = cmd.of_layers or worker.stage.num_layers
    stash = worker._stash(cmd.batch_id)
    if not isinstance(stash, ChunkedStash) or stash.next_lo != L \
            or (stash.bwd_hi if stash.bwd_hi is not None else L) != hi:
        raise ValueError(f"micro-batch {cmd.batch_id}: backward chunk {cmd.layers} out of order")
    starts = {entry[4]: start for start, entry in stash.io.items()}   # a chunk's end -> its start
    chain, at = [], hi
    while at > lo:
        start = starts.get(at)
        if start is None or start < lo:
            raise ValueError(f"micro-batch {cmd.batch_id}: backward chunk {cmd.layers} is not a run of "
                             f"the forward's chunks {sorted((a, e[4]) for a, e in stash.io.items())}")
        chain.append(start)
        at = start
    if stash.on_host:
        raise RuntimeError(f"micro-batch {cmd.batch_id}: activations are offloaded; reload first")
    top = hi == L
    if top and worker._last != (cmd.grad_output is None):
        raise ValueError("grad_output must be None exactly on the last stage")
    if not top and cmd.grad_output is not None:
        raise ValueError("only the top backward chunk takes the next stage's grad_output")
    if top:
        grad = None if worker._last else cmd.grad_output.to(worker.device, dtype=stash.io[chain[0]][1].dtype)
    else:
        grad = stash.grad_above
    spent = []
    with timer(worker.device) as t:
        for start in chain:
            inp, out, s0, s1, _ = stash.io.pop(start)
            torch.autograd.backward(out, grad)     # accumulates .grad
            spent.append((s0, s1))
            grad = None if inp is None else inp.grad
    for s0, s1 in spent:                       # these chunks' activations are spent
        for i in range(s0, s1):
            stash.saved[i] = None
    stash.bwd_hi = lo
    if lo > 0:
        stash.grad_above = grad
        return BackwardResult(cmd.batch_id, grad_input=None, compute_s=t.s)
    del worker.stashes[cmd.batch_id]
    grad_in = None if worker._first else grad.to("cpu", copy=True)
    return BackwardResult(cmd.batch_id, grad_input=grad_in, compute_s=t.s)
