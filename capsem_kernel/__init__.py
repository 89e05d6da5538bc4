"""capsem_kernel: the Jupyter side of capsem (provisioner, kernelspec, server extension)."""
