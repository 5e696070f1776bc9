"""Model arithmetic: a spec attached to a downstream artifact of the same backbone, both deltas kept.

The combined spec is the downstream spec's rules, unchanged, followed by the attached spec's rules without

* its ``freeze`` rules — attaching must not change what the downstream model trains and saves, and
* a rule of a primitive that may appear once per model (``once`` in :mod:`peftc.language.primitives`) when the
  downstream already has one — the downstream's stays.

The downstream's tensors are copied into the combined model by name (its rules ran first, so every path is the
same), then the attached spec's trained tensors from its own artifact (``delta``). Both are deltas of the same
frozen backbone; the result is an ordinary compiled model whose artifact is self-contained.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from peftc.compiler import compile, load
from peftc.errors import ArtifactError
from peftc.language import get_primitive, load_spec
from peftc.storage.artifact import read_manifest

__all__ = ["attach", "combine_specs"]


def combine_specs(base: Any, addon: Any) -> dict[str, Any]:
    """The spec document of ``addon`` attached to ``base`` (two resolved MethodSpecs; see the module docstring)."""
    base_doc, add_doc = base.to_document(), addon.to_document()
    base_ops = {next(k for k in r if k != "label") for r in base_doc["rules"]}
    kept, dropped = [], []
    for rule in add_doc["rules"]:
        op = next(k for k in rule if k != "label")
        if op == "freeze":
            continue
        if get_primitive(op).once and op in base_ops:
            dropped.append(op)
            continue
        kept.append(rule)
    params = dict(base_doc["params"])
    for name, decl in add_doc["params"].items():
        if name in params and params[name] != decl:
            name = f"{addon.name}_{name}"  # the rules are already bound: params are a record here
        params[name] = decl
    doc = {**base_doc, "name": f"{base.name}+{addon.name}", "params": params, "rules": base_doc["rules"] + kept}
    doc["summary"] = f"{base.summary or base.name} + {addon.name}"
    doc["notes"] = ((base_doc.get("notes") or "").rstrip() + "\n\n" if base_doc.get("notes") else "") + (
        f"Attached {addon.name} (peftc.compose.attach): the rules above the first {addon.name} rule are the "
        f"downstream spec {base.name!r}; {addon.name}'s freeze rules"
        + "".join(f" and its {op} rule (once per model; the downstream has one)" for op in dropped)
        + " are left out.")
    return doc


def attach(
    spec: Any,
    base: str | Path,
    *,
    delta: str | Path | None = None,
    backbone: str | None = None,
    params: Mapping[str, Any] | None = None,
    **overrides: Any,
) -> Any:
    """``spec`` attached to the downstream artifact ``base`` (a plugin distilled once per backbone, say); returns
    a compiled model.

    The downstream's trained tensors are copied in; with ``delta`` (an artifact of ``spec`` on the same backbone,
    e.g. the distilled ToCom plugin) the spec's trained tensors are copied from it too. ``backbone``, when given,
    must be the downstream's backbone id. Spec params come from ``params`` and keyword arguments
    (``attach(spec, dir, delta=plugin_dir, r_src=8)``).
    """
    manifest = read_manifest(base)
    info = manifest["backbone"]
    if backbone is not None and backbone != info["id"]:
        raise ArtifactError(f"{base} was compiled on {info['id']!r}, not {backbone!r}: attach to the same backbone")
    downstream = load(base)
    addon = load_spec(spec, {**dict(params or {}), **overrides})
    combined_doc = combine_specs(downstream.spec, addon)
    source = info["source"]
    if source == "module":
        raise ArtifactError(f"{base} was compiled on a custom module; attach needs a backbone peftc can rebuild")
    model = compile(
        combined_doc, info["id"], pretrained=source == "pretrained",
        weights=info["weights_file"] if source == "weights" else None, seed=int(info.get("seed") or 0),
        backbone_kwargs=dict(info.get("kwargs") or ()))
    if model.backbone.hash != info["hash"]:
        raise ArtifactError(f"{base}: the rebuilt backbone {info['id']} does not match the artifact's weights")
    _copy_tasks(downstream, model)
    if delta is not None:
        _copy_addon(delta, model, addon.name, info)
    return model


def _copy_tasks(source: Any, target: Any) -> None:
    """Every task of ``source`` into ``target``, tensor by tensor (same names: the base rules ran first)."""
    active = source.active_task
    for task in source.tasks:
        if task not in target.tasks:
            target.add_task(task, source.bank.classes(task))
        source.set_task(task)
        target.set_task(task)
        theirs, ours = source.net.state_dict(), target.net.state_dict()
        with torch.no_grad():
            for name, tensor in theirs.items():
                if name not in ours or ours[name].shape != tensor.shape:
                    raise ArtifactError(f"the downstream tensor {name!r} has no place in the combined model")
                ours[name].copy_(tensor)
    source.set_task(active)
    target.set_task(active)


def _copy_addon(delta: str | Path, target: Any, addon_name: str, base_info: Mapping[str, Any]) -> None:
    """The trained tensors of an artifact of the attached spec (a distilled plugin, say) into ``target``."""
    manifest = read_manifest(delta)
    if manifest["spec"].get("name") != addon_name:
        raise ArtifactError(f"{delta} holds a {manifest['spec'].get('name')!r} delta, not {addon_name!r}")
    if manifest["backbone"]["hash"] != base_info["hash"]:
        raise ArtifactError(
            f"{delta} was trained on {manifest['backbone']['id']} ({manifest['backbone']['hash'][:12]}…), the "
            f"downstream model on {base_info['id']} ({base_info['hash'][:12]}…): a plugin only fits its backbone")
    plugin = load(delta)
    ours = dict(target.net.named_parameters())
    with torch.no_grad():
        for name, tensor in plugin.shared_state().items():  # what the attached spec trained (a plugin)
            if name not in ours or ours[name].shape != tensor.shape:
                raise ArtifactError(f"{delta}: {name!r} has no place in the combined model")
            ours[name].copy_(tensor)
