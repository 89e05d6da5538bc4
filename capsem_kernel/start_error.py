"""The error a capsem kernel start raises when capsem refuses or fails it for a reason a person can
act on (an invalid policy, a tampered image, a missing helper, a VM that did not boot).

jupyter_server answers a kernel start that raised anything but a tornado HTTPError with a bare
500 "Unhandled error" and an empty traceback, so JupyterLab and Kernel Gateway clients saw no
reason at all. KernelStartError is both: a CapsemError for in-process clients (nbclient, the
Sandbox API, `jupyter console`: str() is the message and its hint) and an HTTPError, whose message
jupyter_server puts in the JSON reply that JupyterLab shows in its "Error Starting Kernel" dialog.
"""

from __future__ import annotations

from tornado.web import HTTPError

from capsem_vm.errors import CapsemError

REASON = "Capsem kernel could not start"  # the HTTP reason phrase: short, ASCII, one line


class KernelStartError(CapsemError, HTTPError):
    def __init__(self, message: str, hint: str | None = None):
        CapsemError.__init__(self, message, hint)
        # HTTPError's fields, set by hand (its __init__ would replace args and the message)
        self.status_code = 500
        self._log_message = str(self)  # the message and its hint, exactly as CapsemError says them
        self.args = ()  # tornado formats _log_message % args when args is non-empty
        self.reason = REASON

    @property
    def log_message(self) -> str:
        # jupyter_server's API error reply shows log_message as is; tornado's own property doubles
        # every '%' (for a later % args), which would show "100%%" to the user
        return self._log_message

    @classmethod
    def from_capsem(cls, exc: CapsemError) -> "KernelStartError":
        return cls(exc.message, exc.hint)
