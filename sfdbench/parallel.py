"""Several processes through ``torch.distributed`` (``torchrun``): who this process is, and the few
collectives sfdbench needs. With one process every function here is a no-op, so single-device code
paths never change.

How sfdbench uses them (``docs/architecture.md``, "Several devices"):

* Fine-tuning (SFD, SFD-v, second stage): the global batch of B trajectories is drawn exactly as a
  single process draws it (the same per-iteration seed, the full [B, ...] latents and conditioning)
  and process r keeps rows ``shard_rows(B)[r]``; dropout masks are drawn for the full batch too and
  sliced (:class:`GlobalBatchDropout`), so trajectory j sees the same noise and the same mask with any
  number of processes. Gradients are averaged over processes before every optimiser step
  (:class:`GradientAveraging`): the loss is a per-sample mean, so the average of the processes'
  gradients is the gradient of the global batch, as DistributedDataParallel computes it.
* Sampling: batch j of a run goes to process j mod K; sample i's noise and labels depend only on
  (seed, i); the per-sample rows are gathered to process 0, which computes the metrics and alone
  writes files.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

# collectives wait this long for a slow peer (process 0 evaluating 50k samples while others wait)
TIMEOUT_MINUTES = int(os.environ.get("SFDBENCH_DIST_TIMEOUT_MIN", "180"))


def launched() -> bool:
    """Whether this process was started by ``torchrun`` with more than one process."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def init(device: str) -> str:
    """Join the process group ``torchrun`` describes (NCCL for CUDA, gloo for CPU) and return this
    process's device (``cuda:LOCAL_RANK`` when ``device`` is CUDA). One process: ``device`` unchanged."""
    if not launched():
        return device
    cuda = str(device).startswith("cuda")
    if cuda:
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        device = f"cuda:{local}"
    if not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo", timeout=timedelta(minutes=TIMEOUT_MINUTES))
    return device


_SOLO = [False]


def world() -> int:
    """The number of processes working together (1 inside ``solo``)."""
    return 1 if _SOLO[0] or not (dist.is_available() and dist.is_initialized()) else dist.get_world_size()


def rank() -> int:
    return 0 if _SOLO[0] or not (dist.is_available() and dist.is_initialized()) else dist.get_rank()


@contextmanager
def solo():
    """Process 0 working alone (a fit that cannot be split): inside, ``world()`` is 1 and the
    collectives are no-ops. Other processes wait at the next collective (``TIMEOUT_MINUTES``)."""
    previous, _SOLO[0] = _SOLO[0], True
    try:
        yield
    finally:
        _SOLO[0] = previous


def is_main() -> bool:
    """Process 0: the one that writes checkpoints, model files, records and prints results."""
    return rank() == 0


def barrier() -> None:
    if world() > 1:
        dist.barrier()


def shutdown() -> None:
    if world() > 1:
        dist.destroy_process_group()


def shard_rows(total: int, processes: int | None = None, which: int | None = None) -> slice:
    """The rows of a global batch of ``total`` a process keeps: contiguous, sizes differing by at most
    one (the first ``total mod K`` processes take one more)."""
    k = world() if processes is None else processes
    r = rank() if which is None else which
    base, extra = divmod(total, k)
    start = r * base + min(r, extra)
    return slice(start, start + base + (1 if r < extra else 0))


def sum_over_processes(values: list[float]) -> list[float]:
    """Element-wise sums over all processes (float64; one all-reduce)."""
    if world() == 1:
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=_collective_device())
    dist.all_reduce(t)
    return t.cpu().tolist()


def max_over_processes(values):
    """The maximum over all processes of a number, or element-wise of a list of numbers (one all-reduce)."""
    if world() == 1:
        return values
    single = not isinstance(values, list | tuple)
    t = torch.tensor([values] if single else list(values), dtype=torch.float64, device=_collective_device())
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t[0]) if single else t.cpu().tolist()


def gather_to_main(obj):
    """Every process's ``obj`` as a list in rank order on process 0; None elsewhere."""
    if world() == 1:
        return [obj]
    out = [None] * world() if is_main() else None
    dist.gather_object(obj, out, dst=0)
    return out


def broadcast_from_main(obj):
    """Process 0's ``obj`` on every process."""
    if world() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _collective_device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


class GradientAveraging:
    """An optimiser whose ``step`` first replaces every gradient by its mean over processes (one
    flattened all-reduce), then steps the wrapped optimiser; everything else is delegated.

    Gradients a process did not produce count as zeros when another process has them; a parameter no
    process has a gradient for stays without one (Adam then skips it, as in one process)."""

    def __init__(self, optimizer: torch.optim.Optimizer):
        self.optimizer = optimizer

    def __getattr__(self, name):
        return getattr(self.optimizer, name)

    def step(self, *args, **kwargs):
        if world() > 1:
            average_gradients([p for g in self.optimizer.param_groups for p in g["params"]])
        return self.optimizer.step(*args, **kwargs)


def average_gradients(params: list[torch.nn.Parameter]) -> None:
    k = world()
    has = torch.tensor([p.grad is not None for p in params], dtype=torch.float32, device=_collective_device())
    dist.all_reduce(has)
    chosen = [p for p, h in zip(params, has.tolist()) if h > 0]
    if not chosen:
        return
    for p in chosen:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    flat = torch.cat([p.grad.reshape(-1).float() for p in chosen])
    dist.all_reduce(flat)
    flat /= k
    offset = 0
    for p in chosen:
        n = p.grad.numel()
        p.grad.copy_(flat[offset:offset + n].view_as(p.grad))
        offset += n


class GlobalBatchDropout(TorchFunctionMode):
    """Inside this mode, ``F.dropout`` on a batch of this process's rows ``rows`` (of a global batch of
    ``total``) draws the mask for the whole global batch and keeps its rows, so a sample's mask is the
    one a single process would draw (CPU: ``F.dropout`` is ``x * (bernoulli(1 - p) / (1 - p))`` with
    the mask drawn in memory order; checked by the tests). Other calls pass through."""

    def __init__(self, rows: slice, total: int):
        super().__init__()
        self.rows, self.total = rows, total

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.dropout:
            x = args[0]
            p = kwargs.get("p", args[1] if len(args) > 1 else 0.5)
            training = kwargs.get("training", args[2] if len(args) > 2 else True)
            inplace = kwargs.get("inplace", args[3] if len(args) > 3 else False)
            local = self.rows.stop - self.rows.start
            if training and 0 < p < 1 and not inplace and x.shape[0] == local:
                mask = torch.empty((self.total, *x.shape[1:]), dtype=x.dtype, device=x.device).bernoulli_(1 - p)
                return x * (mask[self.rows] / (1 - p))
        return func(*args, **kwargs)
