"""Per-device dispatch: which op an idle device runs next, and starting it.

A device's candidates (order.py) are tried in the policy's dispatch order; each must pass the
memory gate (memory.py), which may answer with an OFFLOAD instead. Starting work forms what it
needs (a prefill batch from queued requests, an admitted training micro-batch, a decode
iteration over the pool) and books the bytes it holds. What a finished op changes is in
completion.py.
"""
from __future__ import annotations

from typing import Callable, NamedTuple

from lemix.clock import Clock
from lemix.sched.chunking import chunk_cuts, chunk_layers, chunk_stash_bytes, mid_stage
from lemix.sched.cluster import Cluster
from lemix.sched.failures import Failures
from lemix.sched.latency import LatencyModel, Profile
from lemix.sched.ledger import Served, TaskLedger
from lemix.sched.memory import MemoryGate, Reload, Verdict, Victim, VictimKind
from lemix.sched.order import INF, INFER_CLASS, OPTIM_KEY, SYNC_KEY, CandKey, CandKind, Candidate, DispatchOrder
from lemix.sched.params import SchedParams
from lemix.sched.pipeline import PipelineMode
from lemix.sched.state import Batch, DecodeIter, NodeState
from lemix.sched.weights import Weights
from lemix.types import Op, OpKind, SyncSpec

_SYNC_ONLY = [Candidate(SYNC_KEY, CandKind.SYNC, None)]
# hot-path aliases (an Enum member read through its class costs a metaclass lookup, per use)
_SYNC, _OPTIM, _DECODE, _DECODE_NEW = CandKind.SYNC, CandKind.OPTIM, CandKind.DECODE, CandKind.DECODE_NEW
_FWD, _BWD, _INFER_NEW, _TRAIN_NEW = CandKind.FWD, CandKind.BWD, CandKind.INFER_NEW, CandKind.TRAIN_NEW
_OP_FWD, _OP_BWD, _OP_DECODE = OpKind.FWD, OpKind.BWD, OpKind.DECODE
_RUN, _OOM, _OFFLOAD = Verdict.RUN, Verdict.OOM, Verdict.OFFLOAD


def _by_key(c: Candidate) -> CandKey:
    return c.key


class Running(NamedTuple):
    """An op in flight and what its completion acts on."""

    op: Op
    obj: object = None   # the Batch (FWD, BWD), DecodeIter (DECODE) or Reload (RELOAD)


class Dispatcher:
    def __init__(self, params: SchedParams, profile: Profile, clock: Clock, lat: LatencyModel,
                 pipe: PipelineMode, cluster: Cluster, memory: MemoryGate, weights: Weights,
                 ledger: TaskLedger, failures: Failures, order: DispatchOrder) -> None:
        self.params = params
        self.profile = profile
        self.clock = clock
        self.lat = lat
        self.pipe = pipe
        self.cluster = cluster
        self.memory = memory
        self.weights = weights
        self.ledger = ledger
        self.failures = failures
        self.order = order
        self.running: dict[int, Running] = {}
        self.cancelled: set[int] = set()     # ops of failed nodes; their results are ignored
        self._next_op = 0
        self._next_bid = 0
        self.chunker = None   # set by the Scheduler: chunk plans of training ops (chunking.py)
        self.slo_batching = False   # set by the Scheduler (issue 10): see _slo_batch
        self.quiet: Callable[[], bool] = lambda: False   # set by the Scheduler (solo training, order.py)
        self.host_gate = None       # set by the Scheduler (issue 10): may a training op start? (contention.py)

    # ------------------------------------------------------------------ candidates
    def candidates(self, node: NodeState, s: int, now: float,
                   due: dict[int, list[Batch]] | None = None) -> list[Candidate]:
        dev = node.devices[s]
        syncing = dev.sync is not None
        if syncing and not node.stash_on(s):
            if not dev.sync.round:
                return _SYNC_ONLY  # never under a pending backward
            if not self._step_coming(node, s):   # a staggered merge: requests on the node pass first
                return self._passing(node, s, now)
        order = self.order
        solo = order.solo_training and self.quiet()
        c_inf, c_bwd, c_fwd, c_new, k_step = order.classes(dev, now, solo)
        pipe = self.pipe
        out = []
        if dev.grads_pending and pipe.step_due(node, s) and not node.stash_on(s):
            out.append(Candidate(k_step, _OPTIM, None))
        it = node.decode
        if it is not None and it.stage == s and not it.running:
            out.append(Candidate(CandKey(c_inf, it.ready_s, 0, it.bid), _DECODE, it))
        elif s == 0 and it is None and node.seqs:
            out.append(Candidate(CandKey(c_inf, node.last_decode_end_s, 0, -1), _DECODE_NEW, None))
        S = len(node.devices)
        for b in (node.batches.values() if due is None else due.get(s, ())):
            if b.running:
                continue
            if not b.train:
                if b.fwd_next == s:
                    out.append(Candidate(CandKey(c_inf, b.ready_s, 1, b.bid), _FWD, b))
            elif b.fwd_next >= S:   # forward done (a stage part-way through its chunks is not gated again)
                if b.bwd_next == s and (mid_stage(b) or pipe.can_bwd(node, b, s)):
                    out.append(Candidate(CandKey(c_bwd, b.ready_s, 0, b.bid), _BWD, b))
            elif b.fwd_next == s and (mid_stage(b) or pipe.can_fwd(node, b, s)):
                # admitted micro-batches keep flowing under a pending sync (it waits for their
                # backwards anyway); only new admissions wait for it
                out.append(Candidate(CandKey(c_fwd, b.ready_s, 2, b.bid), _FWD, b))
        if s == 0:
            if node.infer_wait and self._batch_ready(node, now):
                out.append(Candidate(CandKey(c_inf, node.infer_wait[0].arrival_s, 1, -1), _INFER_NEW, None))
            if node.train_wait and not syncing:
                probe = Batch(-1, node.index, True, [node.train_wait[0]], 0, S, round=node.train_round)
                if pipe.can_fwd(node, probe, 0):
                    out.append(Candidate(CandKey(c_new, node.train_wait[0].arrival_s, 3, -1), _TRAIN_NEW, None))
        if len(out) > 1:
            out.sort(key=_by_key)
        return out

    def _passing(self, node: NodeState, s: int, now: float) -> list[Candidate]:
        """Under a staggered merge's pending copy of stage s: inference on the node that still
        needs the stage goes first (its batches and decode iteration due there, and at stage 0
        the requests waiting to be admitted, and a due optimizer step); while such work is on an
        earlier stage, the copy waits for it."""
        c_inf, out, waiting = INFER_CLASS, [], False
        for b in node.batches.values():
            if not b.train and b.fwd_next <= s:
                if b.fwd_next == s and not b.running:
                    out.append(Candidate(CandKey(c_inf, b.ready_s, 1, b.bid), CandKind.FWD, b))
                else:
                    waiting = True
        it = node.decode
        if it is not None and it.stage <= s:
            if it.stage == s and not it.running:
                out.append(Candidate(CandKey(c_inf, it.ready_s, 0, it.bid), CandKind.DECODE, it))
            else:
                waiting = True
        # requests placed before the merge began (placement skips the node unless it is the only one)
        if node.infer_wait:
            if s == 0 and self._batch_ready(node, now):
                key = CandKey(c_inf, node.infer_wait[0].arrival_s, 1, -1)
                out.append(Candidate(key, CandKind.INFER_NEW, None))
            else:
                waiting = True
        dev = node.devices[s]   # a due step goes first too: the merge then carries it
        if dev.grads_pending and self.pipe.step_due(node, s):
            out.append(Candidate(OPTIM_KEY, CandKind.OPTIM, None))
        out.sort(key=_by_key)
        return out if (out or waiting) else _SYNC_ONLY

    def _step_coming(self, node: NodeState, s: int) -> bool:
        """A staggered merge's copy waits while the stage holds gradients whose optimizer step
        comes once the node's admitted training micro-batches finish (they run on meanwhile, as
        under a pending backward; no new one is admitted): a copy started before would hold the
        step back for the copy's whole length and merge the older weights."""
        return (node.devices[s].grads_pending > 0 and not self.pipe.step_due(node, s)
                and any(b.train for b in node.batches.values()))

    def _batch_ready(self, node: NodeState, now: float) -> bool:
        """T_w: a batch forms when full, or when its oldest request waited max_wait_s."""
        p = self.params
        if p.max_wait_s <= 0 or len(node.infer_wait) >= p.max_batch:
            return True
        deadline = min(t.arrival_s for t in node.infer_wait) + p.max_wait_s
        if now >= deadline:
            return True
        self.cluster.wait_until(node, deadline)
        return False

    # ------------------------------------------------------------------ dispatch
    def dispatch_node(self, node: NodeState, now: float, ops: list[Op]) -> None:
        """Start what the node's idle devices run next (appended to `ops`)."""
        self.cluster.dispatched(node)
        by_stage = node.due_stages()
        stage0_work = bool(node.infer_wait or node.train_wait or node.seqs)
        decode_at = node.decode.stage if node.decode is not None else -1
        for s, dev in enumerate(node.devices):
            if dev.running is not None:
                continue
            if (s not in by_stage and s != decode_at and not (s == 0 and stage0_work)
                    and dev.sync is None and dev.wait_key is None):
                if not dev.grads_pending:
                    continue  # nothing could be a candidate here (candidates() would return [])
                if not self.pipe.step_due(node, s):
                    # the only candidate would be the stage's optimizer step, not due yet (most
                    # looks at a training node's idle stages): nothing starts
                    self._look_only(node, s, now)
                    continue
            op = self._dispatch_device(node, s, now, by_stage)
            if op is not None:
                ops.append(op)

    def _look_only(self, node: NodeState, s: int, now: float) -> None:
        """What a look at a device that finds no candidate still does: what the dispatch
        order's calls of _dispatch_device and candidates() change (DispatchOrder.look: the
        device's busy-share window, aged to `now`; a window already at `now` needs no look)."""
        if now > node.devices[s].ewma_at_s:
            order = self.order
            order.look(node, s, now, order.solo_training and self.quiet())

    def _dispatch_device(self, node: NodeState, s: int, now: float,
                         by_stage: dict[int, list[Batch]] | None = None) -> Op | None:
        dev = node.devices[s]
        hold = self.order.hold_until(node, s, now)
        if hold < INF and self.chunker is not None and self.chunker.lookahead_slack:
            # hook (issue 10): a chunk may delay inference on its way by up to the chunk bound,
            # the blocking bounded blocking accepts anyway (chunking.py, "lookahead slack")
            hold += self.chunker.target_s()
        candidates = self.candidates(node, s, now, by_stage)
        if dev.wait_key is not None and all(c.key != dev.wait_key for c in candidates):
            dev.wait_key, dev.wait_since_s = None, None  # the waiting op is no longer a candidate
        chunker, host_gate, memory = self.chunker, self.host_gate, self.memory
        for c in candidates:
            kind = c.kind
            if kind is _BWD or (kind is _FWD and c.obj.train):
                if chunker is not None:
                    c.obj.span = chunker.span(node, s, c.obj)   # adaptive chunks: what its op covers
                training = True
            else:
                training = kind is _OPTIM or kind is _TRAIN_NEW   # a step, or a task to admit
            if training:
                if hold < INF and now + self._predict(node, s, c) > hold:
                    continue  # inference reaches this stage before the training op would end
                if host_gate is not None and kind is not _OPTIM and not host_gate():
                    self.cluster.wait(node)   # the host's training slots are taken: look again later
                    continue
            if kind is _SYNC:
                spec = dev.sync
                return self._start(node, s, OpKind.SYNC, -1, (), False,
                                   nbytes=self.weights.sync_bytes(node, s, spec), sync=spec)
            if kind is _OPTIM:
                return self._start(node, s, OpKind.OPTIM, -1, (), True)
            reload = memory.reload_needed(node, s, c)
            need = reload.nbytes if reload is not None else memory.need_bytes(node, s, c)
            verdict, victim = memory.check(node, s, now, c.key, need)
            if verdict is _RUN:
                if reload is not None:
                    return self._start_reload(node, s, reload)
                return self._start_work(node, s, c, now)
            if verdict is _OOM:
                self._oom(node, s, c, need)
                return self._dispatch_device(node, s, now)  # tasks were failed: look afresh
            if verdict is _OFFLOAD:
                return self._start_offload(node, s, victim)  # an offload takes the device
            # waiting on memory: an op that fits (a backward that frees memory) may go first
        return None

    def _predict(self, node: NodeState, s: int, c: Candidate) -> float:
        if c.kind is CandKind.OPTIM:
            return self.lat.predict(OpKind.OPTIM, s)
        if c.kind is CandKind.TRAIN_NEW:
            t = node.train_wait[0]
            plan = self.chunker.plan(t.batch_size, t.prompt_tokens) if self.chunker else ()
            first = (plan[s][0], plan[s][self.chunker.new_span(node, s, t)]) if plan and len(plan[s]) > 2 else ()
            return self.lat.predict(OpKind.FWD, s, t.batch_size, t.prompt_tokens, layers=first)
        b = c.obj
        return self.lat.predict(OpKind.BWD if c.kind is CandKind.BWD else OpKind.FWD, s, b.size, b.seq_tokens,
                                layers=chunk_layers(b, s) if b.train else ())

    # ------------------------------------------------------------------ starting ops
    def _start(self, node: NodeState, s: int, kind: OpKind, bid: int, task_ids: tuple, train: bool, *,
               batch: int = 0, seq: int = 0, kv: int = 0, nbytes: int = 0, obj: object = None,
               held: int = 0, extra: int = 0, sync: SyncSpec | None = None, layers: tuple = (),
               cuts: tuple = ()) -> Op:
        op = Op(self._next_op, kind, node.index, s, bid, task_ids, train, batch, seq, kv, nbytes,
                self.lat.predict(kind, s, batch, seq, kv, nbytes, layers), sync, layers, cuts)
        self._next_op += 1
        dev = node.devices[s]
        dev.running = op
        dev.running_start_s = self.clock.now()
        dev.running_extra_bytes = extra
        dev.held_bytes += held
        self.running[op.op_id] = Running(op, obj)
        self.cluster.touch(node)
        return op

    def _start_offload(self, node: NodeState, s: int, victim: Victim) -> Op:
        nbytes = self.memory.offload_bytes(victim, s)
        obj = victim.obj
        if victim.kind is VictimKind.ACTIVATIONS:
            return self._start(node, s, OpKind.OFFLOAD, obj.bid, tuple(t.task_id for t in obj.tasks), True,
                               nbytes=nbytes)
        return self._start(node, s, OpKind.OFFLOAD, -1, (obj.task.task_id,), False, nbytes=nbytes)

    def _start_reload(self, node: NodeState, s: int, reload: Reload) -> Op:
        first = reload.objs[0]
        train = isinstance(first, Batch)
        ids = tuple(t.task_id for t in first.tasks) if train else tuple(q.task.task_id for q in reload.objs)
        return self._start(node, s, OpKind.RELOAD, first.bid if train else -1, ids, train,
                           nbytes=reload.nbytes, obj=reload, held=reload.nbytes)

    def _start_work(self, node: NodeState, s: int, c: Candidate, now: float) -> Op:
        st = self.profile.stages[s]
        kind, obj = c.kind, c.obj
        if kind is _FWD or kind is _BWD:
            pass   # (most ops) the batch is formed already
        elif kind is _INFER_NEW:
            obj = self.form_infer_batch(node, now)
        elif kind is _TRAIN_NEW:
            task = node.train_wait.pop(0)
            obj = Batch(self._new_bid(), node.index, True, [task], task.prompt_tokens, node.num_stages,
                        ready_s=now)
            if self.chunker is not None:   # bounded blocking: its chunk plan, fixed from now on
                obj.chunks = self.chunker.plan(task.batch_size, task.prompt_tokens)
                obj.span = self.chunker.span(node, s, obj) if obj.chunks else 1
            self.pipe.admit(node, obj)
            node.batches[obj.bid] = obj
        elif kind is _DECODE_NEW:
            ids = tuple(node.decode_set(self.params.max_batch))
            kv = sum(node.seqs[t].kv_tokens for t in ids)
            obj = node.decode = DecodeIter(self._new_bid(), ids, kv, 0, now)
        if kind is _DECODE or kind is _DECODE_NEW:
            it: DecodeIter = obj
            it.running = True
            kv_bytes = self.memory.kv
            for tid in it.seq_ids:
                kv_bytes[tid][s] += st.kv_bytes_per_token
            return self._start(node, s, _OP_DECODE, it.bid, it.seq_ids, False, batch=len(it.seq_ids),
                               seq=1, kv=it.kv_tokens, obj=it,
                               held=len(it.seq_ids) * st.kv_bytes_per_token,
                               extra=len(it.seq_ids) * st.tmp_bytes_per_token)
        b: Batch = obj
        b.running = True
        ids = b.task_ids
        tmp = b.tokens * st.tmp_bytes_per_token
        layers = chunk_layers(b, s) if b.train else ()
        if kind is _BWD:
            return self._start(node, s, _OP_BWD, b.bid, ids, True, batch=b.size, seq=b.seq_tokens,
                               obj=b, extra=tmp, layers=layers)
        held = 0
        if b.train:
            held = chunk_stash_bytes(b, s, st.act_bytes_per_token)
            b.stash_stages.add(s)
        elif self.params.generate:
            kv_bytes = self.memory.kv
            for t in b.tasks:
                kv_bytes[t.task_id][s] += t.prompt_tokens * st.kv_bytes_per_token
                held += t.prompt_tokens * st.kv_bytes_per_token
        return self._start(node, s, _OP_FWD, b.bid, ids, b.train, batch=b.size, seq=b.seq_tokens,
                           obj=b, held=held, extra=tmp, layers=layers,
                           cuts=chunk_cuts(b, s) if b.train else ())

    def _oom(self, node: NodeState, s: int, c: Candidate, need: int) -> None:
        """No memory gate and the op does not fit: it fails as on a real device."""
        now = self.clock.now()
        why = f"out of memory on node {node.index} stage {s}: needs {need / 1e9:.2f} GB more"
        self.failures.oom_event(node, s, need, why)
        kind = c.kind
        if kind is CandKind.TRAIN_NEW:
            self.failures.fail_task(node, node.train_wait.pop(0), why)
        elif kind is CandKind.DECODE or kind is CandKind.DECODE_NEW:
            ids = c.obj.seq_ids if kind is CandKind.DECODE else tuple(node.decode_set(self.params.max_batch))
            self.failures.drop_decode(node, ids, why)
        else:
            b = self.form_infer_batch(node, now) if kind is CandKind.INFER_NEW else c.obj
            self.failures.drop_batch(node, b, why)

    def _new_bid(self) -> int:
        self._next_bid += 1
        return self._next_bid - 1

    def form_infer_batch(self, node: NodeState, now: float) -> Batch:
        """The first C queued requests of the node become one prefill micro-batch (with SLO-aware
        batching, those of them that do not cost each other their SLO)."""
        head = node.infer_wait[: self.params.max_batch]
        tasks = self._slo_batch(head, now) if self.slo_batching and not self.params.generate else head
        if len(tasks) == len(head):
            del node.infer_wait[: len(tasks)]
        else:
            taken = {t.task_id for t in tasks}
            node.infer_wait[:] = [t for t in node.infer_wait if t.task_id not in taken]
        b = Batch(self._new_bid(), node.index, False, tasks, max(t.prompt_tokens for t in tasks),
                  node.num_stages, ready_s=now)
        node.batches[b.bid] = b
        stale_steps, stale_s = self.weights.staleness(node, now)
        served = Served(node.version, stale_steps, stale_s)
        for t in tasks:
            self.ledger.served[t.task_id] = served
            self.memory.kv[t.task_id] = [0] * node.num_stages
        return b

    def _slo_batch(self, head: list, now: float) -> list:
        """SLO-aware batching (issue 10; prefill mode): the queued requests in order, each joining
        the batch unless it makes a member that would meet its SLO miss it, or misses its own in
        the batch but would not in the next one (which starts when this one leaves stage 0). A
        request left out stays at the head of the queue. A padded batch costs its longest prompt
        for every member: two long prompts together can both miss where each alone would not."""
        times, S = self.ledger.times, len(self.profile.stages)

        def run_s(n: int, tokens: int) -> list[float]:
            return [self.lat.predict(OpKind.FWD, s, n, tokens) for s in range(S)]

        batch = [head[0]]
        longest = head[0].prompt_tokens
        cur = run_s(1, longest)
        for t in head[1:]:
            tok = max(longest, t.prompt_tokens)
            new = run_s(len(batch) + 1, tok)
            end_with, end_without = now + sum(new), now + sum(cur)
            hurts = any(end_without <= m.arrival_s + times.slo_s(m) < end_with for m in batch)
            own = t.arrival_s + times.slo_s(t)
            later = now + cur[0] + sum(run_s(1, t.prompt_tokens))
            if hurts or (end_with > own and later <= own):
                continue
            batch.append(t)
            longest, cur = tok, new
        return batch

    def cancel_node(self, node_idx: int) -> None:
        """A node died: its running ops' results, when they come, are ignored."""
        for op_id, r in list(self.running.items()):
            if r.op.node == node_idx:
                del self.running[op_id]
                self.cancelled.add(op_id)
