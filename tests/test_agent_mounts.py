"""mounts.mount_virtiofs_when_present: the agent's wait for a hot-plugged VirtioFS device (pure
logic; the real hot-plug and mount run in tests/test_pool.py)."""

from __future__ import annotations

import errno
import threading
import time

import pytest

from capsem_agent import mounts


@pytest.fixture
def fake_sysfs(tmp_path, monkeypatch):
    devices = tmp_path / "virtiofs"
    devices.mkdir()
    monkeypatch.setattr(mounts, "VIRTIOFS_DEVICES", str(devices))
    return devices


def test_retries_when_a_device_binds_and_not_before(fake_sysfs, monkeypatch):
    tries = []

    def fake_mount(tag, path, readonly):
        tries.append(time.monotonic())
        if not (fake_sysfs / "virtio2").exists():
            raise OSError(errno.EINVAL, "tag not found")

    monkeypatch.setattr(mounts, "mount_virtiofs", fake_mount)
    threading.Timer(0.3, lambda: (fake_sysfs / "virtio2").mkdir()).start()
    t0 = time.monotonic()
    mounts.mount_virtiofs_when_present("notebook", "/nb", False, wait=10)
    assert 0.25 < time.monotonic() - t0 < 5
    assert len(tries) == 2  # once at once, once when the device showed up: no busy retries


def test_retries_while_a_bound_device_is_still_being_probed(fake_sysfs, monkeypatch):
    """The driver core links the device into the driver's directory before the probe registered
    its tag: a device already listed whose mount fails is tried again without any further change
    in sysfs (this waited out the host's whole 20 s before)."""
    (fake_sysfs / "virtio2").mkdir()
    probed_at = time.monotonic() + 0.3
    tries = []

    def fake_mount(tag, path, readonly):
        tries.append(time.monotonic())
        if time.monotonic() < probed_at:
            raise OSError(errno.EINVAL, "tag not found")

    monkeypatch.setattr(mounts, "mount_virtiofs", fake_mount)
    t0 = time.monotonic()
    mounts.mount_virtiofs_when_present("notebook", "/nb", False, wait=10)
    assert time.monotonic() - t0 < 0.3 + 3 * mounts.PROBE_RETRY
    assert len(tries) <= 0.3 / mounts.PROBE_RETRY + 3  # paced, not a busy loop


def test_gives_up_after_wait(fake_sysfs, monkeypatch):
    def fake_mount(tag, path, readonly):
        raise OSError(errno.EINVAL, "tag not found")

    monkeypatch.setattr(mounts, "mount_virtiofs", fake_mount)
    t0 = time.monotonic()
    with pytest.raises(OSError):
        mounts.mount_virtiofs_when_present("notebook", "/nb", False, wait=0.3)
    assert 0.25 < time.monotonic() - t0 < 3


def test_no_wait_means_one_try_and_other_errors_are_not_retried(fake_sysfs, monkeypatch):
    tries = []

    def fake_mount(tag, path, readonly):
        tries.append(1)
        raise OSError(errno.EACCES if len(tries) > 1 else errno.EINVAL, "no")

    monkeypatch.setattr(mounts, "mount_virtiofs", fake_mount)
    with pytest.raises(OSError):
        mounts.mount_virtiofs_when_present("notebook", "/nb", False, wait=0)
    assert len(tries) == 1
    tries.clear()
    threading.Timer(0.1, lambda: (fake_sysfs / "virtio3").mkdir()).start()
    with pytest.raises(OSError) as err:
        mounts.mount_virtiofs_when_present("notebook", "/nb", False, wait=10)
    assert err.value.errno == errno.EACCES and len(tries) == 2
