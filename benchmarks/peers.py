"""The peers peftc is measured against, built on the same backbone with the same targets as a compiled model.

* HF PEFT (``pip install peftc[bench]``): ``LoraConfig`` / ``LNTuningConfig`` on the timm or torchvision module
  itself, targeting exactly the modules peftc adapted (a full-match regex of their paths) with the same rank,
  alpha and dropout, and ``modules_to_save`` for what peftc trains outside its blocks (the head).
* HF PEFT with frozen BatchNorms in eval mode ("peft-eval-bn", CNNs only): PEFT's ``train()`` puts every
  BatchNorm in train mode, normalising with batch statistics and updating the running ones of a frozen backbone;
  peftc keeps the norms whose statistics a spec froze in eval mode. This variant computes peftc's function.
* A module-level CLR implementation, the design of the official CLR code and most PEFT libraries: every
  reprogrammed conv is replaced by a wrapper module that holds the conv and its depthwise reprogramming conv,
  and calls one after the other in Python.

:func:`plan` reads the targets off a compiled peftc model, so both sides always adapt the same layers.
"""

from __future__ import annotations

import re
from typing import Any

import torch
from torch import nn

__all__ = ["PEERS", "ClrWrapper", "FrozenNormsInEval", "build_peer", "check_same_function", "plan"]

# method -> peer kind(s) it is compared with
PEERS: dict[str, tuple[str, ...]] = {"lora": ("peft", "peft-eval-bn"), "ln_tuning": ("peft",), "clr": ("wrapper",)}


def plan(model: Any, method: str) -> dict[str, Any]:
    """What a peer needs to adapt the same layers as the compiled ``model``: sites, the other trained modules
    (``modules_to_save``) and the method's hyper-parameters."""
    from peftc.methods.clr.channel_conv import ChannelConv
    from peftc.methods.lora.lora import LoraConv, LoraLinear

    net = model.net
    if method == "lora":
        blocks = [n for n, m in net.named_modules() if isinstance(m, (LoraLinear, LoraConv))]
        sites = [n.rsplit(".", 1)[0] for n in blocks]
    elif method == "clr":
        blocks = [n for n, m in net.named_modules() if isinstance(m, ChannelConv)]
        sites = [n.rsplit(".", 1)[0] for n in blocks]
    elif method == "ln_tuning":
        blocks = sites = [n for n, m in net.named_modules() if type(m).__name__ == "TaskLayerNorm"]
    else:
        raise ValueError(f"no peer is defined for {method!r}")
    owned = tuple(f"{b}." for b in blocks)
    others = sorted({n.rsplit(".", 1)[0] for n, _ in model.named_trainable_parameters() if not n.startswith(owned)})
    return {"sites": sites, "modules_to_save": others, "values": dict(model.spec.values),
            "frozen_norms": _frozen_norms(model)}


def _frozen_norms(model: Any) -> bool:
    """Whether the compiled model keeps norms with running statistics in eval mode while training."""
    updating = model.ledger.updating_buffers
    return any(isinstance(getattr(m, "running_mean", None), torch.Tensor) and f"{n}.running_mean" not in updating
               for n, m in model.net.named_modules())


def _full_match(paths: list[str]) -> str:
    return "|".join(re.escape(p) for p in paths)


def build_peer(kind: str, method: str, module: nn.Module, peer_plan: dict[str, Any]) -> nn.Module:
    """The peer implementation of ``method`` on ``module`` (modified in place / wrapped), trainables set."""
    if kind == "peft":
        return _peft(method, module, peer_plan)
    if kind == "peft-eval-bn":
        return FrozenNormsInEval(_peft(method, module, peer_plan))
    if kind == "wrapper" and method == "clr":
        return _clr_wrappers(module, peer_plan)
    raise ValueError(f"no peer {kind!r} for {method!r}")


def _peft(method: str, module: nn.Module, peer_plan: dict[str, Any]) -> nn.Module:
    import peft

    values = peer_plan["values"]
    targets = _full_match(peer_plan["sites"])
    save = peer_plan["modules_to_save"] or None
    if method == "lora":
        config: Any = peft.LoraConfig(r=values["rank"], lora_alpha=values["alpha"], lora_dropout=values["dropout"],
                                      target_modules=targets, modules_to_save=save)
    elif method == "ln_tuning":
        config = peft.LNTuningConfig(target_modules=targets, modules_to_save=save)
    else:
        raise ValueError(f"no HF PEFT config for {method!r}")
    return peft.get_peft_model(module, config)


class FrozenNormsInEval(nn.Module):
    """``model`` whose norms with running statistics and no trainable affine stay in eval mode in ``train()``."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.model(*args, **kwargs)

    def train(self, mode: bool = True) -> FrozenNormsInEval:
        super().train(mode)
        for m in self.model.modules():
            if isinstance(getattr(m, "running_mean", None), torch.Tensor) and not any(
                    p.requires_grad for p in m.parameters(recurse=False)):
                m.eval()
        return self


class ClrWrapper(nn.Module):
    """A conv and its depthwise ``k×k`` reprogramming conv (identity init), applied one after the other."""

    def __init__(self, conv: nn.Conv2d, kernel_size: int = 3):
        super().__init__()
        self.conv = conv
        channels = conv.out_channels
        self.reprogram = nn.Conv2d(channels, channels, kernel_size, padding=kernel_size // 2, groups=channels,
                                   bias=False)
        with torch.no_grad():
            self.reprogram.weight.zero_()
            self.reprogram.weight[:, 0, kernel_size // 2, kernel_size // 2] = 1.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.reprogram(self.conv(x))


def _clr_wrappers(module: nn.Module, peer_plan: dict[str, Any]) -> nn.Module:
    kernel = int(peer_plan["values"].get("kernel_size", 3))
    for p in module.parameters():
        p.requires_grad_(False)
    for site in peer_plan["sites"]:
        parent_name, _, child = site.rpartition(".")
        parent = module.get_submodule(parent_name)
        setattr(parent, child, ClrWrapper(getattr(parent, child), kernel))
    for name in peer_plan["modules_to_save"]:
        for p in module.get_submodule(name).parameters():
            p.requires_grad_(True)
    for name, m in module.named_modules():
        if isinstance(m, ClrWrapper):
            m.reprogram.weight.requires_grad_(True)
            assert not m.conv.weight.requires_grad, name
    return module


def check_same_function(a: nn.Module, b: nn.Module, size: tuple[int, int, int]) -> float:
    """Largest absolute output difference of two models on one random batch (both start as the backbone)."""
    x = torch.randn(2, *size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        return float((a.eval()(x) - b.eval()(x)).abs().max())

