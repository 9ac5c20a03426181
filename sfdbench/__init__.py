"""sfdbench: benchmarking and evaluation suite for few-step diffusion sampling."""

__version__ = "0.1.0"
