"""The driver: spec + backbone → trace → passes, in rule order → :class:`~peftc.runtime.model.Compiled`."""

from __future__ import annotations

import copy
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from peftc.analysis.backbones import Backbone, build_backbone, from_module
from peftc.analysis.canonical import canonicalize
from peftc.analysis.index import block_positions
from peftc.analysis.roles import head
from peftc.analysis.trace import trace
from peftc.language import MethodSpec, get_primitive, load_spec
from peftc.passes import CompileState, PassContext
from peftc.runtime.model import BackboneInfo, Compiled
from peftc.runtime.report import build_report
from peftc.runtime.schedule import build_schedule

__all__ = ["compile", "resolve_backbone", "rewrite"]


def resolve_backbone(
    backbone: str | nn.Module | Backbone,
    *,
    pretrained: bool = False,
    weights: str | Path | None = None,
    seed: int = 0,
    backbone_kwargs: Mapping[str, Any] | None = None,
) -> Backbone:
    """A Backbone peftc may rewrite: built from a name, or a private deep copy of a user's module."""
    if isinstance(backbone, Backbone):
        return backbone
    if isinstance(backbone, nn.Module):
        return from_module(copy.deepcopy(backbone).eval())
    return build_backbone(backbone, pretrained=pretrained, weights=weights, seed=seed, **dict(backbone_kwargs or {}))


def rewrite(method: MethodSpec, bb: Backbone, *, leaves: Iterable[type[nn.Module]] = ()) -> CompileState:
    """The compiler proper: trace ``bb`` and run one pass per rule, in order. Returns the finished state."""
    positions = block_positions(bb.module)
    state = CompileState(trace(bb.module, leaves=leaves), method, positions, bb.input_size)
    state.head_params = sum(sum(p.numel() for p in c.module.parameters()) for c in head(state.index))
    for rule in method.rules:
        get_primitive(rule.op).run(PassContext(state, rule))
    state.finish()
    return state


def compile(
    spec: str | Path | Mapping[str, Any] | MethodSpec,
    backbone: str | nn.Module | Backbone,
    *,
    params: Mapping[str, Any] | None = None,
    pretrained: bool = False,
    weights: str | Path | None = None,
    seed: int = 0,
    backbone_kwargs: Mapping[str, Any] | None = None,
    leaves: Iterable[type[nn.Module]] = (),
    **param_overrides: Any,
) -> Compiled:
    """Rewrite ``backbone`` as ``spec`` says and return the trainable model.

    ``spec`` is a file path, a built-in name (``"clr"``), a document mapping or a loaded :class:`MethodSpec`;
    spec params come from ``params`` and/or keyword arguments (``compile("clr", "resnet50", variant="full")``).
    ``backbone`` is a name (``"resnet50"``, ``"timm:vit_tiny_patch16_224"``) or a module you built, which is
    copied and never modified. ``seed`` seeds the backbone's random init and the inserted blocks' init (LoRA's
    down projections, adapters), so the same call always gives the same model and a byte-identical artifact;
    the caller's global RNG is left as it was.
    """
    overrides = {**dict(params or {}), **param_overrides}
    method = load_spec(spec, overrides)
    bb = resolve_backbone(backbone, pretrained=pretrained, weights=weights, seed=seed, backbone_kwargs=backbone_kwargs)
    canonicalize(bb.module)  # nn.MultiheadAttention -> traceable qkv/proj Linears (same tensors, same function)
    original_ids = {id(p) for p in bb.module.parameters()}
    backbone_params = sum(p.numel() for p in bb.module.parameters())
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        state = rewrite(method, bb, leaves=leaves)
    report = build_report(method.name, bb.id, backbone_params, state.head_params, original_ids, state.gm, state.ledger)
    info = BackboneInfo(bb.id, bb.source, bb.seed, bb.weights_file, tuple(bb.input_size), bb.hash,
                        tuple(sorted((backbone_kwargs or {}).items())))
    return Compiled(state.gm, method, info, state.ledger, report, schedule=build_schedule(state))
