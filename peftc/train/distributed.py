"""Data-parallel training under ``torchrun``: the same command, one process per device.

``torchrun --nproc_per_node N -m peftc train ...`` sets ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK`` and the
rendezvous variables; :func:`setup` finds them and joins the process group — NCCL on CUDA, gloo on CPU (so the
same code runs, and is tested, with two CPU processes). Without those variables it is a single process and
nothing is initialised.

Conventions: ``batch_size`` in a recipe is the *global* batch (what the paper trained with, and what the lr
scaling rule reads); each process takes ``batch_size / world`` of it. Training shards the data with
``DistributedSampler``; evaluation shards it without padding and sums the counts across processes, so an
accuracy is exact, not approximately averaged. Only rank 0 writes files and draws progress.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch

from peftc.errors import PeftcError

__all__ = ["DistContext", "DistributedError", "cuda_usable", "env_world", "resolve_device", "setup", "teardown"]


class DistributedError(PeftcError):
    """The torchrun environment is inconsistent or the requested device cannot serve it."""


@dataclass(frozen=True)
class DistContext:
    """Where this process stands: rank, world size and its device."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    backend: str | None = None

    @property
    def enabled(self) -> bool:
        return self.world > 1

    @property
    def main(self) -> bool:
        return self.rank == 0

    def per_process_batch(self, batch_size: int) -> int:
        if batch_size % self.world:
            raise DistributedError(f"the batch size {batch_size} does not split evenly over {self.world} processes; "
                                   f"choose a multiple of {self.world}")
        return batch_size // self.world

    def sum(self, values: list[float]) -> list[float]:
        """Element-wise sum over all processes (identity when single-process)."""
        if not self.enabled:
            return list(values)
        t = torch.tensor(values, dtype=torch.float64, device=self.device if self.backend == "nccl" else "cpu")
        torch.distributed.all_reduce(t)
        return t.tolist()

    def barrier(self) -> None:
        if self.enabled:
            torch.distributed.barrier()

    def any(self, flag: bool) -> bool:
        """True on every process when ``flag`` is true on any (e.g. early stopping decided on rank 0)."""
        return bool(self.sum([1.0 if flag else 0.0])[0]) if self.enabled else flag


def env_world(env: Mapping[str, str] | None = None) -> tuple[int, int, int] | None:
    """(rank, world, local_rank) from torchrun's variables, or None outside torchrun."""
    env = os.environ if env is None else env
    if "WORLD_SIZE" not in env or "RANK" not in env:
        return None
    try:
        world, rank = int(env["WORLD_SIZE"]), int(env["RANK"])
        local = int(env.get("LOCAL_RANK", rank))
    except ValueError:
        raise DistributedError(f"WORLD_SIZE/RANK/LOCAL_RANK must be integers, got {env.get('WORLD_SIZE')!r}, "
                               f"{env.get('RANK')!r}, {env.get('LOCAL_RANK')!r}") from None
    if world < 1 or not 0 <= rank < world:
        raise DistributedError(f"inconsistent torchrun environment: RANK={rank}, WORLD_SIZE={world}")
    return rank, world, local


def cuda_usable() -> bool:
    """CUDA is there *and* works: a driver too old for this torch build reports a device, then fails on use."""
    if not torch.cuda.is_available():
        return False
    try:
        torch.ones(1, device="cuda").add_(1)
        torch.cuda.synchronize()
    except (RuntimeError, AssertionError):
        return False
    return True


def resolve_device(requested: str, local_rank: int = 0, distributed: bool = False) -> torch.device:
    """``auto``, ``cpu``, ``cuda`` or ``cuda:N``; ``auto`` is CUDA when it really works, else the CPU; under
    torchrun ``cuda`` means this process's local GPU."""
    if requested == "auto":
        requested = "cuda" if cuda_usable() else "cpu"
    if requested == "cpu":
        return torch.device("cpu")
    if not requested.startswith("cuda"):
        raise DistributedError(f"--device must be auto, cpu or cuda[:N], got {requested!r}")
    if not torch.cuda.is_available():
        raise DistributedError("--device cuda was asked for but no CUDA device is available (use --device cpu)")
    if requested == "cuda":
        index = local_rank if distributed else torch.cuda.current_device()
    else:
        try:
            index = int(requested.split(":", 1)[1])
        except ValueError:
            raise DistributedError(f"--device must be auto, cpu or cuda[:N], got {requested!r}") from None
    if index >= torch.cuda.device_count():
        raise DistributedError(f"cuda:{index} does not exist ({torch.cuda.device_count()} CUDA devices)")
    return torch.device("cuda", index)


def setup(device: str = "auto", env: Mapping[str, str] | None = None) -> DistContext:
    """Join the process group when launched by torchrun; returns this process's context."""
    found = env_world(env)
    if found is None or found[1] == 1:
        rank, world, local = found or (0, 1, 0)
        return DistContext(rank, 1, local, resolve_device(device, local, distributed=False))
    rank, world, local = found
    dev = resolve_device(device, local, distributed=True)
    backend = "nccl" if dev.type == "cuda" else "gloo"
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    if not torch.distributed.is_initialized():
        torch.distributed.init_process_group(backend=backend, rank=rank, world_size=world)
    return DistContext(rank, world, local, dev, backend)


def teardown(ctx: DistContext) -> None:
    if ctx.enabled and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
