"""capsem_kernel: the Jupyter side of capsem (provisioner, kernelspec, server extension)."""


def _jupyter_labextension_paths() -> list[dict]:
    """Where the prebuilt JupyterLab extension lives (for `jupyter labextension develop`)."""
    return [{"src": "labextension", "dest": "@capsem/jupyterlab-capsem"}]


def _jupyter_server_extension_points() -> list[dict]:
    return [{"module": "capsem_kernel.server"}]


# The agent API, imported on first use: the provisioner and the server extension import this
# package too, and need none of it.
_LAZY = {"Sandbox": "sandbox", "SandboxError": "sandbox", "AsyncSandbox": "async_sandbox",
         "Execution": "execution", "Result": "execution", "ExecutionError": "execution",
         "OutputMessage": "execution", "Logs": "execution", "CommandResult": "commands",
         "EntryInfo": "files", "FilesError": "files", "PathRefused": "files"}


def __getattr__(name: str):
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    import importlib
    return getattr(importlib.import_module(f".{module}", __name__), name)
