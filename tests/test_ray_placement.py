"""Placement refusals on a real Ray cluster with no `capsem` node (issue 18): refused at once with
a clear error, never a hang, and nothing is started. No VM (the cluster has nowhere to boot one)."""

from __future__ import annotations

import tempfile
import time

import pytest

ray = pytest.importorskip("ray")

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]


@pytest.fixture(scope="module")
def cluster():
    ray.init(num_cpus=1, include_dashboard=False, log_to_driver=False,
             _temp_dir=tempfile.mkdtemp(prefix="capsem-rp-ray-"))
    try:
        yield ray.get_runtime_context().gcs_address
    finally:
        ray.shutdown()


def test_a_cluster_without_capsem_nodes_is_refused_at_once(cluster):
    from capsem_kernel.ray import placement
    t0 = time.monotonic()
    with pytest.raises(placement.PlacementError) as err:
        placement.place(cluster, timeout=120)
    assert err.value.code == "no_capsem_nodes"
    assert "advertises the 'capsem' resource" in str(err.value) and "ray start --resources" in str(err.value)
    assert time.monotonic() - t0 < 10  # not the placement timeout


def test_the_sandbox_says_why(cluster, tmp_path):
    from capsem_kernel import Sandbox
    from capsem_kernel.sandbox import SandboxError
    t0 = time.monotonic()
    with pytest.raises(SandboxError, match="advertises the 'capsem' resource"):
        Sandbox(ray_address=cluster, use_pool=False, placement_timeout=120)
    assert time.monotonic() - t0 < 30
    assert not [a for a in ray.util.list_named_actors(all_namespaces=True)]  # nothing left placed
