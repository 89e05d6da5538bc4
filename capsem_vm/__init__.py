"""capsem_vm: build, verify and run the microVMs that host capsem kernels."""

__version__ = "0.1.0"
