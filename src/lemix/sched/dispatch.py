"""Per-device dispatch: which op an idle device runs next, the memory gate, and what a finished
op changes. Part of the Scheduler (a base class, to keep each file a readable size).

Order on a device (lower first): a pending weight sync; a due optimizer step; then, with
inference-first dispatch (lemix), inference (decode, prefill) before training backward before
training forward; otherwise first-ready-first-served.

Memory gate (Algorithm 2, wait-or-offload): an op whose bytes would take the device over
kappa x capacity waits for running ops to free memory, up to T_max; then the device offloads
stashed activations / KV cache of work that does not need them next (one victim per OFFLOAD op,
paying bytes / host bandwidth) and reloads them before they are used. Nothing is dropped.
Without the gate (`--no-memory-check`) an op that does not fit in capacity fails with OOM, as
on a real device.
"""
from __future__ import annotations

import math

from lemix.sched.state import SYNC_AVERAGE, SYNC_NONE, Batch, DecodeIter, NodeState, Seq
from lemix.types import (Applied, Event, EventKind, Op, OpKind, OpRecord, OpResult, RequestRecord, SyncSpec,
                         Task, TrainStepRecord, TrainTaskRecord)

_SYNC, _OPTIM, _INF, _BWD, _FWD, _NEW, _STARVED_INF = 0, 1, 2, 3, 4, 5, 6
_SHARE_WINDOW_S = 10.0   # time constant of the training-share window
MAX_TRAIN_ATTEMPTS = 3   # a training task whose op failed is trained again, up to this many tries


class Dispatcher:
    # attributes provided by Scheduler: params, profile, clock, lat, pipe, nodes, result, policy,
    # memory_check, infer_first, _tasks, _resolved, _owed, _wakeups, _version_first_s, ...

    def _init_dispatch(self) -> None:
        self._touched: set[int] = set(range(len(self.nodes)))
        self._idle_nodes: set[int] = set()                  # see Scheduler.idle_nodes
        self._idle_check: set[int] = set(range(len(self.nodes)))
        self._waiting_nodes: set[int] = set()
        self._running: dict[int, tuple] = {}        # op_id -> (op, context)
        self._next_op = 0
        self._next_bid = 0
        self._node_of: dict[int, int] = {}
        self._served: dict[int, tuple] = {}          # task_id -> (version, stale_steps, stale_s, first_token_s)
        self._deferred_s: dict[int, float] = {}
        self._kv: dict[int, list[int]] = {}          # task_id -> KV bytes held per stage
        self._unstepped: dict[int, list[Task]] = {}  # node -> trained tasks its next step applies
        self._cancelled: set[int] = set()            # ops of failed nodes; their results are ignored
        self._attempts: dict[int, int] = {}          # training task -> tries (after a failed op)

    def _touch(self, node: NodeState) -> None:
        node.dirty = True
        self._touched.add(node.index)
        self._idle_check.add(node.index)

    # ------------------------------------------------------------------ candidates
    def _classes(self, starved: bool = False) -> tuple[int, int, int, int]:
        if self.infer_first and starved:
            return _STARVED_INF, _BWD, _FWD, _NEW   # training goes first until its share recovers
        if self.infer_first:
            return _INF, _BWD, _FWD, _NEW
        return _INF, _INF, _INF, _INF

    def _training_starved(self, dev, now: float) -> bool:
        """Inference-first dispatch must not starve training: below min_train_share of the
        device's recent busy time (a decayed window), training ops go first."""
        self._decay(dev, now)
        return dev.busy_ewma_s > 0 and dev.train_ewma_s < self.params.min_train_share * dev.busy_ewma_s

    @staticmethod
    def _decay(dev, now: float) -> None:
        if now > dev.ewma_at_s:
            k = math.exp(-(now - dev.ewma_at_s) / _SHARE_WINDOW_S)
            dev.busy_ewma_s *= k
            dev.train_ewma_s *= k
            dev.ewma_at_s = now

    @staticmethod
    def _due_stages(node: NodeState) -> dict[int, list[Batch]]:
        """The node's batches by the stage their next op is due on (one pass per dispatch,
        so a device looks only at its own)."""
        due: dict[int, list[Batch]] = {}
        for b in node.batches.values():
            s = b.bwd_next if b.train and b.fwd_done else b.fwd_next
            due.setdefault(s, []).append(b)
        return due

    def _candidates(self, node: NodeState, s: int, now: float,
                    due: dict[int, list[Batch]] | None = None) -> list[tuple]:
        dev = node.devices[s]
        syncing = dev.sync_pending != SYNC_NONE
        if syncing and not self._stash_on(node, s):
            return [((_SYNC, 0.0, 0, 0), "sync", None)]  # never under a pending backward
        starved = self.infer_first and self._training_starved(dev, now)
        c_inf, c_bwd, c_fwd, c_new = self._classes(starved)
        out = []
        if dev.grads_pending and self.pipe.step_due(node, s) and not self._stash_on(node, s):
            out.append(((_OPTIM, 0.0, 0, 0), "optim", None))
        it = node.decode
        if it is not None and it.stage == s and not it.running:
            out.append(((c_inf, it.ready_s, 0, it.bid), "decode", it))
        elif s == 0 and it is None and node.seqs:
            out.append(((c_inf, node.last_decode_end_s, 0, -1), "decode_new", None))
        for b in (node.batches.values() if due is None else due.get(s, ())):
            if b.running:
                continue
            if not b.train:
                if b.fwd_next == s:
                    out.append(((c_inf, b.ready_s, 1, b.bid), "fwd", b))
            elif b.fwd_done:
                if b.bwd_next == s and self.pipe.can_bwd(node, b, s):
                    out.append(((c_bwd, b.ready_s, 0, b.bid), "bwd", b))
            elif b.fwd_next == s and self.pipe.can_fwd(node, b, s):
                # admitted micro-batches keep flowing under a pending sync (it waits for their
                # backwards anyway); only new admissions wait for it
                out.append(((c_fwd, b.ready_s, 2, b.bid), "fwd", b))
        if s == 0 and node.infer_wait and self._batch_ready(node, now):
            out.append(((c_inf, node.infer_wait[0].arrival_s, 1, -1), "infer_new", None))
        if s == 0 and node.train_wait and not syncing:
            probe = Batch(-1, node.index, True, [node.train_wait[0]], 0, node.num_stages,
                          round=node.train_round)
            if self.pipe.can_fwd(node, probe, 0):
                out.append(((c_new, node.train_wait[0].arrival_s, 3, -1), "train_new", None))
        out.sort(key=lambda c: c[0])
        return out

    def _batch_ready(self, node: NodeState, now: float) -> bool:
        """T_w: a batch forms when full, or when its oldest request waited max_wait_s."""
        p = self.params
        if p.max_wait_s <= 0 or len(node.infer_wait) >= p.max_batch:
            return True
        deadline = min(t.arrival_s for t in node.infer_wait) + p.max_wait_s
        if now >= deadline:
            return True
        self._wakeups.add(deadline)
        self._waiting_nodes.add(node.index)
        return False

    @staticmethod
    def _stash_on(node: NodeState, s: int) -> bool:
        return any(b.train and s in b.stash_stages for b in node.batches.values())

    # ------------------------------------------------------------------ dispatch
    def _dispatch_node(self, node: NodeState, now: float) -> list[Op]:
        self._waiting_nodes.discard(node.index)
        ops = []
        by_stage = self._due_stages(node)
        stage0_work = bool(node.infer_wait or node.train_wait or node.seqs)
        decode_at = node.decode.stage if node.decode is not None else -1
        for s, dev in enumerate(node.devices):
            if dev.running is not None:
                continue
            if (s not in by_stage and s != decode_at and not (s == 0 and stage0_work)
                    and dev.sync_pending == SYNC_NONE and not dev.grads_pending and dev.wait_key is None):
                continue  # nothing could be a candidate here (_candidates would return [])
            op = self._dispatch_device(node, s, now, by_stage)
            if op is not None:
                ops.append(op)
        return ops

    def _dispatch_device(self, node: NodeState, s: int, now: float,
                         by_stage: dict[int, list[Batch]] | None = None) -> Op | None:
        dev = node.devices[s]
        due = self._inference_due(node, s) if self.policy.lookahead else float("inf")
        if due < float("inf") and self.infer_first and self._training_starved(dev, now):
            due = float("inf")  # the training-share bound overrides the lookahead too
        candidates = self._candidates(node, s, now, by_stage)
        if dev.wait_key is not None and all(c[0] != dev.wait_key for c in candidates):
            dev.wait_key, dev.wait_since_s = None, None  # the waiting op is no longer a candidate
        for key, kind, obj in candidates:
            if due < float("inf") and self._is_training(kind, obj) and \
                    now + self._predict_candidate(node, s, kind, obj) > due:
                continue  # inference reaches this stage before the training op would end
            if kind == "sync":
                nbytes = self.profile.stages[s].copy_bytes
                mix = dev.sync_mix if dev.sync_pending == SYNC_AVERAGE else ()
                if mix:  # pull every other contributing node's copy
                    nbytes *= max(1, sum(1 for i, w in enumerate(mix) if w > 0 and i != node.index))
                spec = SyncSpec(-1 if mix else dev.sync_pending, mix, dev.sync_version)
                return self._start(node, s, OpKind.SYNC, -1, (), False, nbytes=nbytes, ctx=("sync",),
                                   sync=spec)
            if kind == "optim":
                return self._start(node, s, OpKind.OPTIM, -1, (), True, ctx=("optim",))
            reload = self._reload_needed(node, s, kind, obj)
            need = reload[0] if reload is not None else self._need_bytes(node, s, kind, obj)
            verdict = self._gate(node, s, now, key, need)
            if verdict == "run":
                if reload is not None:
                    return self._start_reload(node, s, *reload)
                return self._start_work(node, s, kind, obj, now)
            if verdict == "oom":
                self._oom(node, s, kind, obj, need)
                return self._dispatch_device(node, s, now)  # tasks were failed: look afresh
            if isinstance(verdict, Op):
                return verdict  # an offload took the device
            # waiting on memory: an op that fits (a backward that frees memory) may go first
        return None

    @staticmethod
    def _is_training(kind: str, obj) -> bool:
        return kind in ("optim", "train_new", "bwd") or (kind == "fwd" and obj.train)

    def _inference_due(self, node: NodeState, s: int) -> float:
        """Lookahead: when running inference work reaches stage s (its op on the stage before
        ends; for stage 0, a decode iteration finishing the last stage). inf when none."""
        prev = node.devices[s - 1] if s > 0 else node.devices[-1]
        op = prev.running
        if op is None or op.train:
            return float("inf")
        if s == 0 and op.kind is not OpKind.DECODE:
            return float("inf")
        return prev.running_start_s + op.predicted_s

    def _predict_candidate(self, node: NodeState, s: int, kind: str, obj) -> float:
        if kind == "optim":
            return self.lat.predict(OpKind.OPTIM, s)
        b = obj
        if kind == "train_new":
            t = node.train_wait[0]
            return self.lat.predict(OpKind.FWD, s, t.batch_size, t.prompt_tokens)
        return self.lat.predict(OpKind.BWD if kind == "bwd" else OpKind.FWD, s, b.size, b.seq_tokens)

    def _gate(self, node: NodeState, s: int, now: float, key, need: int):
        """'run' if `need` bytes fit; else wait up to T_max, then an OFFLOAD op; 'oom' when the
        gate is off and the op does not fit the device; None to keep waiting."""
        dev = node.devices[s]
        if not self.memory_check:
            return "run" if dev.used_bytes + need <= dev.capacity_bytes else "oom"
        if dev.used_bytes + need <= self.params.kappa * dev.capacity_bytes:
            if dev.wait_key == key:
                dev.wait_key, dev.wait_since_s = None, None
            return "run"
        if dev.wait_key is not None and dev.wait_key != key:
            return None  # another op is the one waiting on this device; it goes first
        if dev.wait_since_s is None:
            dev.wait_key, dev.wait_since_s = key, now
        deadline = dev.wait_since_s + self.params.t_max_s  # the same float as the wake-up
        if now < deadline:
            self._wakeups.add(deadline)
            self._waiting_nodes.add(node.index)
            return None
        victim = self._pick_victim(node, s)
        if victim is not None:
            return self._start_offload(node, s, victim)
        if self._memory_will_free(node, s):
            self._waiting_nodes.add(node.index)
            return None
        # nothing can be freed or offloaded: run rather than drop, and say so
        self.rec.event(Event(now, EventKind.MEMORY_OVERCOMMIT, node.index, s, bytes=need,
                             error=f"{dev.used_bytes} bytes in use"))
        dev.wait_key, dev.wait_since_s = None, None
        return "run"

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
                   and self.pipe.can_bwd(node, b, s)   # GPipe may hold it until its round closes
                   for b in node.batches.values())

    # ------------------------------------------------------------------ memory figures
    def _decode_set(self, node: NodeState) -> list[int]:
        return list(node.seqs)[: self.params.max_batch]

    def _need_bytes(self, node: NodeState, s: int, kind: str, obj) -> int:
        st = self.profile.stages[s]
        if kind in ("decode", "decode_new"):
            n = len(obj.seq_ids) if kind == "decode" else len(self._decode_set(node))
            return n * (st.kv_bytes_per_token + st.tmp_bytes_per_token)
        if kind == "infer_new":
            tasks = node.infer_wait[: self.params.max_batch]
            tokens = len(tasks) * max(t.prompt_tokens for t in tasks)
            kv = sum(t.prompt_tokens for t in tasks) * st.kv_bytes_per_token if self.params.generate else 0
            return tokens * st.tmp_bytes_per_token + kv
        if kind == "train_new":
            t = node.train_wait[0]
            return t.batch_size * t.prompt_tokens * (st.act_bytes_per_token + st.tmp_bytes_per_token)
        b: Batch = obj
        tmp = b.tokens * st.tmp_bytes_per_token
        if kind == "bwd":
            return tmp
        if b.train:
            return tmp + b.tokens * st.act_bytes_per_token
        kv = sum(t.prompt_tokens for t in b.tasks) * st.kv_bytes_per_token if self.params.generate else 0
        return tmp + kv

    def _too_big(self, task: Task) -> str:
        """A task no device could ever hold, even alone: failed at admission with the reason."""
        for s, st in enumerate(self.profile.stages):
            free = self.params.kappa * self.profile.capacity_bytes - st.weight_bytes
            if task.is_train:
                free -= st.train_state_bytes
                need = task.batch_size * task.prompt_tokens * (st.act_bytes_per_token + st.tmp_bytes_per_token)
            else:
                need = task.prompt_tokens * st.tmp_bytes_per_token
                if self.params.generate:
                    need += (task.prompt_tokens + task.output_tokens) * st.kv_bytes_per_token
            if need > free:
                return (f"task needs {need / 1e9:.2f} GB on stage {s}, more than the "
                        f"{max(free, 0) / 1e9:.2f} GB a device has free")
        return ""

    # ------------------------------------------------------------------ offload / reload
    def _pick_victim(self, node: NodeState, s: int):
        """The resident data on stage s needed furthest in the future: a training stash whose
        backward is not next, else the KV of a sequence not in the next decode iteration."""
        best, best_key = None, None
        for b in node.batches.values():
            if not b.train or b.running or s not in b.stash_stages or s in b.offloaded_stages:
                continue
            if b.fwd_done and b.bwd_next == s and self.pipe.can_bwd(node, b, s):
                continue  # its backward runs next here (GPipe holds it until the round's forwards)
            key = (0 if not b.fwd_done else 1, -(b.bwd_next if b.fwd_done else node.num_stages) + s)
            key = (key[0], key[1], b.bid)
            if best_key is None or key < best_key:
                best, best_key = ("act", b), key
        if best is not None:
            return best
        active = set(node.decode.seq_ids) if node.decode else set(self._decode_set(node))
        for tid, seq in node.seqs.items():
            if tid not in active and s not in seq.offloaded_stages and self._kv[tid][s] > 0:
                return ("kv", seq)
        return None

    def _start_offload(self, node: NodeState, s: int, victim) -> Op:
        what, obj = victim
        if what == "act":
            nbytes = obj.tokens * self.profile.stages[s].act_bytes_per_token
            obj.offloaded_stages.add(s)
            return self._start(node, s, OpKind.OFFLOAD, obj.bid, tuple(t.task_id for t in obj.tasks), True,
                               nbytes=nbytes, ctx=("offload", nbytes))
        nbytes = self._kv[obj.task.task_id][s]
        obj.offloaded_stages.add(s)
        return self._start(node, s, OpKind.OFFLOAD, -1, (obj.task.task_id,), False, nbytes=nbytes,
                           ctx=("offload", nbytes))

    def _reload_needed(self, node: NodeState, s: int, kind: str, obj):
        """(bytes, objects) to bring back to stage s before this op can run, or None."""
        if kind == "bwd" and s in obj.offloaded_stages:
            return obj.tokens * self.profile.stages[s].act_bytes_per_token, (obj,)
        if kind in ("decode", "decode_new"):
            ids = obj.seq_ids if kind == "decode" else self._decode_set(node)
            seqs = tuple(node.seqs[t] for t in ids if s in node.seqs[t].offloaded_stages)
            if seqs:
                return sum(self._kv[q.task.task_id][s] for q in seqs), seqs
        return None

    def _start_reload(self, node: NodeState, s: int, nbytes: int, objs: tuple) -> Op:
        train = isinstance(objs[0], Batch)
        ids = tuple(t.task_id for t in objs[0].tasks) if train else tuple(q.task.task_id for q in objs)
        return self._start(node, s, OpKind.RELOAD, objs[0].bid if train else -1, ids, train,
                           nbytes=nbytes, ctx=("reload", nbytes, objs), held=nbytes)

    # ------------------------------------------------------------------ starting work
    def _start(self, node: NodeState, s: int, kind: OpKind, bid: int, task_ids: tuple, train: bool, *,
               batch: int = 0, seq: int = 0, kv: int = 0, nbytes: int = 0, ctx: tuple,
               held: int = 0, extra: int = 0, sync: SyncSpec | None = None) -> Op:
        op = Op(self._next_op, kind, node.index, s, bid, task_ids, train, batch, seq, kv, nbytes,
                self.lat.predict(kind, s, batch, seq, kv, nbytes), sync)
        self._next_op += 1
        dev = node.devices[s]
        dev.running = op
        dev.running_start_s = self.clock.now()
        dev.running_extra_bytes = extra
        dev.held_bytes += held
        self._running[op.op_id] = (op, ctx)
        self._touch(node)
        return op

    def _start_work(self, node: NodeState, s: int, kind: str, obj, now: float) -> Op:
        st = self.profile.stages[s]
        if kind == "infer_new":
            obj = self._form_infer_batch(node, now)
        elif kind == "train_new":
            task = node.train_wait.pop(0)
            obj = Batch(self._new_bid(), node.index, True, [task], task.prompt_tokens, node.num_stages,
                        ready_s=now)
            self.pipe.admit(node, obj)
            node.batches[obj.bid] = obj
        elif kind == "decode_new":
            ids = tuple(self._decode_set(node))
            kv = sum(node.seqs[t].kv_tokens for t in ids)
            obj = node.decode = DecodeIter(self._new_bid(), ids, kv, 0, now)
        if kind in ("decode", "decode_new"):
            it: DecodeIter = obj
            it.running = True
            for tid in it.seq_ids:
                self._kv[tid][s] += st.kv_bytes_per_token
            return self._start(node, s, OpKind.DECODE, it.bid, it.seq_ids, False, batch=len(it.seq_ids),
                               seq=1, kv=it.kv_tokens, ctx=("decode", it),
                               held=len(it.seq_ids) * st.kv_bytes_per_token,
                               extra=len(it.seq_ids) * st.tmp_bytes_per_token)
        b: Batch = obj
        b.running = True
        ids = tuple(t.task_id for t in b.tasks)
        tmp = b.tokens * st.tmp_bytes_per_token
        if kind == "bwd":
            return self._start(node, s, OpKind.BWD, b.bid, ids, True, batch=b.size, seq=b.seq_tokens,
                               ctx=("bwd", b), extra=tmp)
        held = 0
        if b.train:
            held = b.tokens * st.act_bytes_per_token
            b.stash_stages.add(s)
        elif self.params.generate:
            for t in b.tasks:
                self._kv[t.task_id][s] += t.prompt_tokens * st.kv_bytes_per_token
                held += t.prompt_tokens * st.kv_bytes_per_token
        return self._start(node, s, OpKind.FWD, b.bid, ids, b.train, batch=b.size, seq=b.seq_tokens,
                           ctx=("fwd", b), held=held, extra=tmp)

    def _new_bid(self) -> int:
        self._next_bid += 1
        return self._next_bid - 1

    def _form_infer_batch(self, node: NodeState, now: float) -> Batch:
        tasks = node.infer_wait[: self.params.max_batch]
        del node.infer_wait[: len(tasks)]
        b = Batch(self._new_bid(), node.index, False, tasks, max(t.prompt_tokens for t in tasks),
                  node.num_stages, ready_s=now)
        node.batches[b.bid] = b
        stale_steps = self._max_version - node.version
        stale_s = now - self._version_first_s[node.version + 1] if stale_steps > 0 else 0.0
        for t in tasks:
            self._served[t.task_id] = (node.version, stale_steps, stale_s, None)
            self._kv[t.task_id] = [0] * node.num_stages
        return b

    def _oom(self, node: NodeState, s: int, kind: str, obj, need: int) -> None:
        """No memory gate and the op does not fit: it fails as on a real device."""
        why = f"out of memory on node {node.index} stage {s}: needs {need / 1e9:.2f} GB more"
        self.rec.event(Event(self.clock.now(), EventKind.OOM, node.index, s, bytes=need, error=why))
        if kind == "infer_new":
            obj = self._form_infer_batch(node, self.clock.now())
        elif kind == "train_new":
            task = node.train_wait.pop(0)
            self._fail_task(task, node.index, why)
            self._touch(node)
            return
        elif kind in ("decode", "decode_new"):
            ids = obj.seq_ids if kind == "decode" else tuple(self._decode_set(node))
            for tid in ids:
                self._drop_seq(node, node.seqs[tid], why)
            node.decode = None
            self._touch(node)
            return
        self._drop_batch(node, obj, why)

    # ------------------------------------------------------------------ finishing work
    def _finish_op(self, result: OpResult) -> None:
        entry = self._running.pop(result.op_id, None)
        if entry is None:
            if result.op_id in self._cancelled:
                self._cancelled.discard(result.op_id)
                return
            raise ValueError(f"op {result.op_id} is not running")
        op, ctx = entry
        node = self.nodes[op.node]
        dev = node.devices[op.stage]
        dev.running = None
        dev.running_extra_bytes = 0
        self._decay(dev, result.end_s)
        busy = max(0.0, result.end_s - max(result.start_s, result.end_s - _SHARE_WINDOW_S))
        dev.busy_ewma_s += busy
        if op.train:
            dev.train_ewma_s += busy
        self._touch(node)
        self.rec.op(OpRecord(op.node, op.stage, op.kind, result.start_s, result.end_s, op.batch_id,
                                        op.task_ids, op.train, op.predicted_s, op.batch_size,
                                        op.seq_tokens, op.kv_tokens, op.bytes))
        if op.kind in (OpKind.FWD, OpKind.BWD):
            rest = self._owed[op.node] - op.predicted_s
            self._owed[op.node] = rest if rest > 1e-9 else 0.0  # no float residue (luf ties)
        if result.error:
            self._op_failed(node, op, ctx, result.error)
            return
        self.lat.observe(op, result.end_s - result.start_s)
        getattr(self, "_done_" + ctx[0])(node, op, ctx, result)

    def _done_fwd(self, node: NodeState, op: Op, ctx: tuple, result: OpResult) -> None:
        b: Batch = ctx[1]
        b.running = False
        b.fwd_next += 1
        b.ready_s = result.end_s
        if not b.fwd_done:
            return
        if b.train:
            b.bwd_next = node.num_stages - 1
            self.pipe.on_fwd_done(node, b)
            return
        del node.batches[b.bid]
        for t in b.tasks:
            v = self._served[t.task_id]
            self._served[t.task_id] = (v[0], v[1], v[2], result.end_s)
            if self.params.generate and t.output_tokens > 1 and t.task_id not in result.stopped_task_ids:
                node.seqs[t.task_id] = Seq(t, generated=1)
            else:
                if self.params.generate:
                    self._free_kv(node, Seq(t, generated=1))  # its prefill KV, on every stage
                self._finish_request(node, t, result.end_s, 1 if self.params.generate else None)

    def _done_bwd(self, node: NodeState, op: Op, ctx: tuple, result: OpResult) -> None:
        b: Batch = ctx[1]
        s = op.stage
        dev = node.devices[s]
        b.running = False
        dev.held_bytes -= b.tokens * self.profile.stages[s].act_bytes_per_token
        b.stash_stages.discard(s)
        dev.grads_pending += 1
        self.pipe.on_bwd_done(node, b, s)
        b.bwd_next -= 1
        b.ready_s = result.end_s
        if s > 0:
            return
        del node.batches[b.bid]
        node.step_samples += b.size
        self._merge_samples[node.index] += b.size
        self._unstepped.setdefault(node.index, []).extend(b.tasks)
        node.step_tokens += b.tokens
        for t in b.tasks:
            self._resolved.add(t.task_id)
            self.rec.train_task(TrainTaskRecord(
                t.task_id, t.arrival_s, node.index, result.end_s, t.batch_size, t.batch_size * t.prompt_tokens,
                self._deferred_s.get(t.task_id, 0.0)))

    def _done_decode(self, node: NodeState, op: Op, ctx: tuple, result: OpResult) -> None:
        it: DecodeIter = ctx[1]
        it.running = False
        it.stage += 1
        it.ready_s = result.end_s
        if it.stage < node.num_stages:
            return
        node.decode = None
        node.last_decode_end_s = result.end_s
        stopped = set(result.stopped_task_ids)
        for tid in it.seq_ids:
            seq = node.seqs[tid]
            seq.generated += 1
            if seq.done or tid in stopped:
                self._free_kv(node, seq)
                del node.seqs[tid]
                self._finish_request(node, seq.task, result.end_s, seq.generated)

    def _done_optim(self, node: NodeState, op: Op, ctx: tuple, result: OpResult) -> None:
        dev = node.devices[op.stage]
        dev.grads_pending = 0
        dev.step_count += 1
        steps = min(d.step_count for d in node.devices)
        if steps <= node.steps_done:
            return
        node.version += steps - node.steps_done
        node.steps_done = steps
        version = node.version
        applied = self._unstepped.pop(node.index, [])
        now = result.end_s
        self.rec.train_step(TrainStepRecord(node.index, version, now, node.step_samples, node.step_tokens))
        if applied:
            self.rec.applied(Applied(node.index, version, now, tuple(t.task_id for t in applied)))
        node.step_samples = node.step_tokens = 0
        if version > self._max_version:
            self._max_version = version
            self._version_first_s[version] = now
        if self.policy.separate:
            self._steps_since_sync += 1
            if self._steps_since_sync >= self.params.sync_every:
                self._steps_since_sync = 0
                for n in self.nodes:
                    if n.serves and not n.trains:
                        self._request_sync(n)
        elif self.params.average_every:
            self._steps_since_sync += 1
            if self._steps_since_sync >= self.params.average_every:
                self._steps_since_sync = 0
                self._request_merge()

    def _request_merge(self) -> None:
        """Co-located nodes train on different data: every K training steps (cluster-wide) every
        healthy node replaces its weights by the average of all nodes' copies weighted by the
        samples each trained since the last merge (FedAvg), so a node that only served gets the
        trainers' progress and a trainer is not pulled back by it. Each stage merges when it
        holds no pending backward; the result counts as the freshest version."""
        healthy = [n for n in self.nodes if n.healthy]
        total = sum(self._merge_samples[n.index] for n in healthy)
        if len(healthy) < 2 or total <= 0:
            return
        mix = tuple((self._merge_samples[n.index] / total) if n.healthy else 0.0 for n in self.nodes)
        version = max(n.version for n in healthy)
        for n in healthy:
            for d in n.devices:
                d.sync_pending, d.sync_mix, d.sync_version = SYNC_AVERAGE, mix, version
            self.pipe.flush(n)
            self._touch(n)
        self._merge_samples = [0] * len(self.nodes)

    def _request_sync(self, node: NodeState) -> None:
        """Copy weights into every stage of `node` from the freshest training node."""
        trainers = [n for n in self.nodes if n.trains and n.healthy and n is not node]
        if not trainers:
            return
        src = max(trainers, key=lambda n: (n.version, -n.index))
        for d in node.devices:
            d.sync_pending = src.index
            d.sync_version = src.version
        self.pipe.flush(node)
        self._touch(node)

    def _done_sync(self, node: NodeState, op: Op, ctx: tuple, result: OpResult) -> None:
        dev = node.devices[op.stage]
        if dev.sync_pending != (SYNC_AVERAGE if op.sync.average else op.sync.source):
            return  # re-requested from another source while this copy ran (its source died)
        dev.sync_pending = SYNC_NONE
        if all(d.sync_pending == SYNC_NONE for d in node.devices):
            # the weight version moves; step counts stay (S-PP rounds are numbered by them)
            node.version = max(node.version, dev.sync_version)

    def _done_offload(self, node: NodeState, op: Op, ctx: tuple, result: OpResult) -> None:
        dev = node.devices[op.stage]
        dev.held_bytes -= ctx[1]
        dev.host_bytes += ctx[1]
        self.result.offload_events += 1
        self.rec.event(Event(result.end_s, EventKind.OFFLOAD, node.index, op.stage, op.task_ids, bytes=ctx[1]))

    def _done_reload(self, node: NodeState, op: Op, ctx: tuple, result: OpResult) -> None:
        dev = node.devices[op.stage]
        dev.host_bytes -= ctx[1]
        for obj in ctx[2]:
            obj.offloaded_stages.discard(op.stage)

    # ------------------------------------------------------------------ records and failures
    def _finish_request(self, node: NodeState, task: Task, end_s: float, generated: int | None = None) -> None:
        version, stale_steps, stale_s, first = self._served[task.task_id]
        self._resolved.add(task.task_id)
        self._kv.pop(task.task_id, None)
        if self.params.generate:
            self.rec.release(node.index, (task.task_id,))   # its KV cache on every stage
        out = task.output_tokens if generated is None else generated
        self.rec.request(RequestRecord(
            task.task_id, task.arrival_s, node.index, task.prompt_tokens, out, first, end_s,
            self.slo_s(task), False, version, stale_steps, stale_s))

    def _free_kv(self, node: NodeState, seq: Seq) -> None:
        kv = self._kv[seq.task.task_id]
        for j, d in enumerate(node.devices):
            if j in seq.offloaded_stages:
                d.host_bytes -= kv[j]
            else:
                d.held_bytes -= kv[j]
            kv[j] = 0

    def _drop_seq(self, node: NodeState, seq: Seq, why: str) -> None:
        self._free_kv(node, seq)
        node.seqs.pop(seq.task.task_id, None)
        self.rec.release(node.index, (seq.task.task_id,))
        self._fail_task(seq.task, node.index, why)

    def _drop_batch(self, node: NodeState, b: Batch, why: str, retry: bool = False) -> None:
        """Take a micro-batch off its node: free its memory on every stage, tell the workers to
        release its state (stashes keyed by batch id, KV by sequence), and fail its tasks; with
        `retry`, training tasks are offered again instead (up to MAX_TRAIN_ATTEMPTS tries)."""
        for s in b.stash_stages:
            d = node.devices[s]
            nbytes = b.tokens * self.profile.stages[s].act_bytes_per_token
            if s in b.offloaded_stages:
                d.host_bytes -= nbytes
            else:
                d.held_bytes -= nbytes
        b.stash_stages.clear()
        if not b.train and self.params.generate:
            for t in b.tasks:
                kv = self._kv.get(t.task_id)
                if kv:
                    for j, d in enumerate(node.devices):
                        d.held_bytes -= kv[j]
        if b.train and b.bid in node.batches and node.round_members.get(b.round, 0) > 0:
            node.round_members[b.round] -= 1  # S-PP: the round's flush step stops waiting for it
        node.batches.pop(b.bid, None)
        seqs = tuple(t.task_id for t in b.tasks) if not b.train and self.params.generate else ()
        self.rec.release(node.index, seqs, (b.bid,))
        for t in b.tasks:
            tries = self._attempts.get(t.task_id, 1)
            if retry and b.train and tries < MAX_TRAIN_ATTEMPTS:
                self._attempts[t.task_id] = tries + 1
                self._node_of.pop(t.task_id, None)
                self._incoming.append(t)
                self.rec.requeued((t.task_id,))
                self.rec.event(Event(self.clock.now(), EventKind.TASK_RETRIED, node.index,
                                     task_ids=(t.task_id,), error=why))
            else:
                self._fail_task(t, node.index, why if not retry else f"{why} (after {tries} tries)")
        self._touch(node)

    def _op_failed(self, node: NodeState, op: Op, ctx: tuple, error: str) -> None:
        """An executor reported an op error: its tasks fail with that error (never silently)."""
        kind = ctx[0]
        if kind in ("fwd", "bwd"):
            self._drop_batch(node, ctx[1], error, retry=True)
        elif kind == "decode":
            for tid in ctx[1].seq_ids:
                if tid in node.seqs:
                    self._drop_seq(node, node.seqs[tid], error)
            node.decode = None
            self.rec.release(node.index, (), (ctx[1].bid,))
        else:
            raise RuntimeError(f"{op.kind.value} op on node {node.index} stage {op.stage} failed: {error}")
