"""Benchmark suites: data, teacher, feature space, default grid. ``get_suite(name)`` looks one up;
``register_suite`` adds one (``docs/suites.md``)."""

from __future__ import annotations

from collections.abc import Callable

from sfdbench.errors import BadInput
from sfdbench.suites.base import Suite


def _digits() -> Suite:
    from sfdbench.suites.digits import DigitsSuite

    return DigitsSuite()


def _digits_cond() -> Suite:
    from sfdbench.suites.digits import DigitsCondSuite

    return DigitsCondSuite()


def _cifar10() -> Suite:
    from sfdbench.suites.paper import cifar10

    return cifar10()


def _imagenet64() -> Suite:
    from sfdbench.suites.paper import imagenet64

    return imagenet64()


def _lsun_bedroom() -> Suite:
    from sfdbench.suites.latent import lsun_bedroom

    return lsun_bedroom()


def _ms_coco() -> Suite:
    from sfdbench.suites.latent import ms_coco

    return ms_coco()


SUITES: dict[str, Callable[[], Suite]] = {"digits": _digits, "digits-cond": _digits_cond, "cifar10": _cifar10,
                                          "imagenet64": _imagenet64, "lsun_bedroom": _lsun_bedroom,
                                          "ms_coco": _ms_coco}


def register_suite(name: str, factory: Callable[[], Suite]) -> None:
    """Make ``factory()`` available as suite ``name`` (a plugin's or a test's own suite)."""
    SUITES[name] = factory


def suite_names() -> list[str]:
    return sorted(SUITES)


def get_suite(name: str) -> Suite:
    if name not in SUITES:
        raise BadInput(f"unknown suite {name!r}; known suites: {', '.join(suite_names())} (see `sfdbench suites`)")
    return SUITES[name]()
