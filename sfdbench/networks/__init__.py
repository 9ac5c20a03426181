"""Architectures and checkpoint I/O."""

from __future__ import annotations


def load_teacher(path):
    """An EDM teacher network from an EDM ``.pkl`` or a converted safetensors file (never runs code from it).

    See ``sfdbench.networks.edm_pickle.load_teacher``; imported lazily so that importing
    ``sfdbench.networks`` stays cheap.
    """
    from sfdbench.networks.edm_pickle import load_teacher as _load_teacher

    return _load_teacher(path)
