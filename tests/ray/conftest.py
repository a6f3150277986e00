"""One local Ray instance for the whole test session: 2 CPUs, 4 logical GPUs, no dashboard, a
small object store. Ray tests skip when Ray is not installed."""
from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def ray_cluster():
    ray = pytest.importorskip("ray")
    started = not ray.is_initialized()
    if started:
        ray.init(num_cpus=2, num_gpus=4, include_dashboard=False, object_store_memory=200 * 1024 * 1024,
                 log_to_driver=False, configure_logging=False)
    yield ray
    if started:
        ray.shutdown()
