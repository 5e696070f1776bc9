"""The driver: spec + backbone → trace → passes, in rule order → :class:`~peftc.runtime.model.Compiled`; and
back from an artifact (rebuild the backbone, check its hash, compile the stored spec, apply the delta)."""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from peftc.analysis.backbones import (
    Backbone,
    WeightsDigest,
    build_backbone,
    from_module,
    seed_generators,
    shared_copy,
)
from peftc.analysis.canonical import canonicalize
from peftc.analysis.index import block_positions
from peftc.analysis.regions import glue_message, stack_of, trace_model
from peftc.analysis.roles import head
from peftc.analysis.stack import Stack, cut, decoder_layers, first_calls, install, record_calls, trace_stack
from peftc.analysis.trace import trace_info
from peftc.errors import ArtifactError, PeftcError
from peftc.language import MethodSpec, get_primitive, load_spec
from peftc.passes import CompileState, PassContext, StreamInput
from peftc.passes.tap import tap_tokens
from peftc.runtime.model import BackboneInfo, Compiled
from peftc.runtime.pair import CompiledPair, StreamValue, StreamValues
from peftc.runtime.report import build_report
from peftc.runtime.schedule import build_schedule
from peftc.storage.artifact import MANIFEST, apply_delta, read_delta, read_manifest
from peftc.storage.pair import PAIR, is_pair_artifact, load_pair_delta, read_pair

__all__ = ["Pair", "compile", "load", "pair", "resolve_backbone", "rewrite"]


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
    """The compiler proper: trace ``bb`` (whole, else per region) and run one pass per rule, in order. Returns the
    finished state."""
    with _one_thread():
        positions = block_positions(bb.module)
        gm = trace_model(bb.module, leaves=leaves, input_size=bb.input_size)
        stack = stack_of(gm)
        state = CompileState(gm, method, positions, bb.input_size, examples=stack.examples if stack else {})
        state.head_params = sum(sum(p.numel() for p in c.module.parameters()) for c in head(state.index))
        for rule in method.rules:
            try:
                get_primitive(rule.op).run(PassContext(state, rule))
            except PeftcError as exc:
                if stack is not None:  # say what lies outside the regions, where no rule reaches
                    exc.message += glue_message(trace_info(gm), type(bb.module).__name__)
                raise
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


@dataclass(frozen=True)
class Pair:
    """A visual encoder and a decoder language model, compiled as one model (:func:`pair`)."""

    vision: str | nn.Module | Backbone
    language: nn.Module


def pair(vision: str | nn.Module | Backbone, language: nn.Module) -> Pair:
    """Name a vision-language pair for :func:`compile`: ``peftc.compile("memvp", peftc.pair(vit, lm))``.

    ``vision`` is what :func:`compile` takes as a backbone (a timm CLIP ViT, by name or built); ``language`` a
    causal language model module with token embeddings (transformers' ``LlamaForCausalLM``, ``Qwen2ForCausalLM``
    …). The spec's ``pair:`` section wires them; its rules say which part they rewrite (``part:``).
    """
    if not isinstance(language, nn.Module) or not callable(getattr(language, "get_input_embeddings", None)):
        raise PeftcError(f"the language model of a pair must be a causal LM module with token embeddings "
                         f"(e.g. transformers' LlamaForCausalLM), got {type(language).__name__}")
    if not isinstance(vision, (str, nn.Module, Backbone)):
        raise PeftcError(f"the visual encoder of a pair is a backbone name or module, got {type(vision).__name__}")
    return Pair(vision, language)


def compile(
    spec: str | Path | Mapping[str, Any] | MethodSpec,
    backbone: str | nn.Module | Backbone | Pair,
    *,
    params: Mapping[str, Any] | None = None,
    pretrained: bool = False,
    weights: str | Path | None = None,
    seed: int = 0,
    backbone_kwargs: Mapping[str, Any] | None = None,
    leaves: Iterable[type[nn.Module]] = (),
    **param_overrides: Any,
) -> Compiled | CompiledPair:
    """Rewrite ``backbone`` as ``spec`` says and return the trainable model.

    ``spec`` is a file path, a built-in name (``"clr"``), a document mapping or a loaded :class:`MethodSpec`;
    spec params come from ``params`` and/or keyword arguments (``compile("clr", "resnet50", variant="full")``).
    ``backbone`` is a name (``"resnet50"``, ``"timm:vit_tiny_patch16_224"``) or a module you built, which is
    copied and never modified. ``seed`` seeds the backbone's random init and the inserted blocks' init (LoRA's
    down projections, adapters), so the same call always gives the same model and a byte-identical artifact;
    the caller's global RNG is left as it was. ``backbone`` may also be a vision-language :func:`pair`: the result
    is then a :class:`~peftc.runtime.pair.CompiledPair` (``model(images, input_ids, labels=…)``).
    """
    overrides = {**dict(params or {}), **param_overrides}
    method = load_spec(spec, overrides)
    with torch.random.fork_rng(devices=[]):
        seed_generators(seed)
        if isinstance(backbone, Pair):
            return _compile_pair(method, backbone, pretrained=pretrained, weights=weights, seed=seed,
                                 backbone_kwargs=backbone_kwargs)
        bb = resolve_backbone(backbone, pretrained=pretrained, weights=weights, seed=seed,
                              backbone_kwargs=backbone_kwargs)
        return _compile_backbone(method, bb, backbone_kwargs, leaves=leaves)


def _compile_backbone(method: MethodSpec, bb: Backbone, backbone_kwargs: Mapping[str, Any] | None, *,
                      leaves: Iterable[type[nn.Module]] = (), feeds: StreamInput | None = None) -> Compiled:
    """Rewrite one backbone; as the visual encoder of a pair, its graph then outputs the tokens the spec's
    ``pair:`` section names (:func:`~peftc.passes.tap.tap_tokens`), which the stream ``feeds`` reads."""
    canonicalize(bb.module)  # nn.MultiheadAttention -> traceable qkv/proj Linears (same tensors, same function)
    original_ids = {id(p) for p in bb.module.parameters()}
    backbone_params = sum(p.numel() for p in bb.module.parameters())
    state = rewrite(method, bb, leaves=leaves)
    if feeds is not None and method.pair is not None:
        _, tokens, width = (int(d) for d in tap_tokens(state, method.pair))
        if width != feeds.features:
            raise PeftcError(f"the visual encoder's tokens are {width} wide but stream {feeds.name!r} takes "
                             f"{feeds.features} features: set the spec's param that feeds it (e.g. features={width})")
        if feeds.max_tokens is not None and tokens > feeds.max_tokens:
            raise PeftcError(f"the visual encoder gives {tokens} tokens but stream {feeds.name!r} holds at most "
                             f"{feeds.max_tokens}: set the spec's param that sizes it (e.g. tokens={tokens})")
        state.finish()
    report = build_report(method.name, bb.id, backbone_params, state.head_params, original_ids, state.gm, state.ledger)
    info = BackboneInfo(bb.id, bb.source, bb.seed, bb.weights_file, tuple(bb.input_size), bb.digest,
                        tuple(sorted((backbone_kwargs or {}).items())))
    net = state.gm if stack_of(state.gm) is None else _install_regions(bb.module, state)
    return Compiled(net, method, info, state.ledger, report, schedule=build_schedule(state), graph=state.gm)


def _install_regions(model: nn.Module, state: CompileState) -> nn.Module:
    """Region mode: the rewritten graph cut back into its regions, installed in ``model``, whose own forward is
    the glue that runs them. The glue's own parameters are frozen: no rule reaches them."""
    stack = stack_of(state.gm)
    pieces = cut(state.gm, stack, set(), _no_stream)
    install(model, stack.paths, pieces.layers)
    _freeze_glue(model, state)
    return model


def _no_stream(name: str) -> nn.Module:
    raise PeftcError(f"a rule computes {name!r} outside every region; in region mode each rule's nodes must lie in "
                     "one traced region")


def _freeze_glue(model: nn.Module, state: CompileState) -> None:
    in_graph = {id(p) for p in state.gm.parameters()}
    for p in model.parameters():
        if id(p) not in in_graph:
            p.requires_grad_(False)


def _compile_pair(method: MethodSpec, both: Pair, **backbone: Any) -> CompiledPair:
    """The language model's decoder stack rewritten with the ``part: language`` rules and cut back into its layers
    (:mod:`peftc.analysis.stack`); the visual encoder compiled with the ``part: vision`` rules and tapped."""
    if method.pair is None:
        raise PeftcError(f"spec {method.name!r} has no pair: section: it does not say which of the visual encoder's "
                         "tokens feed which stream of the language model")
    part = method.part("language")
    digest = WeightsDigest({n: t.detach() for n, t in both.language.state_dict(keep_vars=True).items()})
    lm = shared_copy(both.language).eval()
    original_ids = {id(p) for p in lm.parameters()}
    backbone_params = sum(p.numel() for p in lm.parameters())
    state, stack = _rewrite_stack(part, lm)
    stream = state.ledger.streams.get(method.pair.stream)
    if stream is None:
        raise PeftcError(f"pair.stream {method.pair.stream!r}: no 'part: language' rule of {method.name!r} adds that "
                         "stream to the language model")
    vision = _compile_backbone(method.part("vision"), resolve_backbone(both.vision, **backbone),
                               backbone.get("backbone_kwargs"), feeds=stream)
    values = StreamValues()
    pieces = cut(state.gm, stack, set(state.ledger.streams), lambda name: StreamValue(values, name))
    install(lm, stack.paths, pieces.layers)
    _freeze_glue(lm, state)  # the glue's own layers (embeddings, final norm, LM head)
    report = build_report(part.name, type(lm).__name__, backbone_params, 0, original_ids, state.gm, state.ledger)
    return CompiledPair(vision, lm, pieces.prelude, values, method, stream,
                        {"vision": vision.report, "language": report}, digest)


def _rewrite_stack(part: MethodSpec, lm: nn.Module) -> tuple[CompileState, Stack]:
    """Trace ``lm``'s decoder layers as one stack (from one recorded example forward) and run ``part``'s rules."""
    paths = decoder_layers(lm)
    device = next(lm.parameters()).device
    calls = record_calls(lm, paths, lambda: lm(input_ids=torch.zeros(1, 8, dtype=torch.long, device=device),
                                               use_cache=False),
                         hint="a pair's language model is called as lm(input_ids=..., attention_mask=..., "
                              "labels=..., use_cache=False)")
    stack = trace_stack(lm, paths, first_calls(lm, paths, calls))
    state = CompileState(stack.gm, part, block_positions(lm), tuple(stack.hidden.shape[1:]), examples=stack.examples)
    for rule in part.rules:
        get_primitive(rule.op).run(PassContext(state, rule))
    state.finish()
    _own_writable(state)  # the stack shares the caller's language model's storage
    return state, stack


def _load_pair(directory: Path, both: Any) -> CompiledPair:
    manifest = read_pair(directory)
    if not isinstance(both, Pair):
        raise ArtifactError(f"{directory} holds a vision-language pair ({manifest['language']['class']}): pass both "
                            "models, peftc.load(dir, backbone=peftc.pair(vision, language))")
    try:
        model = compile(manifest["spec"], both)
    except PeftcError as exc:
        raise ArtifactError(f"{directory / PAIR}: the stored spec no longer compiles on this pair: {exc}") from None
    return load_pair_delta(model, directory, manifest)


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
    pass it (a name or your own module); its weight hash must match the one recorded at compile time. A
    vision-language pair's artifact needs both models again: ``load(dir, backbone=peftc.pair(vit, lm))``.
    """
    directory = Path(directory)
    if is_pair_artifact(directory):
        return _load_pair(directory, backbone)
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
