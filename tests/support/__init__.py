"""Shared helpers for MyX tests: real agent processes, pinned clients."""
