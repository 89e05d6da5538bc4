"""Adapters that plug a capsem Sandbox into agent frameworks (each an optional dependency):

- `capsem_kernel.integrations.smolagents.CapsemExecutor`: smolagents' remote Python executor
  (extra `smolagents`).
"""
