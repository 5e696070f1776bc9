"""LoRA — low-rank adaptation (Hu et al., arXiv 2106.09685), for Linear layers and convolutions.

A LoRA block is attached with the ``parallel`` primitive: it reads the input of the layer it bypasses and its
output is added to that layer's output, ``y = W x + s·(α/r)·B A x``. ``A`` starts kaiming-uniform, ``B`` at
zero, so the model equals the backbone until trained. ``A`` is drawn from the block's own seed (taken from
torch's global generator), so a new task's ``A, B`` are made again by :meth:`_Lora.init_task` rather than
copied from a snapshot the model would carry. Conventions follow HF PEFT's ``LoraLayer``:

* **Linear**: ``A: Linear(in, r)``, ``B: Linear(r, out)``, both without bias; dropout on the input of ``A``.
  Trainable parameters ``r·(in + out)``.
* **Convolution** (Conv1d/2d/3d): ``A`` is a convolution ``in → r`` with the base layer's kernel size, stride,
  padding, dilation and padding mode; ``B`` a 1×1 convolution ``r → out``. Trainable ``r·in·∏k + out·r``.

**Scale.** ``α/r`` is applied *inside* the block (``scaling``), as PEFT does, because a spec cannot compute a
ratio of two params; the rule's ``scale`` (default 1) multiplies on top as a separate graph node. It multiplies
the r-wide bottleneck ``A x``, not the output: the same function (``B`` is linear), but one element-wise pass over
``r`` channels instead of ``out`` in the forward and again in the backward (PEFT scales the output: on resnet50
that is 53 feature-map-sized multiplications a forward); a scaling of exactly 1 is skipped.

**Folding.** LoRA is linear in its input: :meth:`delta_weight` returns ``(α/r)·B·A`` in the base layer's weight
shape (without the rule's scale, which the graph's ``mul`` carries), so export can merge it into the frozen
weight. Grouped convolutions get a dense ``A`` (as in PEFT) and decline to fold.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

from peftc.blocks.contract import Block, acts_as
from peftc.blocks.registry import Site, block_factory
from peftc.errors import PeftcError
from peftc.methods.lora.args import LoraArgs

__all__ = ["LoraArgs", "LoraConv", "LoraLinear", "lora"]


@contextmanager
def _seeded(seed: int) -> Iterator[None]:
    """torch's global CPU generator seeded with ``seed`` inside, as it was outside (``torch.manual_seed`` would
    also queue seeds for every accelerator backend, formatting a stack trace each: ~1 ms a block)."""
    with torch.random.fork_rng(devices=[]):
        torch.default_generator.manual_seed(seed)
        yield


class _Lora(Block):
    """Shared part: ``forward = B((α/r) · A(dropout(x)))``."""

    A: nn.Module
    B: nn.Module

    def __init__(self, rank: int, alpha: float, dropout: float):
        super().__init__()
        self.rank = rank
        self.alpha = alpha
        self.scaling = alpha / rank
        self.seed = int(torch.randint(0, 2**62, ()).item())
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def init_task(self, name: str, tensors: dict[str, torch.Tensor]) -> None:
        """A new task's ``A, B`` as at compile time: ``A`` kaiming-uniform (a=√5, PEFT's init) from this block's
        seed (on the CPU, so the values do not depend on the device), ``B`` zero."""
        with torch.no_grad():
            a = tensors.get("A.weight")
            if a is not None:
                fresh = torch.empty(a.shape)
                nn.init.kaiming_uniform_(fresh, a=math.sqrt(5), generator=torch.Generator().manual_seed(self.seed))
                a.copy_(fresh)
            b = tensors.get("B.weight")
            if b is not None:
                b.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        low = self.A(self.dropout(x))
        if self.scaling != 1.0:
            low = low * self.scaling
        return self.B(low)


class LoraLinear(_Lora):
    """LoRA for ``nn.Linear(in_features, out_features)``."""

    def __init__(self, in_features: int, out_features: int, rank: int = 8, alpha: float = 8.0,
                 dropout: float = 0.0):
        super().__init__(rank, alpha, dropout)
        self.in_features, self.out_features = in_features, out_features
        with _seeded(self.seed):  # nn's own init of A is LoRA's; init_task repeats it for a new task
            self.A = nn.Linear(in_features, rank, bias=False)
        self.B = nn.Linear(rank, out_features, bias=False)
        nn.init.zeros_(self.B.weight)

    def delta_weight(self, base: nn.Module) -> tuple[torch.Tensor, None]:
        """``(α/r)·B·A`` — the change of ``base.weight`` this block computes (no bias change)."""
        if not isinstance(base, nn.Linear) or tuple(base.weight.shape) != (self.out_features, self.in_features):
            raise NotImplementedError(f"this LoRA block does not bypass {base}")
        return (self.B.weight @ self.A.weight) * self.scaling, None

    def extra_repr(self) -> str:
        return f"{self.in_features} -> r={self.rank} -> {self.out_features}, scaling={self.scaling:g}"


class LoraConv(_Lora):
    """LoRA for a convolution: ``A`` copies the base's geometry into ``r`` channels, ``B`` is 1×1."""

    def __init__(self, base: nn.modules.conv._ConvNd, rank: int = 8, alpha: float = 8.0, dropout: float = 0.0):
        super().__init__(rank, alpha, dropout)
        conv = type(base) if type(base) in (nn.Conv1d, nn.Conv2d, nn.Conv3d) else _plain_conv(base)
        self.in_channels, self.out_channels = base.in_channels, base.out_channels
        self.groups = base.groups
        self.kernel_size = tuple(base.kernel_size)
        with _seeded(self.seed):  # nn's own init of A is LoRA's; init_task repeats it for a new task
            self.A = conv(base.in_channels, rank, base.kernel_size, stride=base.stride, padding=base.padding,
                          dilation=base.dilation, bias=False, padding_mode=base.padding_mode)
        self.B = conv(rank, base.out_channels, 1, bias=False)
        nn.init.zeros_(self.B.weight)

    def delta_weight(self, base: nn.Module) -> tuple[torch.Tensor, None]:
        """``(α/r)·B·A`` as a kernel of the base conv's shape; grouped convs decline (a dense A cannot fold)."""
        if self.groups != 1:
            raise NotImplementedError("LoRA on a grouped convolution cannot be merged into its weight")
        if not isinstance(base, nn.modules.conv._ConvNd) or base.weight.shape[:2] != (
                self.out_channels, self.in_channels):
            raise NotImplementedError(f"this LoRA block does not bypass {base}")
        b = self.B.weight.flatten(1)  # (out, r)
        a = self.A.weight  # (r, in, *k)
        return torch.einsum("or,ri...->oi...", b, a) * self.scaling, None

    def extra_repr(self) -> str:
        return (f"{self.in_channels} -> r={self.rank} -> {self.out_channels}, kernel_size={self.kernel_size}, "
                f"scaling={self.scaling:g}")


def _plain_conv(base: nn.Module) -> type[nn.Module]:
    for conv in (nn.Conv1d, nn.Conv2d, nn.Conv3d):
        if isinstance(base, conv):
            return conv
    raise PeftcError(f"LoRA supports Conv1d/2d/3d, not {type(base).__name__}")


@block_factory("lora")
def lora(site: Site, args: LoraArgs) -> nn.Module:
    """Low-rank bypass (α/r)·B·A of a Linear or a convolution; B starts at zero."""
    base = site.module
    if acts_as(base, nn.Linear):
        block: nn.Module = LoraLinear(base.in_features, base.out_features, args.rank, args.alpha, args.dropout)
    elif isinstance(base, nn.modules.conv._ConvNd) and not getattr(base, "transposed", False):
        block = LoraConv(base, args.rank, args.alpha, args.dropout)
    else:
        kind = type(base).__name__ if base is not None else "an operation"
        raise PeftcError(f"LoRA bypasses a Linear or a convolution; {site.name!r} is {kind}")
    if base is not None:
        weight = next(base.parameters())
        block.to(device=weight.device, dtype=weight.dtype)
    return block
