"""The memory gate (Algorithm 2, wait-or-offload) and the memory each op needs.

An op whose bytes would take the device over kappa x capacity waits for running ops to free
memory, up to T_max; then the device offloads stashed activations / KV cache of work that does
not need them next (one victim per OFFLOAD op, paying bytes / host bandwidth) and reloads them
before they are used. Nothing is dropped. Without the gate (`--no-memory-check`) an op that does
not fit in capacity fails with OOM, as on a real device.

The gate owns the KV bytes each sequence holds per stage; the device byte counters live on
Device (state.py) and every change to them for offload, reload and frees is made here.
"""
from __future__ import annotations

import enum
from typing import NamedTuple

from lemix.sched.cluster import Cluster
from lemix.sched.chunking import chunk_stash_bytes, mid_stage, stash_bytes
from lemix.sched.latency import Profile, StageProfile
from lemix.sched.outputs import Recorder
from lemix.sched.params import SchedParams
from lemix.sched.pipeline import PipelineMode
from lemix.sched.order import CandKey, CandKind, Candidate
from lemix.sched.state import Batch, NodeState, Seq
from lemix.types import Event, EventKind, Task


def fwd_need_bytes(st: StageProfile, tokens: int, train: bool, kv_tokens: int) -> int:
    """A forward of `tokens` (batch x padded length) on the stage: its working memory, the
    activations it stashes (training) and the KV cache it writes (`kv_tokens`)."""
    return tokens * st.tmp_bytes_per_token + (tokens * st.act_bytes_per_token if train else 0) \
        + kv_tokens * st.kv_bytes_per_token


def decode_need_bytes(st: StageProfile, seqs: int) -> int:
    """A decode iteration of `seqs` sequences: one token of KV each, and working memory."""
    return seqs * (st.kv_bytes_per_token + st.tmp_bytes_per_token)


class Verdict(enum.Enum):
    RUN = "run"          # it fits: start it
    WAIT = "wait"        # keep waiting for memory (another op may go first)
    OFFLOAD = "offload"  # start the OFFLOAD of `victim` on the device instead
    OOM = "oom"          # no gate and it does not fit: it fails as on a real device


class VictimKind(enum.Enum):
    ACTIVATIONS = "act"   # a training micro-batch's stash
    KV = "kv"             # a sequence's KV cache


class Victim(NamedTuple):
    kind: VictimKind
    obj: Batch | Seq


class GateResult(NamedTuple):
    verdict: Verdict
    victim: Victim | None = None


class Reload(NamedTuple):
    nbytes: int
    objs: tuple   # the Batch, or the Seqs, whose data comes back


_RUN, _WAIT, _OOM = GateResult(Verdict.RUN), GateResult(Verdict.WAIT), GateResult(Verdict.OOM)
# (hot-path aliases: an Enum member lookup per use costs)
_FWD, _BWD, _DECODE, _DECODE_NEW = CandKind.FWD, CandKind.BWD, CandKind.DECODE, CandKind.DECODE_NEW


class MemoryGate:
    def __init__(self, params: SchedParams, profile: Profile, pipe: PipelineMode, cluster: Cluster,
                 rec: Recorder, *, enabled: bool) -> None:
        self.params = params
        self.profile = profile
        self.pipe = pipe
        self.cluster = cluster
        self.rec = rec
        self.enabled = enabled
        self.kv: dict[int, list[int]] = {}   # task_id -> KV bytes its sequence holds per stage
        self.chunker = None   # set by the Scheduler: chunk plans of training ops (chunking.py)

    # ------------------------------------------------------------------ figures
    def too_big(self, task: Task) -> str:
        """A task no device could ever hold, even alone: failed at admission with the reason."""
        for s, st in enumerate(self.profile.stages):
            free = self.params.kappa * self.profile.capacity_bytes - st.weight_bytes
            if task.is_train:
                free -= st.train_state_bytes
                need = fwd_need_bytes(st, task.batch_size * task.prompt_tokens, True, 0)
            else:
                kv = task.prompt_tokens + task.output_tokens if self.params.generate else 0
                need = fwd_need_bytes(st, task.prompt_tokens, False, kv)
            if need > free:
                return (f"task needs {need / 1e9:.2f} GB on stage {s}, more than the "
                        f"{max(free, 0) / 1e9:.2f} GB a device has free")
        return ""

    def need_bytes(self, node: NodeState, s: int, c: Candidate) -> int:
        st = self.profile.stages[s]
        kind, generate = c.kind, self.params.generate
        if kind is _FWD or kind is _BWD:   # (most ops: asked first)
            b: Batch = c.obj
            if kind is _BWD:
                return b.tokens * st.tmp_bytes_per_token
            if b.train and b.chunks:
                return b.tokens * st.tmp_bytes_per_token + chunk_stash_bytes(b, s, st.act_bytes_per_token)
            kv = sum(t.prompt_tokens for t in b.tasks) if generate and not b.train else 0
            return fwd_need_bytes(st, b.tokens, b.train, kv)
        if kind is _DECODE:
            return decode_need_bytes(st, len(c.obj.seq_ids))
        if kind is _DECODE_NEW:
            return decode_need_bytes(st, len(node.decode_set(self.params.max_batch)))
        if kind is CandKind.INFER_NEW:
            tasks = node.infer_wait[: self.params.max_batch]
            kv = sum(t.prompt_tokens for t in tasks) if generate else 0
            return fwd_need_bytes(st, len(tasks) * max(t.prompt_tokens for t in tasks), False, kv)
        if kind is CandKind.TRAIN_NEW:
            t = node.train_wait[0]
            plan = self.chunker.plan(t.batch_size, t.prompt_tokens) if self.chunker else ()
            if plan:   # bounded blocking: the first op stashes its chunks' layers' share
                tokens = t.batch_size * t.prompt_tokens
                upto = plan[s][self.chunker.new_span(node, s, t)]
                return tokens * st.tmp_bytes_per_token + (tokens * st.act_bytes_per_token * upto
                                                          // plan[s][-1])
            return fwd_need_bytes(st, t.batch_size * t.prompt_tokens, True, 0)
        raise ValueError(f"no memory need for a {kind.value} candidate")

    # ------------------------------------------------------------------ the gate
    def check(self, node: NodeState, s: int, now: float, key: CandKey, need: int) -> GateResult:
        """RUN if `need` bytes fit; else wait up to T_max, then OFFLOAD a victim; OOM when the
        gate is off and the op does not fit the device; WAIT to keep waiting."""
        dev = node.devices[s]
        if not self.enabled:
            return _RUN if dev.used_bytes + need <= dev.capacity_bytes else _OOM
        if dev.used_bytes + need <= self.params.kappa * dev.capacity_bytes:
            if dev.wait_key == key:
                dev.wait_key, dev.wait_since_s = None, None
            return _RUN
        if dev.wait_key is not None and dev.wait_key != key:
            return _WAIT  # another op is the one waiting on this device; it goes first
        if dev.wait_since_s is None:
            dev.wait_key, dev.wait_since_s = key, now
        deadline = dev.wait_since_s + self.params.t_max_s  # the same float as the wake-up
        if now < deadline:
            self.cluster.wait_until(node, deadline)
            return _WAIT
        victim = self._pick_victim(node, s)
        if victim is not None:
            return GateResult(Verdict.OFFLOAD, victim)
        if self._memory_will_free(node, s):
            self.cluster.wait(node)
            return _WAIT
        # nothing can be freed or offloaded: run rather than drop, and say so
        self.rec.event(Event(now, EventKind.MEMORY_OVERCOMMIT, node.index, s, bytes=need,
                             error=f"{dev.used_bytes} bytes in use"))
        dev.wait_key, dev.wait_since_s = None, None
        return _RUN

    def _memory_will_free(self, node: NodeState, s: int) -> bool:
        """A running op will end, or a backward due on this device fits the gate now and will
        free its stash. (A stash whose backward itself waits on memory frees nothing: waiting on
        it deadlocked the node.)"""
        if any(d.running is not None for d in node.devices):
            return True
        dev, st = node.devices[s], self.profile.stages[s]
        room = self.params.kappa * dev.capacity_bytes - dev.used_bytes
        return any(b.train and b.fwd_done and b.bwd_next == s and s in b.stash_stages
                   and s not in b.offloaded_stages and b.tokens * st.tmp_bytes_per_token <= room
                   and (mid_stage(b) or self.pipe.can_bwd(node, b, s))   # GPipe may hold it
                   for b in node.batches.values())

    def _pick_victim(self, node: NodeState, s: int) -> Victim | None:
        """The resident data on stage s needed furthest in the future: a training stash whose
        backward is not next, else the KV of a sequence not in the next decode iteration."""
        best, best_key = None, None
        for b in node.batches.values():
            if not b.train or b.running or s not in b.stash_stages or s in b.offloaded_stages:
                continue
            if mid_stage(b) and (b.bwd_next if b.fwd_done else b.fwd_next) == s:
                continue  # part-way through its chunks on this stage: it is the work running here
            if b.fwd_done and b.bwd_next == s and self.pipe.can_bwd(node, b, s):
                continue  # its backward runs next here (GPipe holds it until the round's forwards)
            key = (0 if not b.fwd_done else 1, -(b.bwd_next if b.fwd_done else node.num_stages) + s, b.bid)
            if best_key is None or key < best_key:
                best, best_key = b, key
        if best is not None:
            return Victim(VictimKind.ACTIVATIONS, best)
        active = set(node.decode.seq_ids) if node.decode else set(node.decode_set(self.params.max_batch))
        for tid, seq in node.seqs.items():
            if tid not in active and s not in seq.offloaded_stages and self.kv[tid][s] > 0:
                return Victim(VictimKind.KV, seq)
        return None

    # ------------------------------------------------------------------ offload / reload
    def offload_bytes(self, victim: Victim, s: int) -> int:
        """Mark the victim's data on stage s as moving to host; the bytes it moves."""
        obj = victim.obj
        obj.offloaded_stages.add(s)
        if victim.kind is VictimKind.ACTIVATIONS:
            return stash_bytes(obj, s, self.profile.stages[s].act_bytes_per_token)
        return self.kv[obj.task.task_id][s]

    def reload_needed(self, node: NodeState, s: int, c: Candidate) -> Reload | None:
        """What to bring back to stage s before this candidate can run, or None."""
        kind = c.kind
        if kind is _FWD:
            return None   # (a forward brings nothing back; the common case, asked first)
        if kind is _BWD and s in c.obj.offloaded_stages:
            return Reload(stash_bytes(c.obj, s, self.profile.stages[s].act_bytes_per_token), (c.obj,))
        if kind is _DECODE or kind is _DECODE_NEW:
            ids = c.obj.seq_ids if kind is _DECODE else node.decode_set(self.params.max_batch)
            seqs = tuple(node.seqs[t] for t in ids if s in node.seqs[t].offloaded_stages)
            if seqs:
                return Reload(sum(self.kv[q.task.task_id][s] for q in seqs), seqs)
        return None

    def offload_done(self, node: NodeState, s: int, nbytes: int) -> None:
        dev = node.devices[s]
        dev.held_bytes -= nbytes
        dev.host_bytes += nbytes

    def reload_done(self, node: NodeState, s: int, reload: Reload) -> None:
        node.devices[s].host_bytes -= reload.nbytes
        for obj in reload.objs:
            obj.offloaded_stages.discard(s)

    # ------------------------------------------------------------------ frees
    def free_kv(self, node: NodeState, seq: Seq) -> None:
        """A sequence's KV cache leaves every stage (device or host)."""
        kv = self.kv[seq.task.task_id]
        for j, d in enumerate(node.devices):
            if j in seq.offloaded_stages:
                d.host_bytes -= kv[j]
            else:
                d.held_bytes -= kv[j]
            kv[j] = 0

    def free_batch(self, node: NodeState, b: Batch) -> None:
        """A dropped micro-batch's memory leaves every stage: its stashes, its prefill KV."""
        for s in b.stash_stages:
            d = node.devices[s]
            nbytes = stash_bytes(b, s, self.profile.stages[s].act_bytes_per_token)
            if s in b.offloaded_stages:
                d.host_bytes -= nbytes
            else:
                d.held_bytes -= nbytes
        b.stash_stages.clear()
        if not b.train and self.params.generate:
            for t in b.tasks:
                kv = self.kv.get(t.task_id)
                if kv:
                    for j, d in enumerate(node.devices):
                        d.held_bytes -= kv[j]
