"""PID 1 of the guest: set up the system, run the agent service in a child, reap everything,
power off when the service ends.

PID 1 must never die (the kernel panics) and must reap orphans (zombies would pile up). So the
supervisor does as little as possible: no threads, no asyncio, no imports it does not need.
Outside a VM (not PID 1) the service simply runs in-process, which is how host tests run it.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys
import time

RB_POWER_OFF = 0x4321FEDC
RB_HALT_SYSTEM = 0xCDEF0123

# Signals PID 1 must shrug off. The service child gets them back at their defaults.
_IGNORED = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT, signal.SIGUSR1,
            signal.SIGUSR2, signal.SIGPIPE, signal.SIGTSTP, signal.SIGTTIN, signal.SIGTTOU)


def _run_service() -> int:
    from . import service
    return service.main()


def _restore_child_signals() -> None:
    for sig in _IGNORED:
        signal.signal(sig, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.default_int_handler)


def _power_off() -> None:
    """Stop every process, flush, power off. QEMU runs with -no-reboot, so this ends the VM."""
    for sig, wait in ((signal.SIGTERM, 1.0), (signal.SIGKILL, 0.5)):
        try:
            os.kill(-1, sig)
        except OSError:
            pass
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            try:
                pid, _ = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                break
            if pid == 0:
                time.sleep(0.02)
    os.sync()
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.reboot(ctypes.c_int(RB_POWER_OFF))
        libc.reboot(ctypes.c_int(RB_HALT_SYSTEM))
    except Exception:  # noqa: BLE001
        pass
    # Last resort: PID 1 exiting panics the kernel; with panic=-1 and -no-reboot QEMU exits too.
    os._exit(1)


def _supervise() -> None:
    from . import sysinit

    for sig in _IGNORED:
        signal.signal(sig, signal.SIG_IGN)
    sysinit.setup()
    try:
        service_pid = os.fork()
    except OSError as exc:
        sysinit.log(f"fork failed: {exc}")
        _power_off()
    if service_pid == 0:
        code = 1
        try:
            _restore_child_signals()
            code = _run_service()
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else 1
        except BaseException as exc:  # noqa: BLE001 - report, then let PID 1 power off
            sysinit.log(f"service crashed: {exc!r}")
        finally:
            try:
                sys.stdout.flush()
                sys.stderr.flush()
            except Exception:  # noqa: BLE001
                pass
            os._exit(code)
    # Reap every child (ours and reparented orphans) until the service is gone.
    while True:
        try:
            pid, status = os.waitpid(-1, 0)
        except ChildProcessError:
            break
        except InterruptedError:
            continue
        except KeyboardInterrupt:  # cannot happen with SIGINT ignored; belt and braces
            continue
        if pid == service_pid:
            sysinit.log(f"service exited ({os.waitstatus_to_exitcode(status)}); powering off")
            break
    _power_off()


def main() -> None:
    if os.getpid() == 1:
        try:
            _supervise()
        finally:
            _power_off()  # whatever happened, never return from PID 1
    sys.exit(_run_service())


if __name__ == "__main__":
    main()
