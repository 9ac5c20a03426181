"""Benchmark suites: data, teacher, feature space, default grid. ``get_suite(name)`` looks one up."""

from __future__ import annotations

from sfdbench.errors import BadInput
from sfdbench.suites.base import Suite


def _digits() -> Suite:
    from sfdbench.suites.digits import DigitsSuite

    return DigitsSuite()


SUITES = {"digits": _digits}


def suite_names() -> list[str]:
    return sorted(SUITES)


def get_suite(name: str) -> Suite:
    if name not in SUITES:
        raise BadInput(f"unknown suite {name!r}; known suites: {', '.join(suite_names())} (see `sfdbench suites`)")
    return SUITES[name]()
