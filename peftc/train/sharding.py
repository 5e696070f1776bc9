"""FSDP2 for backbones that do not fit one device: frozen weights sharded over the processes, trained tensors whole.

``peftc train --sharding fsdp`` under ``torchrun`` applies ``torch.distributed.fsdp.fully_shard`` to every module
that holds frozen weights: each process keeps 1/world of them, a layer's rows are all-gathered for its forward
(and backward) and freed after. Every tensor the artifact saves (trained, per task, shared) is left out of the
sharding (``ignored_params``): those stay ordinary tensors on every process, the optimizer holds only them, and
the trainer averages their gradients over the processes (as for stages outside DDP). PEFT trains a small fraction
of a model, so what sharding saves is the frozen bulk: ViT-g's ~1 B frozen parameters are 4 GB in fp32, 0.5 GB per
process on 8 GPUs.

Sharded forwards are collective (every process must run the same layers the same number of times), but
evaluation shards its images without padding, so it runs with the weights gathered (:meth:`Sharding.gathered`):
full weights on every process for the duration, forwards local. A finished task leaves the weights gathered, so
the sequence's evaluations and the artifact's save see plain tensors; the next task shards them again.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from peftc.errors import PeftcError
from peftc.train.distributed import DistContext
from peftc.train.precision import saved_names

__all__ = ["SHARDINGS", "Sharding", "ShardingError", "shard_model"]

SHARDINGS = ("ddp", "fsdp")


class ShardingError(PeftcError):
    """FSDP asked for where it cannot run."""


@dataclass
class Sharding:
    """The FSDP-wrapped modules of one model and how many frozen tensors they shard."""

    modules: list[Any]
    tensors: int
    _depth: int = 0  # nested gathered() blocks: a stage's validation may call the run's

    def gather(self) -> None:
        """Full weights on every process until :meth:`release` (a collective: every process calls it)."""
        for module in self.modules:
            module.unshard()
            module.set_reshard_after_forward(False)

    def release(self) -> None:
        """Back to 1/world of the frozen weights per process."""
        for module in self.modules:
            module.reshard()
            module.set_reshard_after_forward(True)

    @contextlib.contextmanager
    def gathered(self) -> Iterator[None]:
        """Full weights inside the block (re-entrant)."""
        if self._depth == 0:
            self.gather()
        self._depth += 1
        try:
            yield
        finally:
            self._depth -= 1
            if self._depth == 0:
                self.release()


def shard_model(model: Any, dist: DistContext, frozen_dtype: str | None = None) -> Sharding:
    """Shard ``model``'s frozen weights over the process group (see the module docstring)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import FSDPModule, fully_shard

    if not dist.enabled:
        raise ShardingError("--sharding fsdp shards over processes: launch with torchrun --nproc_per_node N "
                            "(N ≥ 2)")
    if frozen_dtype is not None:
        raise ShardingError("--frozen-dtype with --sharding fsdp is not supported: FSDP shards the fp32 weights "
                            "(drop one of the two)")
    keep = saved_names(model)
    by_id = {id(p): n for n, p in model.net.named_parameters()}
    mesh = init_device_mesh(dist.device.type, (dist.world,))
    modules, tensors = [], 0
    for module in model.net.modules():
        own = list(module.parameters(recurse=False))
        frozen = [p for p in own if not p.requires_grad and by_id.get(id(p)) not in keep]
        if not frozen:
            continue
        if isinstance(module, FSDPModule):  # sharded by an earlier task of the sequence
            modules.append(module)
            tensors += len(frozen)
            continue
        ignored = {p for p in own if p.requires_grad or by_id.get(id(p)) in keep}
        modules.append(fully_shard(module, mesh=mesh, ignored_params=ignored or None))
        tensors += len(frozen)
    sharding = Sharding(modules, tensors)
    sharding.release()
    return sharding

