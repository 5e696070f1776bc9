"""The per-architecture trace cache: same architecture -> a private copy of the same graph; anything that can
change the graph (configuration, tensor shapes, hooks, instance code) -> its own trace."""

from __future__ import annotations

import torch
from torch import nn

from peftc.analysis import trace_cache
from peftc.analysis.trace import trace


class Net(nn.Module):
    def __init__(self, width: int = 4, gate: bool = False):
        super().__init__()
        self.conv = nn.Conv2d(3, width, 3)
        self.gate = gate

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        return torch.sigmoid(y) * y if self.gate else y.relu()


def _key(module: nn.Module) -> object:
    return trace_cache.architecture_key(module, (nn.Conv2d,), ())


def test_same_architecture_gets_a_private_copy_of_the_graph() -> None:
    trace_cache.clear()
    first = trace(Net())
    assert not trace_cache._KEPT  # one compile of an architecture keeps nothing
    second = trace(Net())  # the second trace is kept
    third = trace(Net())
    assert third.graph is not second.graph and third.code == second.code == first.code
    doomed = next(n for n in third.graph.nodes if n.op == "call_method")
    doomed.replace_all_uses_with(doomed.args[0])
    third.graph.erase_node(doomed)
    assert trace(Net()).code == first.code  # the kept graph is not the one a pass edited
    net, x = Net(), torch.randn(1, 3, 8, 8)
    torch.testing.assert_close(trace(net)(x), net(x))  # a hit computes with its own module's tensors


def test_what_can_change_the_graph_changes_the_key() -> None:
    assert _key(Net()) == _key(Net()) is not None
    assert _key(Net(gate=True)) != _key(Net())  # configuration read by forward
    assert _key(Net(width=5)) != _key(Net())  # tensor shapes
    assert _key(Net().eval()) != _key(Net())  # training flag
    hooked = Net()
    hooked.conv.register_forward_hook(lambda *a: None)
    assert _key(hooked) is None
    patched = Net()
    patched.forward = lambda x: x  # type: ignore[method-assign]
    assert _key(patched) is None
    odd = Net()
    odd.table = torch.ones(2)  # a plain tensor attribute: its values could steer the code
    assert _key(odd) is None
    trace_cache.clear()
    assert "sigmoid" in trace(Net(gate=True)).code and "sigmoid" not in trace(Net()).code


def test_shapes_of_the_untouched_graph_are_kept_with_it(monkeypatch) -> None:
    """A compile that reads shapes before editing the graph (Convpass sizes its blocks by the patch grid)
    propagates once per architecture; the next compile recalls the shapes and builds the same model."""
    import peftc
    import peftc.passes.base as base

    from .cached import module as cached

    runs = []
    real = base.propagate_shapes
    monkeypatch.setattr(base, "propagate_shapes", lambda gm, x, known=None: (runs.append(1), real(gm, x, known))[1])
    trace_cache.clear()
    monkeypatch.setattr(trace_cache, "_SEEN", type(trace_cache._SEEN)())  # as in a fresh process, whatever ran before
    vit = cached("timm:vit_tiny_patch16_224", 32)
    first, _, third = (peftc.compile("convpass", vit) for _ in range(3))
    assert len(runs) == 2  # the graph is kept from the second trace on, its shapes with it
    assert first.net.code == third.net.code and first.report == third.report
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(first(x), third(x))
