"""Placement: one STRICT_PACK placement group per LeMix node, one bundle per stage."""
from __future__ import annotations

import pytest

from lemix.engine.backend import BackendError
from lemix.engine.backends import make_backend
from lemix.engine.messages import Memory
from lemix.engine.model import build_builtin_tiny, split_stages

pytestmark = pytest.mark.ray


def _start(backend, nodes=2, stages=2):
    model = build_builtin_tiny(seed=0, num_layers=2)
    backend.start([split_stages(model, stages) for _ in range(nodes)], ["cpu"] * stages, lr=1e-3,
                  weight_decay=0.0, memory_budget_bytes=None)
    return backend


def test_two_nodes_get_two_strict_pack_groups_with_a_gpu_per_stage(ray_cluster):
    from ray.util.placement_group import placement_group_table

    backend = _start(make_backend("ray", num_gpus_per_stage=1))
    try:
        assert sorted(backend.placement_groups) == [0, 1]
        for n, pg in backend.placement_groups.items():
            table = placement_group_table(pg)
            assert table["strategy"] == "STRICT_PACK" and table["state"] == "CREATED"
            assert [b["GPU"] for b in table["bundles"].values()] == [1.0, 1.0]
            assert len(set(table["bundles_to_node_id"].values())) == 1   # one machine per node
        desc = backend.describe()
        assert [p["node"] for p in desc["nodes"]] == [0, 1]
        assert all(len(p["bundles"]) == 2 and p["bundles"][0]["GPU"] == 1.0 for p in desc["nodes"])
        # 4 actors share the 2 cores: fractional CPUs
        assert desc["bundle"]["CPU"] == 0.5
        # every (node, stage) actor answers with its own stage
        assert backend.call(1, 1, Memory()).weights_bytes > 0
        assert ray_cluster.available_resources().get("GPU", 0) == 0
    finally:
        backend.shutdown()
    assert backend.placement_groups == {}
    assert ray_cluster.is_initialized()   # the caller's Ray is left running


def test_cpu_only_bundles_share_the_cores_when_no_gpu_is_requested(ray_cluster):
    backend = make_backend("ray")
    assert backend.bundle_for(2, ["cpu"]) == {"CPU": 1.0}
    assert backend.bundle_for(8, ["cpu"] * 2) == {"CPU": 0.25}
    assert make_backend("ray", num_cpus_per_stage=2).bundle_for(4, ["cpu"]) == {"CPU": 2}
    assert make_backend("ray", num_gpus_per_stage=0.5).bundle_for(4, ["cpu"]) == {"GPU": 0.5, "CPU": 0.5}
    with pytest.raises(BackendError, match="no GPU resources"):
        make_backend("ray", num_gpus_per_stage=0).bundle_for(2, ["cuda:0"])


def test_asking_for_more_gpus_than_the_cluster_has_is_a_clear_error(ray_cluster):
    with pytest.raises(BackendError, match="need 6 GPUs"):
        _start(make_backend("ray", num_gpus_per_stage=1), nodes=3, stages=2)
