"""Architectures and checkpoint I/O."""
