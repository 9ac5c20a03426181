"""``python -m sfdbench`` (what ``torchrun -m sfdbench run ...`` starts in every process)."""

from sfdbench.cli import main

main()
