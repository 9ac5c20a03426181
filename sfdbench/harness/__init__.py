"""Runs things: training loops, grids, progress and timing. All I/O and printing lives here."""
