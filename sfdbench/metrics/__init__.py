"""Metrics: features -> statistics -> distances (torch-fidelity does the heavy lifting)."""
