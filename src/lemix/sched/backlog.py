"""Continuous-training backlog (`--train-backlog`, issue 10): training data is always waiting.

The realistic continuous fine-tuning case: training is not capped by an arrival rate. Whenever
a training-capable node (every node co-located; separate's training nodes) has no placed
training task waiting to enter its pipeline, and no drawn task is still waiting for placement,
a fresh training micro-batch (`batch` samples of `tokens` tokens, arriving now) is drawn and
offered to the policy like any arrival: each policy's placement, deferral and dispatch rules
decide what happens to it. Drawing stops at `until_s` (the run's duration). What a run reports
is then training samples/s at the SLO attainment it reached.

Simulator only for now: the engines would need the backlog's samples as training text.
"""
from __future__ import annotations

from lemix.types import Task, TaskKind

FIRST_ID = 1 << 40   # drawn tasks' ids, above any workload's


class TrainBacklog:
    def __init__(self, params, cluster, placement, ledger, memory) -> None:
        self.params = params
        self.cluster = cluster
        self.placement = placement
        self.ledger = ledger
        self.memory = memory
        self.next_id = FIRST_ID
        self.drawn = 0

    def draw(self, now: float) -> None:
        """Offer as many new training tasks as training nodes lack one."""
        p = self.params
        if not p.train_backlog or now >= p.backlog_until_s:
            return
        probe = Task(-1, TaskKind.TRAIN, now, p.backlog_tokens, 0, batch_size=p.backlog_batch)
        pool = self.placement.candidate_nodes(probe)
        want = sum(1 for n in pool if not self.cluster.nodes[n].train_wait)
        pending = sum(1 for t in self.placement.incoming if t.is_train)
        pending += len(self.placement.deferred)
        for _ in range(want - pending):
            task = Task(self.next_id, TaskKind.TRAIN, now, p.backlog_tokens, 0, batch_size=p.backlog_batch)
            self.next_id += 1
            self.drawn += 1
            self.ledger.admit(task)
            too_big = self.memory.too_big(task)
            if too_big:
                self.ledger.fail(task, -1, too_big)
                return   # every draw would be the same
            self.placement.offer(task)
