"""Snapshot probe (issue 19, goal 4): can a booted guest be saved to a file and restored under QEMU 7.2
with our devices, and what does it cost? Prints one JSON object (and --json FILE).

    python bench/snapshot_probe.py [--vmgenid] [--reseed] [--prewarm] [--json FILE]

Boots the image's kernel and initramfs on the same machine type, memory backend (shared memfd), root
disk (virtio-blk, the EROFS image, read-only) and -sandbox as capsem_vm/qemu.py, with a probe /init
appended to the initramfs (kernel arg rdinit=/probe-init): it loads the boot modules, mounts the
EROFS root and runs one Python process listening on vsock port 9999 (a stand-in for a pre-warmed
kernel: its `random` state is in the snapshot). Per connection it reads one line (hex host entropy,
or empty), reports os.urandom, random.random() and uuid4, and with entropy: RNDADDENTROPY +
RNDRESEEDCRNG, random.seed(), and reports again.

Steps: vhost-user-vsock hot-plugged at once on a spare root port (rp2) -> query-migrate's
blocked-reasons; a vhost-user-fs (C virtiofsd) hot-plugged too -> blocked-reasons; both unplugged
(device_del, DEVICE_DELETED) -> blocked-reasons; `stop`, `migrate` to an fd of a file (QEMU 7.2 has
no file: URI, and exec: spawns a shell, which -sandbox spawn=deny forbids); then twice: a new QEMU
with `-incoming fd:N` on that file (and a new vhost-device-vsock), `cont`, vsock hot-plugged again,
a host -> guest vsock round trip. Needs the VM lock (boots 3 QEMUs; about 30 s).
--vmgenid adds `-device vmgenid,guid=auto` (a new GUID per QEMU start: a guest with the vmgenid
driver reseeds its CRNG on restore). --reseed sends 32 bytes of host entropy on each restored call.
"""
import argparse
import atexit, asyncio, io, json, os, shutil, socket, subprocess, sys, tempfile, time
from pathlib import Path

sys.path[:0] = [str(Path(__file__).resolve().parents[1])]
from qemu.qmp import QMPClient
from capsem_vm import helpers
from capsem_vm.image.store import resolve_image
from capsem_vm.image import initramfs
from capsem_vm.image.cpio import NewcWriter
from capsem_vm.qemu import BASE_KERNEL_ARGS, TCG_KERNEL_ARGS

IMG = resolve_image(None)
T = Path(tempfile.mkdtemp(prefix="cs-probe-")); os.chmod(T, 0o755)
atexit.register(shutil.rmtree, T, True)
PROBE_INIT = b"""#!/bin/sh
export PATH=/bin
mount -t proc proc /proc; mount -t sysfs sysfs /sys; mount -t devtmpfs devtmpfs /dev
while read -r m; do insmod $m; done </etc/capsem/modules.boot
mkdir -p /lower; mount -t erofs -o ro /dev/vda /lower
mount -t proc proc /lower/proc 2>/dev/null; mount -t devtmpfs devtmpfs /lower/dev 2>/dev/null
echo "PROBE-VMGENID device: $(ls /sys/bus/acpi/devices/ | grep -c QEMUVGID) driver: $(ls -d /sys/bus/acpi/drivers/vmgenid 2>/dev/null | wc -l)"
chroot /lower /usr/bin/python3 -I -S -c '
import socket, os, random, uuid, fcntl, struct
PREWARM
random.random()  # a pre-warmed process: its Mersenne Twister state is in the snapshot
s = socket.socket(socket.AF_VSOCK, socket.SOCK_STREAM); s.bind((socket.VMADDR_CID_ANY, 9999)); s.listen(4)
print("PROBE-LISTENING", flush=True)
def state():
    return "urandom=%s random=%.12f uuid4=%s" % (os.urandom(8).hex(), random.random(), uuid.uuid4())
while True:
    c, _ = s.accept()
    f = c.makefile("rb")
    seed = f.readline().strip()
    print("PROBE call, seed bytes:", len(seed) // 2, flush=True)
    before = state()
    if seed:
        data = bytes.fromhex(seed.decode())
        with open("/dev/urandom", "wb") as u:
            fcntl.ioctl(u, 0x40085203, struct.pack("ii", len(data) * 8, len(data)) + data)  # RNDADDENTROPY
            fcntl.ioctl(u, 0x5207)  # RNDRESEEDCRNG
        random.seed()  # from os.urandom, after the kernel reseed
    c.sendall(("before: %s | after: %s\\n" % (before, state())).encode()); c.close()
' &
echo PROBE-READY
while true; do sleep 1; done
"""

def probe_initrd():
    # --prewarm: the listener imports ipykernel's app first (like the pool's pre-started kernel), so
    # the snapshot holds a realistic amount of guest memory
    prewarm = (b'import sys; sys.path.append("/usr/lib/python3/dist-packages"); import ipykernel.kernelapp; '
               b'print("PROBE-PREWARMED", flush=True)') if ARGS.prewarm else b""
    buf = io.BytesIO(); w = NewcWriter(buf); w.file("probe-init", PROBE_INIT.replace(b"PREWARM", prewarm), 0o755)
    w.close()
    p = T / "initrd"; real = (IMG / "initrd.img").read_bytes(); real += b"\0" * (-len(real) % 4)
    p.write_bytes(real + initramfs.compress(buf.getvalue(), initramfs.COMPRESSION, None)); return p

def qemu_argv(tag, extra=()):
    args = " ".join(BASE_KERNEL_ARGS + TCG_KERNEL_ARGS + ("rdinit=/probe-init",))
    return ["/usr/bin/qemu-system-x86_64", "-nodefaults", "-no-user-config", "-nographic", "-display", "none",
            "-no-reboot", "-machine", "q35,accel=tcg,memory-backend=mem", "-cpu", "max", "-smp", "2", "-m", "512M",
            "-object", "memory-backend-memfd,id=mem,size=512M,share=on",
            "-kernel", str(IMG / "vmlinuz"), "-initrd", str(T / "initrd"), "-append", args,
            "-drive", f"file={IMG / 'rootfs.erofs'},if=none,id=rootfs,format=raw,readonly=on",
            "-device", "virtio-blk-pci,drive=rootfs",
            "-serial", f"file:{T}/console-{tag}.log",
            "-qmp", f"unix:{T}/qmp-{tag}.sock,server=on,wait=off",
            "-sandbox", "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny",
            "-device", "pcie-root-port,id=rp1,bus=pcie.0,chassis=1",
            "-device", "pcie-root-port,id=rp2,bus=pcie.0,chassis=2",
            "-chardev", f"socket,id=vsock,path={T}/vu-{tag}.sock",
            *(["-device", "vmgenid,guid=auto"] if ARGS.vmgenid else []), *extra]

CHILDREN: list[subprocess.Popen] = []  # killed at the end, also when a step fails


def vsock_backend(tag):
    p = subprocess.Popen([str(helpers.vhost_device_vsock().path), "--guest-cid", "3", "--socket", f"{T}/vu-{tag}.sock",
                          "--uds-path", f"{T}/vm-{tag}.vsock"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    CHILDREN.append(p)
    for _ in range(500):
        if os.path.exists(f"{T}/vu-{tag}.sock"): break
        time.sleep(0.01)
    return p

async def qmp(tag):
    c = QMPClient()
    for _ in range(500):
        try:
            await c.connect(f"{T}/qmp-{tag}.sock"); return c
        except Exception:
            await asyncio.sleep(0.01)
    raise RuntimeError("no qmp")

def guest_call(tag, timeout=60, seed=b""):
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        try:
            s = socket.socket(socket.AF_UNIX); s.settimeout(5); s.connect(f"{T}/vm-{tag}.vsock")
            s.sendall(b"CONNECT 9999\n"); f = s.makefile("rb")
            ok = f.readline(); s.sendall(seed.hex().encode() + b"\n")
            if ok.startswith(b"OK"):
                line = f.readline()
                if line: return line.decode().strip(), time.monotonic() - t0
        except OSError:
            pass
        time.sleep(0.05)
    console = (T / f"console-{tag}.log").read_text(errors="replace")[-2000:]
    raise RuntimeError(f"guest vsock not answering; console:\n{console}")

async def quit(c):
    try:
        await c.execute("quit")
    except Exception:
        pass
    try:
        await c.disconnect()
    except Exception:
        pass


async def blocked(c):
    return (await c.execute("query-migrate")).get("blocked-reasons", [])

async def wait_event(c, name, dev, timeout=30):
    async def w():
        async for ev in c.events:
            if ev["event"] == name and ev.get("data", {}).get("device") == dev: return ev
    return await asyncio.wait_for(w(), timeout)

async def main():
    probe_initrd()
    out = {}
    # --- A: boot, vsock hot-plugged at once on rp2
    ba = vsock_backend("a")
    t0 = time.monotonic()
    qa = subprocess.Popen(qemu_argv("a"), stdout=open(T / "qemu-a.log", "wb"), stderr=subprocess.STDOUT)
    CHILDREN.append(qa)
    c = await qmp("a")
    await c.execute("device_add", {"driver": "vhost-user-vsock-pci", "chardev": "vsock", "bus": "rp2", "id": "vs"})
    out["blocked_with_vsock"] = await blocked(c)
    line, _ = guest_call("a", 120)
    out["A_boot_to_guest_vsock_s"] = time.monotonic() - t0
    out["A_reply"] = line
    out["guest_vmgenid"] = next((l[l.find("PROBE-VMGENID"):].strip() for l in (T / "console-a.log").read_text(errors="replace").splitlines()
                                 if "PROBE-VMGENID" in l), None)
    # vhost-user-fs: hot-plug one (C virtiofsd) to see whether it blocks too
    share = T / "share"; share.mkdir()
    fsd = subprocess.Popen(["/usr/lib/qemu/virtiofsd", f"--socket-path={T}/fs.sock", "-o", f"source={share}",
                            "-o", "cache=auto"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    CHILDREN.append(fsd)
    for _ in range(500):
        if os.path.exists(f"{T}/fs.sock"): break
        time.sleep(0.01)
    await c.execute("chardev-add", {"id": "fs0", "backend": {"type": "socket", "data": {
        "addr": {"type": "unix", "data": {"path": f"{T}/fs.sock"}}, "server": False}}})
    await c.execute("device_add", {"driver": "vhost-user-fs-pci", "chardev": "fs0", "tag": "nb", "bus": "rp1", "id": "fs"})
    out["blocked_with_vsock_and_fs"] = await blocked(c)
    t1 = time.monotonic()
    await c.execute("device_del", {"id": "fs"}); await wait_event(c, "DEVICE_DELETED", "fs")
    out["fs_unplug_s"] = time.monotonic() - t1
    fsd.kill()
    t1 = time.monotonic()
    await c.execute("device_del", {"id": "vs"})
    await wait_event(c, "DEVICE_DELETED", "vs")
    out["vsock_unplug_s"] = time.monotonic() - t1
    out["blocked_after_unplug"] = await blocked(c)
    # --- snapshot: stop, migrate to a file through an fd (7.2: no file: URI; exec: is denied by -sandbox spawn=deny)
    await c.execute("stop")
    snap = T / "snap.bin"
    fd = os.open(snap, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    c.send_fd_scm(fd); await c.execute("getfd", {"fdname": "snap"}); os.close(fd)
    t1 = time.monotonic()
    await c.execute("migrate", {"uri": "fd:snap"})
    while True:
        st = await c.execute("query-migrate")
        if st.get("status") in ("completed", "failed", "cancelled"): break
        await asyncio.sleep(0.02)
    out["save_s"] = time.monotonic() - t1; out["save_status"] = st.get("status"); out["save_error"] = st.get("error-desc")
    out["snapshot_bytes"] = snap.stat().st_size
    await quit(c); qa.wait(10); ba.kill()
    if out["save_status"] != "completed":
        print(json.dumps(out, indent=1)); shutil.rmtree(T, ignore_errors=True); return
    # --- B, C: restore twice from the one snapshot
    for tag in ("b", "c"):
        bb = vsock_backend(tag)
        fd = os.open(snap, os.O_RDONLY)
        t0 = time.monotonic()
        qb = subprocess.Popen(qemu_argv(tag, ("-incoming", f"fd:{fd}")), pass_fds=(fd,),
                              stdout=open(T / f"qemu-{tag}.log", "wb"), stderr=subprocess.STDOUT)
        CHILDREN.append(qb)
        os.close(fd)
        c = await qmp(tag)
        while True:
            st = await c.execute("query-status")
            if st["status"] in ("running", "paused", "postmigrate") and st["status"] != "inmigrate": break
            await asyncio.sleep(0.01)
        out[f"{tag}_restore_status"] = st["status"]
        if st["status"] != "running":
            await c.execute("cont")
        out[f"{tag}_restore_s"] = time.monotonic() - t0
        t1 = time.monotonic()
        await c.execute("device_add", {"driver": "vhost-user-vsock-pci", "chardev": "vsock", "bus": "rp2", "id": "vs"})
        line, _ = guest_call(tag, 60, os.urandom(32) if ARGS.reseed else b"")
        out[f"{tag}_hotplug_to_guest_vsock_s"] = time.monotonic() - t1
        out[f"{tag}_total_s"] = time.monotonic() - t0
        out[f"{tag}_reply"] = line
        out[f"{tag}_qemu_pss_kb"] = sum(int(l.split()[1]) for l in open(f"/proc/{qb.pid}/smaps_rollup") if l.startswith("Pss:"))
        await quit(c); qb.wait(10); bb.kill()
    out["args"] = vars(ARGS) | {"json": None}
    out["load"] = [load0, " ".join(Path("/proc/loadavg").read_text().split()[:3])]
    print(json.dumps(out, indent=1))
    if ARGS.json:
        Path(ARGS.json).write_text(json.dumps(out, indent=1))
    shutil.rmtree(T, ignore_errors=True)


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--vmgenid", action="store_true")
    ap.add_argument("--reseed", action="store_true")
    ap.add_argument("--prewarm", action="store_true", help="import ipykernel.kernelapp before the snapshot")
    ap.add_argument("--json")
    ARGS = ap.parse_args()
    load0 = " ".join(Path("/proc/loadavg").read_text().split()[:3])
    try:
        asyncio.run(main())
    finally:
        for child in CHILDREN:
            if child.poll() is None:
                child.kill()
                child.wait()
        shutil.rmtree(T, ignore_errors=True)
