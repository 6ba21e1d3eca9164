"""Multi-process (DistributedDataParallel) training: the torchrun environment, the process group, and the
few collectives the trainer needs. Everything here is a no-op in a plain single-process run.

`torchrun --nproc_per_node N -m nmt train CONFIG` starts N copies of `nmt train`, each with RANK,
WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT in its environment; `setup` turns those into a
process group: NCCL with one GPU per process (cuda:LOCAL_RANK) on CUDA, gloo on the CPU.
`nmt train --nproc N` is a shortcut that re-executes the same command line under torchrun.
"""

from __future__ import annotations

import inspect
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
import torch.distributed as dist

from nmt.device import resolve_device
from nmt.errors import NmtError

T = TypeVar("T")
TORCHRUN_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK")


@dataclass
class Distributed:
    """This process's place in the job: rank among `world_size` processes (rank 0 writes everything)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    backend: str | None = None  # None: no process group (a single-process run)
    device: torch.device = torch.device("cpu")  # where collective tensors live (NCCL needs the GPU)

    @property
    def enabled(self) -> bool:
        return self.backend is not None

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def all_reduce_sum(self, values: list[float]) -> list[float]:
        """Element-wise sums over all ranks (float64, so token counts stay exact)."""
        if not self.enabled:
            return list(values)
        tensor = torch.tensor(values, dtype=torch.float64, device=self.device)
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        return tensor.tolist()

    def all_gather(self, obj: T) -> list[T]:
        """Every rank's `obj`, indexed by rank (picklable objects)."""
        if not self.enabled:
            return [obj]
        gathered: list[Any] = [None] * self.world_size
        dist.all_gather_object(gathered, obj)
        return gathered

    def broadcast(self, obj: T) -> T:
        """Rank 0's `obj` on every rank."""
        if not self.enabled:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()

    def on_main(self, fn: Callable[[], T]) -> T | None:
        """Run `fn` on rank 0 only; if it fails, every rank raises (nobody is left waiting in a collective).

        Rank 0 re-raises its own exception; the others raise an NmtError with its message.
        """
        if not self.enabled:
            return fn()
        result, error, failure = None, None, None
        if self.is_main:
            try:
                result = fn()
            except Exception as e:  # noqa: BLE001  (re-raised below, after telling the other ranks)
                failure = e
                error = str(e) if isinstance(e, NmtError) else f"{type(e).__name__}: {e}"
        error = self.broadcast(error)
        if failure is not None:
            raise failure
        if error is not None:
            raise NmtError(error)
        return result


def in_torchrun() -> bool:
    """True when this process was started by torchrun (or anything that sets its environment)."""
    return all(name in os.environ for name in TORCHRUN_ENV)


def setup(device: str | torch.device) -> tuple[Distributed, torch.device]:
    """The process group (under torchrun) and this process's device; a single-process run gets no group.

    Under torchrun, `--device auto|cuda` means cuda:LOCAL_RANK (NCCL) and `--device cpu` means gloo;
    naming one GPU (cuda:N) is refused, since every process would then share it.
    """
    if not in_torchrun():
        return Distributed(), resolve_device(device)
    try:
        rank, world_size, local_rank = (int(os.environ[name]) for name in TORCHRUN_ENV)
    except ValueError:
        raise NmtError(f"torchrun environment: {', '.join(f'{n}={os.environ[n]!r}' for n in TORCHRUN_ENV)} "
                       "are not integers") from None
    if isinstance(device, str) and device.strip().lower().startswith("cuda:"):
        raise NmtError(f"--device {device}: under torchrun every process uses cuda:LOCAL_RANK; "
                       "pass --device cuda (or auto)")
    resolved = resolve_device(device)
    if resolved.type == "cuda":
        count = torch.cuda.device_count()
        if local_rank >= count:
            raise NmtError(f"LOCAL_RANK {local_rank}: this machine has {count} CUDA device(s); start at most "
                           f"{count} processes per node (torchrun --nproc_per_node {count})")
        resolved = torch.device("cuda", local_rank)
        torch.cuda.set_device(resolved)
        backend = "nccl"
        # device_id (torch >= 2.3) binds the group to this GPU at once
        bind = {"device_id": resolved} if "device_id" in inspect.signature(dist.init_process_group).parameters else {}
        dist.init_process_group(backend, **bind)
    else:
        backend = "gloo"
        dist.init_process_group(backend)
    ctx = Distributed(rank=rank, world_size=world_size, local_rank=local_rank, backend=backend,
                      device=resolved if backend == "nccl" else torch.device("cpu"))
    return ctx, resolved


def launch(nproc: int, argv: list[str]) -> None:
    """`nmt train --nproc N ...`: replace this process with `torchrun --standalone --nproc_per_node N -m nmt
    ...` (argv without --nproc), so that Ctrl-C reaches torchrun directly. Never returns."""
    if in_torchrun():
        raise NmtError("--nproc: already running under torchrun (drop --nproc, or do not use torchrun)")
    args = strip_option(argv, "--nproc")
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
               "-m", "nmt", *args]
    sys.stderr.flush()
    sys.stdout.flush()
    os.execv(sys.executable, command)


def strip_option(argv: list[str], name: str) -> list[str]:
    """`argv` without `name VALUE` / `name=VALUE`."""
    out, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg == name:
            skip = True
        elif not arg.startswith(name + "="):
            out.append(arg)
    return out
