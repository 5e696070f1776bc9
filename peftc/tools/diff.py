"""``peftc diff``: what a rewrite changed — the two sides, built, then compared (:mod:`peftc.tools.compare`).

A side can be a backbone, a spec compiled on it, a compiled model or an artifact directory, so one function
answers "what does this spec do", "how do these two specs differ" and "how do these two checkpoints differ".
Renderers (text, DOT, HTML) live in :mod:`peftc.tools.render`; the JSON form is :meth:`GraphDiff.to_json`
(schema in docs/diff.md).
"""

from __future__ import annotations

import copy
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from peftc.analysis.index import block_positions
from peftc.errors import ArtifactError, PeftcError
from peftc.language import MethodSpec, load_spec
from peftc.tools.compare import GraphDiff, compare
from peftc.tools.view import (
    GraphView,
    input_shape,
    view_backbone,
    view_model,
)

if TYPE_CHECKING:
    from peftc.analysis.backbones import Backbone
    from peftc.runtime.model import Compiled

__all__ = ["diff"]


def _plain(values: Mapping[str, Any]) -> dict[str, Any]:
    return json.loads(json.dumps(dict(values), default=str))


def _spec_label(spec: MethodSpec, overrides: Mapping[str, Any] | None = None) -> str:
    if not overrides:
        return spec.name
    return f"{spec.name}(" + ", ".join(f"{k}={v}" for k, v in overrides.items()) + ")"


# ------------------------------------------------------------------------------------------------------------
# The public entry point: sides from specs, models or artifacts
# ------------------------------------------------------------------------------------------------------------


@dataclass
class _Side:
    model: Compiled | None  # None: the backbone itself
    backbone: Backbone
    source: dict[str, Any]
    label: str
    artifact: Path | None = None


def _is_artifact(x: Any) -> bool:
    if not isinstance(x, (str, Path)):
        return False
    from peftc.storage.artifact import MANIFEST

    path = Path(x)
    return path.is_dir() and (path / MANIFEST).is_file()


def _rebuild(info: Mapping[str, Any], backbone: Any, seed: int) -> Backbone:
    """A backbone of the same structure as one a model or artifact was compiled on (random init suffices)."""
    from peftc.analysis.backbones import build_backbone
    from peftc.compiler import resolve_backbone

    if backbone is not None:
        return resolve_backbone(backbone, seed=seed)
    if info.get("source") == "module":
        raise PeftcError(f"{info['id']} is a custom module; pass it again as backbone= to diff against it")
    kwargs = dict(info.get("kwargs") or ())
    return build_backbone(str(info["id"]), seed=int(info.get("seed") or seed), **kwargs)


def _artifact_side(path: Path, backbone: Any, seed: int) -> _Side:
    from peftc.compiler import compile as compile_model
    from peftc.storage.artifact import read_manifest

    manifest = read_manifest(path)
    info = manifest["backbone"]
    bb = _rebuild(info, backbone, seed)
    try:
        model = compile_model(
            manifest["spec"], copy.deepcopy(bb), backbone_kwargs=dict(info.get("kwargs") or ())
        )
    except PeftcError as exc:
        raise ArtifactError(f"{path}: the stored spec no longer compiles: {exc}") from None
    for task in manifest.get("tasks", []):
        if task["name"] not in model.bank:
            model.add_task(task["name"], task.get("classes"))
    model.set_task(manifest.get("active_task", model.active_task))
    source = {
        "kind": "artifact",
        "path": str(path),
        "backbone": info["id"],
        "spec": manifest["spec"].get("name"),
        "params": manifest.get("params", {}),
        "tasks": [t["name"] for t in manifest.get("tasks", [])],
        "active_task": model.active_task,
    }
    return _Side(model, bb, source, path.name or str(path), path)


def _tensor_diff(a: Path, b: Path) -> dict[str, Any]:
    """Compare two artifacts' saved deltas tensor by tensor."""
    from peftc.storage.artifact import read_delta, read_manifest

    ta = read_delta(a, read_manifest(a))
    tb = read_delta(b, read_manifest(b))
    changed = []
    same = 0
    for key in sorted(set(ta) & set(tb)):
        x, y = ta[key], tb[key]
        if x.shape != y.shape:
            changed.append({"tensor": key, "shape": {"a": list(x.shape), "b": list(y.shape)}})
        elif x.dtype != y.dtype or not torch.equal(x, y):
            delta = (x.double() - y.double()).abs().max().item() if x.numel() else 0.0
            changed.append({"tensor": key, "numel": x.numel(), "max_abs_diff": float(f"{delta:.6g}")})
        else:
            same += 1
    only_a, only_b = sorted(set(ta) - set(tb)), sorted(set(tb) - set(ta))
    return {
        "only_a": only_a,
        "only_b": only_b,
        "changed": changed,
        "same": same,
        "differ": bool(only_a or only_b or changed),
    }


def diff(
    a: Any,
    b: Any = None,
    *,
    backbone: str | nn.Module | Backbone | None = None,
    params: Mapping[str, Any] | None = None,
    params_b: Mapping[str, Any] | None = None,
    image_size: int | tuple[int, int] | None = None,
    seed: int = 0,
    leaves: Iterable[type[nn.Module]] = (),
    reference: GraphView | None = None,
) -> GraphDiff:
    """What a rewrite changes, as a :class:`GraphDiff`.

    - ``diff("clr", backbone="resnet50")`` — the backbone against the spec compiled on it;
    - ``diff("clr", "lora", backbone=...)`` — two specs (or one spec with ``params`` vs ``params_b``);
    - ``diff(model)`` / ``diff(model_a, model_b)`` — compiled models (the first against its rebuilt backbone);
    - ``diff("out/a", "out/b")`` — two artifact directories, including which saved tensors differ.

    Shapes and FLOPs come from one example batch at the backbone's input size, or ``image_size``.
    ``reference`` is a view of the backbone made earlier with :func:`peftc.tools.view.view_backbone` at the same
    input: diffing many specs against one backbone then traces and runs the backbone only once.
    """
    from peftc.compiler import compile as compile_model
    from peftc.compiler import resolve_backbone
    from peftc.runtime.model import Compiled

    built: dict[str, Backbone] = {}

    def base() -> Backbone:
        if "bb" not in built:
            if backbone is None:
                raise PeftcError("a spec needs a backbone to compile on: give backbone= (CLI: --backbone)")
            built["bb"] = resolve_backbone(backbone, seed=seed)
        return built["bb"]

    def side(x: Any, overrides: Mapping[str, Any] | None) -> _Side:
        if isinstance(x, Compiled):
            if overrides:
                raise PeftcError("params apply to specs, not to an already compiled model")
            info = {
                "id": x.backbone.id,
                "source": x.backbone.source,
                "seed": x.backbone.seed,
                "kwargs": x.backbone.kwargs,
            }
            return _Side(
                x,
                _rebuild(info, backbone, seed),
                {
                    "kind": "model",
                    "backbone": x.backbone.id,
                    "spec": x.spec.name,
                    "params": _plain(x.spec.values),
                    "active_task": x.active_task,
                },
                _spec_label(x.spec),
            )
        if _is_artifact(x):
            if overrides:
                raise PeftcError("params apply to specs, not to an artifact")
            return _artifact_side(Path(x), backbone, seed)
        method = load_spec(x, overrides)
        bb = base()
        model = compile_model(method, copy.deepcopy(bb), leaves=leaves)
        source = {"kind": "spec", "backbone": bb.id, "spec": method.name, "params": _plain(method.values)}
        return _Side(model, bb, source, _spec_label(method, overrides))

    if b is None:
        right = side(a, params)
        left = _Side(
            None, right.backbone, {"kind": "backbone", "backbone": right.backbone.id}, right.backbone.id
        )
    else:
        left, right = side(a, params), side(b, params_b)

    views = []
    for s in (left, right):
        shape = input_shape(tuple(s.backbone.input_size), image_size)  # type: ignore[arg-type]
        if s.model is None and reference is not None:
            if reference.source.get("kind") != "backbone" or reference.source.get("backbone") != s.backbone.id \
                    or reference.input != shape:
                raise PeftcError(f"reference= is a view of {reference.label} at {list(reference.input)}, "
                                 f"not of backbone {s.backbone.id} at {list(shape)}")
            views.append(reference)
        elif s.model is None:
            views.append(view_backbone(s.backbone, shape, leaves=leaves))
        else:
            views.append(
                view_model(s.model, shape, block_positions(s.backbone.module), label=s.label, source=s.source)
            )
    result = compare(*views)
    if left.artifact is not None and right.artifact is not None:
        result.tensors = _tensor_diff(left.artifact, right.artifact)
    return result
