"""Late binding of training tasks and liveness of the deferred queue (issue 10; ours).

Late binding: a node takes a training task only while fewer than `train_queue_depth` placed
training tasks wait on it to enter its pipeline; the rest wait in the scheduler's deferred
queue (FIFO) and are placed, one at a time, on the best node that has room when one has. Under
a training backlog, tasks placed at arrival pile up on the nodes that scored best then: the
queues drift apart and the run ends with some nodes idle while others still work through theirs
(4 x 2 at 32 tasks/s, 80% training: 20% idle devices at a training backlog). Bound each queue
and the cluster drains evenly, and each task is placed with what is known when a node is about
to need it. While no node has room, nothing is starved (every node is busy with training), so
the starvation bounds (`max_defer_s`, `min_train_share`) do not force a placement.

Liveness: a cluster with deferred training and nothing else queued or running places it at
once (Eq. 4 has no inference to protect there), so deferred work never waits out `max_defer_s`
on an idle cluster.

`--no-late-binding` restores placement at arrival.
"""
from __future__ import annotations

from lemix.sched.cluster import Cluster
from lemix.sched.params import SchedParams
from lemix.sched.state import NodeState


class TrainAdmission:
    def __init__(self, params: SchedParams, cluster: Cluster, *, late_binding: bool) -> None:
        self.late_binding = late_binding
        self.depth = max(1, params.train_queue_depth)
        self.cluster = cluster

    def room(self, node: int) -> bool:
        """Node `node` may take another training task now."""
        return not self.late_binding or len(self.cluster.nodes[node].train_wait) < self.depth

    def any_room(self, nodes: list[int]) -> bool:
        return not self.late_binding or any(self.room(n) for n in nodes)

    def cluster_idle(self) -> bool:
        """Nothing queued, in flight or running on any healthy node."""
        return all(n.is_idle() for n in self.cluster.nodes if n.healthy)

    @staticmethod
    def node_has_room(node: NodeState, depth: int) -> bool:
        return len(node.train_wait) < depth
