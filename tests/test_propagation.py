"""Shape propagation on the meta device, each distinct op run once: the shapes must be those of a real run, and
nothing that differs between two calls (a module's own state, a user function's state) may be conflated."""

from __future__ import annotations

import pytest
import torch
from torch import fx, nn
from torch.fx.passes.shape_prop import ShapeProp

from peftc.analysis import propagation
from peftc.analysis.propagation import propagate_shapes

from .cached import module as cached

CALLS: list[int] = []


@fx.wrap
def counted(x: torch.Tensor) -> torch.Tensor:
    """A user function with state: its output width is how often it ran."""
    CALLS.append(1)
    return x[..., : len(CALLS)]


class Crop(nn.Module):
    """A leaf whose output shape is its own attribute (not in any constructor call fx sees)."""

    def __init__(self, keep: int):
        super().__init__()
        self.keep = keep

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x[..., : self.keep]


class Twins(nn.Module):
    """Pairs of layers that look alike and differ only in their state."""

    def __init__(self) -> None:
        super().__init__()
        self.pool1, self.pool2 = nn.AdaptiveAvgPool2d(2), nn.AdaptiveAvgPool2d(3)
        self.crop1, self.crop2 = Crop(2), Crop(1)
        self.drop = nn.Dropout(0.1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        a, b = self.pool1(x), self.pool2(x)
        return self.crop1(a), self.crop2(a), self.drop(b), counted(x), counted(x)


class InPlace(nn.Module):
    """The same in-place reshape twice on equal inputs: each must run, as later nodes read its input."""

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        a, b = x.clone(), x.clone()
        a.unsqueeze_(0)
        b.unsqueeze_(0)
        return a + 1, b + 1


class Leaves(fx.Tracer):
    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return isinstance(m, Crop) or super().is_leaf_module(m, qualname)


def _shapes(gm: fx.GraphModule) -> dict[str, object]:
    out = {}
    for node in gm.graph.nodes:
        meta = node.meta.pop("tensor_meta", None)
        out[node.name] = meta.shape if hasattr(meta, "shape") else [getattr(m, "shape", None) for m in meta] if (
            isinstance(meta, (tuple, list))) else None
    return out


def test_alike_layers_and_stateful_functions_are_not_conflated() -> None:
    model = Twins()
    gm = fx.GraphModule(model, Leaves().trace(model))
    x = torch.randn(2, 3, 8, 8)
    CALLS.clear()
    propagate_shapes(gm, x)
    ours = _shapes(gm)
    assert len(CALLS) == 2  # the user function ran at each call, never served from the memo
    CALLS.clear()
    with torch.no_grad():
        ShapeProp(gm).propagate(x)
    assert ours == _shapes(gm)
    assert ours["crop1"] == (2, 3, 2, 2) and ours["crop2"] == (2, 3, 2, 1) and ours["pool2"] == (2, 3, 3, 3)
    assert ours["counted"] == (2, 3, 8, 1) and ours["counted_1"] == (2, 3, 8, 2)


@pytest.mark.parametrize("backbone", ["timm:vit_tiny_patch16_224", "resnet18", "timm:swin_tiny_patch4_window7_224"])
def test_shapes_equal_a_real_run_and_repeated_blocks_are_computed_once(backbone: str,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    from peftc.analysis.regions import trace_model

    module = cached(backbone, 64 if "swin" in backbone else 32) if backbone.startswith("timm:") else cached(backbone)
    gm = trace_model(module)
    x = torch.randn(2, 3, *(64, 64) if "swin" in backbone else (32, 32))
    runs: list[int] = []
    real_run = propagation.ShapeProp.call_module

    def counting(self: fx.Interpreter, target: str, args: object, kwargs: object) -> object:
        runs.append(1)
        return real_run(self, target, args, kwargs)

    monkeypatch.setattr(propagation.ShapeProp, "call_module", counting)
    propagate_shapes(gm, x)
    ours = _shapes(gm)
    modules = sum(n.op == "call_module" for n in gm.graph.nodes)
    assert len(runs) < modules  # identical layers on identical inputs ran once
    monkeypatch.undo()
    with torch.no_grad():
        ShapeProp(gm).propagate(x)
    assert ours == _shapes(gm)


def test_in_place_ops_are_never_served_from_the_memo() -> None:
    gm = fx.symbolic_trace(InPlace())
    x = torch.randn(2, 3)
    propagate_shapes(gm, x)
    ours = _shapes(gm)
    with torch.no_grad():
        ShapeProp(gm).propagate(x)
    assert ours == _shapes(gm)
    assert ours["add"] == ours["add_1"] == (1, 2, 3)
