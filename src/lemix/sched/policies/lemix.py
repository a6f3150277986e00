"""LeMix placement: score nodes by forecast idleness, length consistency and response time.

`lemix` (default), sign-correct and scale-free:

    score = -max(II / (S * t_hat), tau) + lambda2 * LC' - lambda1 * R / SLO(task)

II is the idle time the placement leaves on the node's stages (seconds), t_hat the task's own mean
predicted stage time, so II / (S * t_hat) is in "stage-times per stage"; idleness under tau of that
unit counts as a tie. LC' = exp(-(l - mu_n)^2 / (2 sigma_n^2)) in [0, 1]; R / SLO is the predicted
response in units of the task's SLO. Higher is better.

Deprioritization (Eq. 4): a training task is not placed on a node whose inference is congested
(the predicted response of its queued inference exceeds tau_R x SLO); when every node is, it is
deferred; the scheduler re-offers it and bounds starvation.

`lemix-paper` is the research code's formula, sign bug included, for comparison:

    priority = (IP + lambda2 * LC) / (lambda1 * R),  IP = -max(II / S - arrival_gap, tau)

with LC the Gaussian density of the length and II counted from the previous op's end.
"""
from __future__ import annotations

from lemix.sched.policies.base import ClusterView, PolicyBase
from lemix.sched.registry import register
from lemix.types import Task


@register("lemix")
class Lemix(PolicyBase):
    infer_first = True

    def __init__(self, name, params) -> None:
        super().__init__(name, params)
        self.use_profile = not params.no_profile
        self.memory_check = not params.no_memory_check
        self.prioritize = not params.no_prioritization
        self.infer_first = self.prioritize
        self.lookahead = self.prioritize

    def score(self, task: Task, node: int, view: ClusterView) -> float:
        p = self.params
        f = view.forecast(node, task)
        s = view.params.stages
        ip = -max(f.ii_s / (s * max(f.stage_s, 1e-9)), p.tau)
        lc = view.length_stats(node).consistency(task.prompt_tokens)
        return ip + p.lambda2 * lc - p.lambda1 * f.r_s / view.slo_s(task)

    def place(self, task: Task, view: ClusterView, force: bool = False) -> int | None:
        nodes = view.candidate_nodes(task)
        if task.is_train and self.prioritize and not force:
            nodes = [n for n in nodes if not view.inference_congested(n)]
            if not nodes:
                return None
        best, best_score = nodes[0], float("-inf")
        for n in nodes:
            sc = self.score(task, n, view)
            if sc > best_score:
                best, best_score = n, sc
        return best


@register("lemix/no-profile")
class LemixNoProfile(Lemix):
    def __init__(self, name, params) -> None:
        super().__init__(name, params)
        self.use_profile = False


@register("lemix/no-prioritization")
class LemixNoPrioritization(Lemix):
    def __init__(self, name, params) -> None:
        super().__init__(name, params)
        self.prioritize = False
        self.infer_first = False
        self.lookahead = False


@register("lemix/no-memory-check")
class LemixNoMemoryCheck(Lemix):
    def __init__(self, name, params) -> None:
        super().__init__(name, params)
        self.memory_check = False


@register("lemix-paper")
class LemixPaper(Lemix):
    """The research code's score, kept exact for comparison (it prefers larger R for equal
    negative numerators)."""

    def score(self, task: Task, node: int, view: ClusterView) -> float:
        p = self.params
        f = view.forecast(node, task)
        gap = max(0.0, task.arrival_s - view.last_arrival_s(node))
        ip = -max(f.ii_paper_s / view.params.stages - gap, p.tau)
        lc = view.length_stats(node).density(task.prompt_tokens)
        return (ip + p.lambda2 * lc) / (max(p.lambda1, 1e-12) * max(f.r_s, 1e-9))
