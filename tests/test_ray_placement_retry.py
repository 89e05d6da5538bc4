"""A node actor that dies while being placed (its node was just lost: Ray lists a lost node as dead
only after its health checks fail, and may schedule there meanwhile) is placed again within the
same deadline, a bounded number of times, instead of failing the kernel's start with
ActorDiedError (seen on the multi-node cluster, tests/test_ray_capsem.py). A real local Ray
cluster with a `capsem` resource; the actor stands in for the node actor and dies the way an actor
on a lost node does (its process exits)."""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path

import pytest

ray = pytest.importorskip("ray")

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]


@pytest.fixture(scope="module")
def cluster():
    ray.init(num_cpus=2, resources={"capsem": 4}, include_dashboard=False, log_to_driver=False,
             _temp_dir=tempfile.mkdtemp(prefix="capsem-rpr-ray-"))
    try:
        yield ray.get_runtime_context().gcs_address
    finally:
        ray.shutdown()


def dying_actor(deaths_file: Path, deaths: int):
    @ray.remote(num_cpus=0, max_restarts=0)
    class Dying:
        def facts(self):
            seen = int(deaths_file.read_text()) if deaths_file.exists() else 0
            if seen < deaths:
                deaths_file.write_text(str(seen + 1))
                os._exit(1)  # the actor's process is gone, as on a lost node
            return {"node": "survivor"}
    return lambda: Dying


def test_an_actor_that_dies_while_placed_is_placed_again(cluster, tmp_path, monkeypatch):
    from capsem_kernel.ray import placement
    deaths = tmp_path / "deaths"
    monkeypatch.setattr(placement, "actor_class", dying_actor(deaths, placement.PLACE_ATTEMPTS - 1))
    actor, facts = placement.place(cluster, timeout=120)
    try:
        assert facts == {"node": "survivor"} and deaths.read_text() == str(placement.PLACE_ATTEMPTS - 1)
    finally:
        placement.kill(actor)


def test_placement_gives_up_after_its_attempts_with_a_clear_error(cluster, tmp_path, monkeypatch):
    from capsem_kernel.ray import placement
    deaths = tmp_path / "deaths"
    monkeypatch.setattr(placement, "actor_class", dying_actor(deaths, 100))
    t0 = time.monotonic()
    with pytest.raises(placement.PlacementError) as err:
        placement.place(cluster, timeout=120)
    assert err.value.code == "placement_timeout" and "died 3 times while being placed" in str(err.value)
    assert deaths.read_text() == str(placement.PLACE_ATTEMPTS)
    assert time.monotonic() - t0 < 60  # bounded by the attempts, not the 120 s timeout
