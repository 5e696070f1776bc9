"""The driver: spec + backbone → trace → passes, in rule order → :class:`~peftc.runtime.model.Compiled`; and
back from an artifact (rebuild the backbone, check its hash, compile the stored spec, apply the delta)."""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import nn

from peftc.analysis.backbones import Backbone, build_backbone, from_module, seed_generators, shared_copy
from peftc.analysis.canonical import canonicalize
from peftc.analysis.index import block_positions
from peftc.analysis.roles import head
from peftc.analysis.trace import trace
from peftc.errors import ArtifactError, PeftcError
from peftc.language import MethodSpec, get_primitive, load_spec
from peftc.passes import CompileState, PassContext
from peftc.runtime.model import BackboneInfo, Compiled
from peftc.runtime.report import build_report
from peftc.runtime.schedule import build_schedule
from peftc.storage.artifact import MANIFEST, apply_delta, read_delta, read_manifest

__all__ = ["compile", "load", "resolve_backbone", "rewrite"]


def resolve_backbone(
    backbone: str | nn.Module | Backbone,
    *,
    pretrained: bool = False,
    weights: str | Path | None = None,
    seed: int = 0,
    backbone_kwargs: Mapping[str, Any] | None = None,
) -> Backbone:
    """A Backbone peftc may rewrite: built from a name, or a copy of a user's module that shares its weights
    (:func:`~peftc.analysis.backbones.shared_copy`; what training writes gets its own storage after the rewrite)."""
    if isinstance(backbone, Backbone):
        return backbone
    if isinstance(backbone, nn.Module):
        return from_module(shared_copy(backbone).eval(), borrowed=True)
    return build_backbone(backbone, pretrained=pretrained, weights=weights, seed=seed, **dict(backbone_kwargs or {}))


def rewrite(method: MethodSpec, bb: Backbone, *, leaves: Iterable[type[nn.Module]] = ()) -> CompileState:
    """The compiler proper: trace ``bb`` and run one pass per rule, in order. Returns the finished state."""
    with _one_thread():
        positions = block_positions(bb.module)
        state = CompileState(trace(bb.module, leaves=leaves), method, positions, bb.input_size)
        state.head_params = sum(sum(p.numel() for p in c.module.parameters()) for c in head(state.index))
        for rule in method.rules:
            get_primitive(rule.op).run(PassContext(state, rule))
        state.finish()
    if bb.borrowed or bb.digest.pending:
        _own_writable(state)
    return state


@contextmanager
def _one_thread() -> Iterator[None]:
    """The passes' tensor work is tiny (probes of a few elements, block inits): on one thread each op skips
    OpenMP's fork and join, tens of microseconds on an idle machine and milliseconds on a loaded one (a 2×3×768
    layer_norm probe: 4 µs on one thread, 17 ms on two under a load of 5)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _own_writable(state: CompileState) -> None:
    """Give every tensor that training or running statistics can write its own storage.

    Needed when the backbone's tensors share storage with the module a user passed in, or with the snapshot its
    hash will be computed from: frozen ones keep sharing it, at no cost, and nothing peftc does writes to them;
    trained parameters, updating buffers and per-task tensors are copied here, once, so training never reaches
    back. A backbone built by name and already hashed shares with nobody: nothing is copied.
    """
    ledger = state.ledger
    writable = ledger.updating_buffers | ledger.tensor_slots.keys()
    seen: set[int] = set()
    gm = state.gm
    for name, t in (*gm.named_parameters(remove_duplicate=False), *gm.named_buffers(remove_duplicate=False)):
        if id(t) in seen or not (t.requires_grad or name in writable):
            continue
        seen.add(id(t))
        t.data = t.data.clone()


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
        seed_generators(seed)
        state = rewrite(method, bb, leaves=leaves)
    report = build_report(method.name, bb.id, backbone_params, state.head_params, original_ids, state.gm, state.ledger)
    info = BackboneInfo(bb.id, bb.source, bb.seed, bb.weights_file, tuple(bb.input_size), bb.digest,
                        tuple(sorted((backbone_kwargs or {}).items())))
    return Compiled(state.gm, method, info, state.ledger, report, schedule=build_schedule(state))


def _rebuild_backbone(info: dict[str, Any], backbone: Any, weights: str | Path | None) -> Any:
    if backbone is not None:
        if isinstance(backbone, str) and backbone != info["id"]:
            raise ArtifactError(f"this delta was made for backbone {info['id']!r}, not {backbone!r}")
        if isinstance(backbone, nn.Module):
            return resolve_backbone(backbone)
    kwargs = dict(info.get("kwargs") or ())
    if info["source"] == "module":
        raise ArtifactError(
            f"this artifact was compiled on a custom module ({info['id']}); "
            "pass it again: peftc.load(dir, backbone=module)"
        )
    if info["source"] == "weights" or weights is not None:
        path = weights or info["weights_file"]
        return build_backbone(info["id"], weights=path, **kwargs)
    if info["source"] == "pretrained":
        return build_backbone(info["id"], pretrained=True, **kwargs)
    return build_backbone(info["id"], seed=int(info.get("seed") or 0), **kwargs)


def load(directory: str | Path, backbone: Any = None, *, weights: str | Path | None = None) -> Any:
    """Rebuild the compiled model saved in ``directory``.

    The backbone is rebuilt from the manifest (same id, seed, weights file or pretrained weights) unless you
    pass it (a name or your own module); its weight hash must match the one recorded at compile time.
    """
    directory = Path(directory)
    manifest = read_manifest(directory)
    info = manifest["backbone"]
    bb = _rebuild_backbone(info, backbone, weights)
    if bb.hash != info["hash"]:
        raise ArtifactError(
            f"this delta was made for {info['id']} with weights {info['hash'][:12]}…, but the backbone given has "
            f"weights {bb.hash[:12]}…; a delta only fits the exact backbone it was trained on"
        )
    try:
        model = compile(manifest["spec"], bb, backbone_kwargs=dict(info.get("kwargs") or ()))
    except PeftcError as exc:
        raise ArtifactError(f"{directory / MANIFEST}: the stored spec no longer compiles: {exc}") from None
    apply_delta(model, manifest, read_delta(directory, manifest), directory)
    return model
