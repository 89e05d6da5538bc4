"""PID 1 of the guest: set up the system, run the agent service in a child, reap everything,
power off when the service ends.

PID 1 must never die (the kernel panics) and must reap orphans (zombies would pile up). So the
supervisor does as little as possible: no threads, no asyncio, no imports it does not need.
Outside a VM (not PID 1) the service simply runs in-process, which is how host tests run it.

Boot order: PID 1 forks the service first, so that the service imports its modules (most of the
agent's start-up time under TCG) while PID 1 sets up the system (sysinit) on another vCPU. The
service waits for the end of that setup (EOF on a pipe) before it connects to the host.
"""

from __future__ import annotations

import os
import signal
import sys
import time

RB_POWER_OFF = 0x4321FEDC
RB_HALT_SYSTEM = 0xCDEF0123

# Signals PID 1 must shrug off. The service child gets them back at their defaults.
_IGNORED = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT, signal.SIGUSR1,
            signal.SIGUSR2, signal.SIGPIPE, signal.SIGTSTP, signal.SIGTTIN, signal.SIGTTOU)


def _run_service(setup_done: int | None = None) -> int:
    from . import boot_mark, service
    boot_mark("imports_s")
    if setup_done is not None:
        while os.read(setup_done, 1):  # EOF: PID 1 finished sysinit.setup()
            pass
        os.close(setup_done)
        from . import sysinit
        sysinit.process_defaults()  # the environment and umask setup() gave PID 1
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
        import ctypes  # only here: keep it off the boot path
        libc = ctypes.CDLL(None, use_errno=True)
        libc.reboot(ctypes.c_int(RB_POWER_OFF))
        libc.reboot(ctypes.c_int(RB_HALT_SYSTEM))
    except Exception:  # noqa: BLE001
        pass
    # Last resort: PID 1 exiting panics the kernel; with panic=-1 and -no-reboot QEMU exits too.
    os._exit(1)


def _supervise() -> None:
    for sig in _IGNORED:
        signal.signal(sig, signal.SIG_IGN)
    setup_done, setup_signal = os.pipe()
    try:
        service_pid = os.fork()
    except OSError as exc:
        sys.stderr.write(f"capsem-agent: fork failed: {exc}\n")
        _power_off()
    if service_pid == 0:
        code = 1
        try:
            os.close(setup_signal)
            _restore_child_signals()
            code = _run_service(setup_done)
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else 1
        except BaseException as exc:  # noqa: BLE001 - report, then let PID 1 power off
            from . import sysinit
            sysinit.log(f"service crashed: {exc!r}")
        finally:
            try:
                sys.stdout.flush()
                sys.stderr.flush()
            except Exception:  # noqa: BLE001
                pass
            os._exit(code)
    os.close(setup_done)
    from . import sysinit
    try:
        sysinit.setup()
    finally:
        os.close(setup_signal)  # the service goes ahead (whatever setup managed to do)
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
    # Not PID 1 (host-side tests): start from default dispositions too, not from whatever the
    # launcher ignored (a shell's background job ignores SIGINT, and execs would inherit it).
    _restore_child_signals()
    sys.exit(_run_service())


if __name__ == "__main__":
    main()
