import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def run_cli(*args: str, cwd: Path | None = None, timeout: int = 600) -> subprocess.CompletedProcess:
    """``sfdbench ARGS`` in a fresh interpreter (exit codes and stderr exactly as a user sees them)."""
    return subprocess.run([sys.executable, "-m", "sfdbench.cli", *args], capture_output=True, text=True,
                          cwd=cwd or REPO, timeout=timeout)


@pytest.fixture
def cli():
    return run_cli


# Tiny SFD settings for tests: a few iterations on a small batch.
TINY_SFD = ["--set", "sfd.iterations=3", "--set", "sfd.batch=8", "--set", "sfd.checkpoint_every=2"]


def tree(path: Path) -> list[str]:
    """Every file under ``path`` (empty list when it does not exist)."""
    return sorted(str(p.relative_to(path)) for p in Path(path).rglob("*") if p.is_file()) if Path(path).exists() else []


class FitInterrupted(Exception):
    """Raised by ``progress_that_dies`` to stop a fit in the middle."""


def progress_that_dies(after: int, prefix: str = ""):
    """A ``FitContext.progress`` whose bar raises ``FitInterrupted`` at the ``after``-th advanced
    iteration of a bar whose description starts with ``prefix`` (resume tests)."""
    from contextlib import contextmanager

    def progress(description, total):
        @contextmanager
        def bar():
            done = {"n": 0}

            def advance(n=1, info=""):
                done["n"] += n
                if description.startswith(prefix) and done["n"] == after:
                    raise FitInterrupted

            yield advance

        return bar()

    return progress
