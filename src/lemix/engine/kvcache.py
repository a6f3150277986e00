"""Per-sequence KV cache of one stage, with a host store for offloaded sequences.

Each sequence owns K and V tensors [L, nkv, capacity, hd] for the stage's L layers. Capacity
grows in blocks of BLOCK_TOKENS so a decode step rarely reallocates, and the byte count stays
within one block of the exact per-token size the memory model assumes.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

BLOCK_TOKENS = 16


def _capacity(tokens: int) -> int:
    return max(BLOCK_TOKENS, -(-tokens // BLOCK_TOKENS) * BLOCK_TOKENS)


@dataclass
class SeqKV:
    k: torch.Tensor   # [L,nkv,cap,hd]
    v: torch.Tensor   # [L,nkv,cap,hd]
    length: int       # valid tokens

    @property
    def nbytes(self) -> int:
        return self.k.nbytes + self.v.nbytes

    def resized(self, capacity: int, device) -> SeqKV:
        """A copy holding the valid tokens in a fresh buffer of `capacity` tokens on `device`."""
        L, nkv, _, hd = self.k.shape
        k = torch.zeros(L, nkv, capacity, hd, dtype=self.k.dtype, device=device)
        v = torch.zeros_like(k)
        k[:, :, :self.length].copy_(self.k[:, :, :self.length])
        v[:, :, :self.length].copy_(self.v[:, :, :self.length])
        return SeqKV(k, v, self.length)


class KVCache:
    """KV of the sequences this stage has prefilled, keyed by sequence id."""

    def __init__(self, device: torch.device | str):
        self.device = torch.device(device)
        self.on_device: dict[int, SeqKV] = {}
        self.on_host: dict[int, SeqKV] = {}

    # ------------------------------------------------------------ accounting
    def device_bytes(self) -> int:
        return sum(s.nbytes for s in self.on_device.values())

    def host_bytes(self) -> int:
        return sum(s.nbytes for s in self.on_host.values())

    def __contains__(self, seq_id: int) -> bool:
        return seq_id in self.on_device or seq_id in self.on_host

    def _get(self, seq_id: int) -> SeqKV:
        if seq_id in self.on_device:
            return self.on_device[seq_id]
        if seq_id in self.on_host:
            raise KeyError(f"sequence {seq_id}: KV is offloaded to host; reload it first")
        raise KeyError(f"sequence {seq_id} has no KV on this stage")

    # ------------------------------------------------------------ writes
    def write_prefill(self, seq_ids, lengths, new_kv) -> None:
        """Store each sequence's first `length` tokens; new_kv per layer (k, v) [B,nkv,T,hd]."""
        k_all = torch.stack([k for k, _ in new_kv])       # [L,B,nkv,T,hd]
        v_all = torch.stack([v for _, v in new_kv])
        for b, (sid, n) in enumerate(zip(seq_ids, lengths)):
            if sid in self:
                raise ValueError(f"sequence {sid} already has KV on this stage; free it first")
            seq = SeqKV(k_all[:, b, :, :n], v_all[:, b, :, :n], n)
            self.on_device[sid] = seq.resized(_capacity(n), self.device)

    def append(self, seq_ids, new_kv) -> None:
        """Add one decoded token per sequence; new_kv per layer (k, v) [B,nkv,1,hd]."""
        k_all = torch.stack([k for k, _ in new_kv])[:, :, :, 0]   # [L,B,nkv,hd]
        v_all = torch.stack([v for _, v in new_kv])[:, :, :, 0]
        for b, sid in enumerate(seq_ids):
            seq = self._get(sid)
            if seq.length == seq.k.shape[2]:
                seq = self.on_device[sid] = seq.resized(_capacity(seq.length + 1), self.device)
            seq.k[:, :, seq.length] = k_all[:, b]
            seq.v[:, :, seq.length] = v_all[:, b]
            seq.length += 1

    # ------------------------------------------------------------ reads
    def gather(self, seq_ids) -> tuple[list[tuple[torch.Tensor, torch.Tensor]], torch.Tensor]:
        """Right-padded cached K,V per layer [B,nkv,P,hd] (P = longest), and lengths [B]."""
        seqs = [self._get(sid) for sid in seq_ids]
        L, nkv, _, hd = seqs[0].k.shape
        P = max(s.length for s in seqs)
        k = torch.zeros(L, len(seqs), nkv, P, hd, dtype=seqs[0].k.dtype, device=self.device)
        v = torch.zeros_like(k)
        for b, s in enumerate(seqs):
            k[:, b, :, :s.length] = s.k[:, :, :s.length]
            v[:, b, :, :s.length] = s.v[:, :, :s.length]
        lengths = torch.tensor([s.length for s in seqs], device=self.device)
        return [(k[i], v[i]) for i in range(L)], lengths

    def lengths(self, seq_ids) -> list[int]:
        return [self._get(sid).length for sid in seq_ids]

    # ------------------------------------------------------------ moves
    def free(self, seq_ids) -> int:
        """Drop KV (device or host); unknown ids are ignored. Returns the bytes released."""
        freed = 0
        for sid in seq_ids:
            for store in (self.on_device, self.on_host):
                seq = store.pop(sid, None)
                freed += seq.nbytes if seq is not None else 0
        return freed

    def offload(self, seq_ids) -> int:
        """Copy the valid tokens to host memory and release the device buffers. Returns bytes."""
        moved = 0
        for sid in seq_ids:
            seq = self._get(sid)
            host = seq.resized(seq.length, "cpu")
            self.on_host[sid] = host
            del self.on_device[sid]
            moved += host.nbytes
        return moved

    def reload(self, seq_ids) -> int:
        """Copy offloaded sequences back to the device. Returns bytes."""
        moved = 0
        for sid in seq_ids:
            if sid not in self.on_host:
                raise KeyError(f"sequence {sid} has no offloaded KV on this stage")
            host = self.on_host.pop(sid)
            self.on_device[sid] = host.resized(_capacity(host.length), self.device)
            moved += host.nbytes
        return moved
