"""Benchmark suites: data, teacher, feature space, default grid. ``get_suite(name)`` looks one up."""

from __future__ import annotations

from sfdbench.errors import BadInput
from sfdbench.suites.base import Suite


def _digits() -> Suite:
    from sfdbench.suites.digits import DigitsSuite

    return DigitsSuite()


def _cifar10() -> Suite:
    from sfdbench.suites.paper import cifar10

    return cifar10()


def _imagenet64() -> Suite:
    from sfdbench.suites.paper import imagenet64

    return imagenet64()


SUITES = {"digits": _digits, "cifar10": _cifar10, "imagenet64": _imagenet64}


def suite_names() -> list[str]:
    return sorted(SUITES)


def get_suite(name: str) -> Suite:
    if name not in SUITES:
        raise BadInput(f"unknown suite {name!r}; known suites: {', '.join(suite_names())} (see `sfdbench suites`)")
    return SUITES[name]()
