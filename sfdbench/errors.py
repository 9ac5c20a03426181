"""Errors that reach the user as one line on stderr and a fixed exit code (see DESIGN.md)."""


class SfdbenchError(Exception):
    """Base class; ``exit_code`` is what the CLI returns."""

    exit_code = 1


class BadInput(SfdbenchError):
    """The user asked for something that cannot work (unknown name, bad NFE, corrupt file...)."""

    exit_code = 2


class MissingAsset(SfdbenchError):
    """A weight file, reference statistic or caption file is not in the cache and cannot be fetched."""

    exit_code = 3
