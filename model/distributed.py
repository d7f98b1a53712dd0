"""Data-parallel plumbing on PyTorch's own engine: torchrun's environment, the process group, reductions.

`torchrun --nproc-per-node N -m model.train_dist ...` starts N processes with RANK,
WORLD_SIZE and LOCAL_RANK set; `distributed()` joins them into one process group
(gloo on CPU, nccl on CUDA) and leaves it on exit. Run without torchrun, it is a
one-process "group" with no collective calls at all, so the same trainer code runs both ways.
"""

from __future__ import annotations

import datetime
import gc
import logging
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistContext:
    rank: int
    world: int
    local_rank: int
    device: torch.device
    backend: str | None  # None: one process, no process group

    @property
    def is_main(self) -> bool:
        """Rank 0 writes the bundle, the report and the checkpoints; the others only train."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.backend is not None


def launch_env() -> tuple[int, int, int]:
    """(rank, world size, local rank) from torchrun's environment; (0, 1, 0) without it."""
    try:
        return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("LOCAL_RANK", 0))
    except ValueError as e:
        raise RuntimeError(f"RANK / WORLD_SIZE / LOCAL_RANK must be integers ({e}); start with torchrun") from None


def pick_device(device: str, local_rank: int) -> torch.device:
    """`auto`: this process's GPU when CUDA is available, else the CPU; `cuda` insists."""
    if device not in ("auto", "cpu", "cuda"):
        raise ValueError(f"device must be auto, cpu or cuda, got {device!r}")
    if device == "cpu" or (device == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise RuntimeError("--device cuda was asked for, but torch sees no CUDA device")
    return torch.device("cuda", local_rank % torch.cuda.device_count())


@contextmanager
def distributed(device: str = "auto", timeout_s: float = 1800.0) -> Iterator[DistContext]:
    """Join torchrun's process group for the body (gloo on CPU, nccl on CUDA); leave it after."""
    rank, world, local_rank = launch_env()
    dev = pick_device(device, local_rank)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    backend = None
    if world > 1:
        backend = "nccl" if dev.type == "cuda" else "gloo"
        dist.init_process_group(
            backend=backend,
            timeout=datetime.timedelta(seconds=timeout_s),
            device_id=dev if dev.type == "cuda" else None,
        )
    try:
        yield DistContext(rank, world, local_rank, dev, backend)
    except BaseException:
        _leave(backend, quiesce=False)  # the others may never arrive: no barrier
        raise
    _leave(backend, quiesce=True)


def _leave(backend: str | None, quiesce: bool) -> None:
    """Tear the process group down here, while the interpreter is alive, and after the others are done.

    DDP's wrapper sits in a reference cycle that still holds the process group when the
    trainer returns; it is collected first, so the group goes now rather than at interpreter
    exit, where gloo's teardown aborted a finished run now and then ("terminate called
    without an active exception", SIGABRT, torchrun exit 1). After a normal body every
    process first meets the others at a barrier, so none closes its connections while a
    peer is still finishing the last collective.
    """
    if backend is None or not dist.is_initialized():
        return
    if quiesce:
        dist.barrier()
    gc.collect()
    dist.destroy_process_group()


def end_process(code: int) -> None:
    """Exit a torchrun worker with `code` once its work is written, skipping native teardown.

    Every file is closed and every process group destroyed by now; what is left is the
    C++ libraries' exit-time destructors, which have aborted a finished gloo run (SIGABRT)
    on rare occasions and turned its exit status into a failure. Python's own buffers and
    logging handlers are flushed first.
    """
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def all_reduce_sum(ctx: DistContext, values: np.ndarray) -> np.ndarray:
    """Element-wise sum over processes (int64 stays exact; floats are summed in float64)."""
    values = np.asarray(values)
    if not ctx.distributed:
        return values.copy()
    dtype = torch.int64 if np.issubdtype(values.dtype, np.integer) else torch.float64
    t = torch.tensor(values, dtype=dtype, device=ctx.device)  # a copy: the caller's array stays its own
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t.cpu().numpy()


def all_gather_cat(ctx: DistContext, values: torch.Tensor) -> torch.Tensor:
    """Every process's 1-d tensor (lengths may differ), concatenated in rank order, on every process."""
    if not ctx.distributed:
        return values
    values = values.reshape(-1)
    sizes = [torch.zeros(1, dtype=torch.int64, device=values.device) for _ in range(ctx.world)]
    dist.all_gather(sizes, torch.tensor([values.numel()], dtype=torch.int64, device=values.device))
    longest = max(int(n) for n in sizes)
    padded = torch.zeros(longest, dtype=values.dtype, device=values.device)
    padded[: values.numel()] = values
    parts = [torch.empty_like(padded) for _ in range(ctx.world)]
    dist.all_gather(parts, padded)
    return torch.cat([part[: int(n)] for part, n in zip(parts, sizes)])


def all_gather_object(ctx: DistContext, obj: object) -> list:
    if not ctx.distributed:
        return [obj]
    out: list = [None] * ctx.world
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(ctx: DistContext, obj: object, src: int = 0) -> object:
    if not ctx.distributed:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def barrier(ctx: DistContext) -> None:
    if ctx.distributed:
        dist.barrier()
