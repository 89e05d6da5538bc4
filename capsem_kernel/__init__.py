"""capsem_kernel: the Jupyter side of capsem (provisioner, kernelspec, server extension)."""


def _jupyter_labextension_paths() -> list[dict]:
    """Where the prebuilt JupyterLab extension lives (for `jupyter labextension develop`)."""
    return [{"src": "labextension", "dest": "@capsem/jupyterlab-capsem"}]


def _jupyter_server_extension_points() -> list[dict]:
    return [{"module": "capsem_kernel.server"}]
