"""The autograd state of one training micro-batch on one stage, held so that it can move.

How activations are stashed: while the training forward runs, `saved_tensors_hooks` routes every
tensor autograd saves for the backward (parameters excepted) into `ActivationStash.saved`; the
graph itself keeps only an index into that list. So the stash is the single owner of the
activation memory: it can count the bytes exactly (one count per underlying storage), copy
them to host memory (offload) and back (reload) bit for bit, and the backward reads whatever
copy is current. The stage input and output tensors kept for `backward()` get a 1-element
placeholder as data, since backward needs only their autograd identity and shape.

With recompute (gradient checkpointing of the whole stage) the forward builds no graph: the
stash keeps only the stage input (and the labels on the last stage) in `saved`, and the
backward runs the forward again with autograd on before backpropagating. Offload and reload
move those tensors the same way.
"""
from __future__ import annotations

import torch


def _placeholder(t: torch.Tensor) -> torch.Tensor:
    """A tensor of t's shape, dtype and device that holds a single element."""
    return torch.zeros(1, dtype=t.dtype, device=t.device).expand(t.shape)


def _copy_tensors(tensors: list[torch.Tensor], device) -> list[torch.Tensor]:
    """Copy tensors to `device`, one copy per storage, rebuilding views on the copies."""
    copies: dict[int, torch.UntypedStorage] = {}
    out = []
    for t in tensors:
        src = t.untyped_storage()
        dst = copies.get(src.data_ptr())
        if dst is None:
            dst = copies[src.data_ptr()] = torch.UntypedStorage(src.nbytes(), device=device)
            dst.copy_(src)
        view = torch.empty(0, dtype=t.dtype, device=device)
        out.append(view.set_(dst, t.storage_offset(), t.size(), t.stride()))
    return out


class ActivationStash:
    """Saved tensors of one micro-batch's forward on one stage, until its backward."""

    def __init__(self, param_storages: set[int]):
        self._params = param_storages     # data_ptrs of parameter storages: never stashed
        self.saved: list[torch.Tensor] = []
        self.inp: torch.Tensor | None = None   # stage input leaf (for its .grad); None on stage 0
        self.out: torch.Tensor | None = None   # what backward starts from (scaled loss or hidden)
        self.on_host = False
        self.recompute: tuple | None = None    # (lengths, loss_scale): replay the forward

    def keep_input(self, x: torch.Tensor, lengths: torch.Tensor, labels: torch.Tensor | None,
                   loss_scale: float) -> None:
        """Recompute mode: hold the stage input (and labels), nothing else, until backward."""
        self.saved = [x.detach()] + ([labels] if labels is not None else [])
        self.recompute = (lengths, loss_scale)

    def hooks(self):
        """Context manager: run the training forward inside it."""
        return torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack)

    def _pack(self, t: torch.Tensor):
        if t.untyped_storage().data_ptr() in self._params:
            return t                      # weights stay with the module
        self.saved.append(t.detach())     # a new handle on the same storage
        return len(self.saved) - 1

    def _unpack(self, handle):
        if isinstance(handle, torch.Tensor):
            return handle
        if self.on_host:
            raise RuntimeError("stashed activations are offloaded to host; reload before backward")
        return self.saved[handle]

    def hold(self, inp: torch.Tensor | None, out: torch.Tensor) -> None:
        """Keep the input leaf and output for backward, without keeping their memory."""
        self.inp, self.out = inp, out
        if inp is not None:
            inp.data = _placeholder(inp)
        if out.dim() > 0:
            out.data = _placeholder(out)

    @property
    def nbytes(self) -> int:
        storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in self.saved}
        return sum(storages.values())

    def move(self, to_host: bool, device) -> int:
        """Copy the saved tensors to host (or back to `device`). Returns the bytes moved."""
        if to_host == self.on_host:
            raise RuntimeError(f"stash is already on {'host' if to_host else 'device'}")
        self.saved = _copy_tensors(self.saved, "cpu" if to_host else device)
        self.on_host = to_host
        return self.nbytes
