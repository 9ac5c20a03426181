"""Compute accounting: wall time, device name and count, device-hours."""

from __future__ import annotations

import platform
import time
from dataclasses import asdict, dataclass

import torch


def device_name(device: torch.device | str = "cpu") -> str:
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return f"CPU: {line.split(':', 1)[1].strip()} ({torch.get_num_threads()} threads)"
    except OSError:
        pass
    return f"CPU: {platform.processor() or platform.machine()} ({torch.get_num_threads()} threads)"


@dataclass
class Accounting:
    wall_seconds: float
    device: str
    devices: int

    @property
    def device_hours(self) -> float:
        return self.wall_seconds * self.devices / 3600.0

    def to_dict(self) -> dict:
        return {**asdict(self), "device_hours": self.device_hours}


class Stopwatch:
    """Accumulates wall time over (possibly resumed) sessions of work."""

    def __init__(self, already: float = 0.0):
        self.already = already
        self.start = time.perf_counter()

    @property
    def seconds(self) -> float:
        return self.already + time.perf_counter() - self.start
