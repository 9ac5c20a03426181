"""Method registry: ``@register_method`` adds one; ``get_method(name)`` looks one up."""

from __future__ import annotations

from sfdbench.errors import BadInput
from sfdbench.methods.base import FitContext, Fitted, Method

_REGISTRY: dict[str, Method] = {}


def register_method(method: Method) -> Method:
    if method.name in _REGISTRY:
        raise ValueError(f"method {method.name!r} registered twice")
    _REGISTRY[method.name] = method
    return method


def _load_all() -> None:
    # One import per method module; importing registers.
    from sfdbench.methods import amed, consistency, epd, gits, pd, sfd, sfd_stage2, sfd_v, solvers  # noqa: F401


def all_methods() -> list[Method]:
    _load_all()
    return list(_REGISTRY.values())


def get_method(name: str) -> Method:
    _load_all()
    if name not in _REGISTRY:
        raise BadInput(f"unknown method {name!r}; known methods: {', '.join(_REGISTRY)} (see `sfdbench methods`)")
    return _REGISTRY[name]


def load_model(path, suite, teacher, device, nfe: int | None = None) -> Fitted:
    """The sampler of any model file a method wrote, through the method named in its metadata."""
    from sfdbench.networks.checkpoint import read_metadata

    name = read_metadata(path).get("method")
    if not name:
        raise BadInput(f"{path} names no sfdbench method in its metadata; pass a model.safetensors written by "
                       "`sfdbench run`")
    return get_method(name).load(path, suite, teacher, device, nfe)


__all__ = ["FitContext", "Fitted", "Method", "all_methods", "get_method", "load_model", "register_method"]
