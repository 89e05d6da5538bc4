"""Placing a kernel's node actor on the Ray cluster: connect, place with a bounded wait, check the
folder. Blocking Ray calls: run them in a worker thread (asyncio.to_thread).

Refusals are clear and never hang: a cluster where no node advertises `capsem` is refused at once;
one whose `capsem` nodes are all busy (or cannot take the actor) after `timeout` s; a folder the
chosen node cannot see (not there, or another directory at the same path) at placement, before
anything is started on the node.
"""

from __future__ import annotations

import logging
import os
import secrets
import threading
import time
from typing import Any

from .node import actor_class

log = logging.getLogger(__name__)

RESOURCE = "capsem"
PLACE_ATTEMPTS = 3  # an actor that dies while being placed (a node just lost) is placed again
_connect_lock = threading.Lock()


class PlacementError(RuntimeError):
    """The kernel cannot be placed; `code` is stable (no_capsem_nodes, placement_timeout,
    folder_unseen)."""

    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code


def connect(address: str | None) -> None:
    """Join the cluster at `address` as a driver, once per process (a process that already joined
    one, e.g. a test's or an agent platform's, keeps it)."""
    import ray
    with _connect_lock:
        if not ray.is_initialized():
            ray.init(address=address or "auto", ignore_reinit_error=True, log_to_driver=False,
                     configure_logging=False)


def place(address: str | None, timeout: float, resources: dict[str, float] | None = None) -> tuple[Any, dict]:
    """A CapsemNode actor on a node with a free `capsem` resource, and the node's facts.
    `resources`: more resources the node must have (e.g. {"capsem-node-a": 0.001} to pin a node)."""
    import ray
    from ray.exceptions import GetTimeoutError
    connect(address)
    if ray.cluster_resources().get(RESOURCE, 0) < 1:
        raise PlacementError("no_capsem_nodes", f"no node of the Ray cluster at {address or 'auto'} advertises the "
                             f"'{RESOURCE}' resource: start capsem nodes with `ray start --resources "
                             f"'{{\"{RESOURCE}\": N}}'` on hosts where `capsem doctor` passes")
    from ray.exceptions import RayActorError
    deadline = time.monotonic() + timeout
    for attempt in range(1, PLACE_ATTEMPTS + 1):
        actor = actor_class().options(resources={RESOURCE: 1, **(resources or {})}).remote()
        try:
            facts = ray.get(actor.facts.remote(), timeout=max(0.0, deadline - time.monotonic()))
        except GetTimeoutError:
            ray.kill(actor, no_restart=True)
            raise PlacementError("placement_timeout", f"no Ray node with a free '{RESOURCE}' resource"
                                 f"{' and ' + ', '.join(resources) if resources else ''} took the kernel within "
                                 f"{timeout:.0f} s (all busy, or none fits)") from None
        except RayActorError as exc:
            # placed on a node that was dying: Ray lists a lost node as dead only after its health
            # checks fail (~1.5 s), and may schedule there meanwhile. Place again, on another node
            # once Ray knows; bounded by the attempts and the same deadline.
            ray.kill(actor, no_restart=True)
            if attempt == PLACE_ATTEMPTS or time.monotonic() >= deadline:
                raise PlacementError("placement_timeout", f"the kernel's node actor died {attempt} times while "
                                     f"being placed (nodes lost?): {exc}") from None
            log.warning("capsem: the kernel's node actor died while being placed (%s): placing it again", exc)
            time.sleep(min(1.0, max(0.0, deadline - time.monotonic())))
            continue
        except BaseException:
            ray.kill(actor, no_restart=True)
            raise
        return actor, facts
    raise AssertionError("unreachable")


def check_folder(actor: Any, folder: str, node: str, timeout: float = 30.0) -> None:
    """Raise PlacementError(folder_unseen) unless the actor's node sees `folder` as the front end
    does: a marker file made here must be there (a shared filesystem mounted at the same path)."""
    import ray
    marker: str | None = f".capsem-placement-{secrets.token_hex(16)}"
    path = os.path.join(folder, marker)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        os.close(fd)
    except OSError as exc:  # a read-only folder: the node checks only that the directory is there
        log.warning("capsem: cannot write a placement marker in %s (%s): checking only that the node "
                    "sees a directory there", folder, exc.strerror)
        marker = None
    try:
        verdict = ray.get(actor.check_folder.remote(folder, marker), timeout=timeout)
    finally:
        if marker is not None:
            try:
                os.unlink(path)
            except OSError:
                pass
    if not verdict.get("ok"):
        raise PlacementError("folder_unseen", f"node {node} cannot use the folder {folder}: {verdict.get('reason')}. "
                             "The folder must be on a filesystem every capsem node mounts at the same path "
                             "(NFS, CephFS, a Kubernetes volume); a Sandbox without a folder gets a node-local one")


def _sweep_here() -> dict:
    from capsem_vm import sweep

    from .node import sweep_private
    return {**sweep.sweep(), "ray_private": sweep_private()}


def sweep_node(node_id: str, timeout: float = 60.0) -> dict | None:
    """Run capsem's sweep (capsem_vm/sweep.py) on node `node_id`: what a dead actor's VM left in the
    node's runtime dir (its helpers died with it; its files stay until a sweep). None if it could
    not run there (the node is gone too)."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy
    task = ray.remote(num_cpus=0, max_retries=0)(_sweep_here).options(
        scheduling_strategy=NodeAffinitySchedulingStrategy(node_id, soft=False))
    try:
        return ray.get(task.remote(), timeout=timeout)
    except Exception as exc:  # noqa: BLE001 - the node is gone: nothing of it to sweep from here
        log.warning("capsem: could not sweep node %s after its kernel actor died: %s", node_id, exc)
        return None


def kill(actor: Any) -> None:
    import ray
    try:
        ray.kill(actor, no_restart=True)
    except Exception as exc:  # noqa: BLE001 - already dead, or Ray gone: nothing more to end
        log.debug("capsem: ray.kill: %s", exc)
