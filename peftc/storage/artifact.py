"""The artifact: a directory holding ``peftc.json`` (what was compiled) and ``delta.safetensors`` (what was learned).

No pickles anywhere: the manifest is JSON, tensors are safetensors, and backbone weight files are read with
``weights_only=True``. The delta holds only what the spec trains or keeps per task — per task under
``tasks/<name>/`` and shared tensors under ``shared/`` — never the frozen backbone. Writes are atomic: the new
artifact is written into a hidden sibling directory and swapped in (:mod:`peftc.storage.atomic`), so an
interrupted save leaves the previous artifact intact. Reading checks the manifest against its schema
(:mod:`peftc.storage.manifest`) and the delta against the manifest, and refuses one that belongs to
another backbone or spec, or holds tensors of a task the manifest does not list (rebuilding the model an
artifact holds is :func:`peftc.compiler.load`). Tensors a block stores packed (``packed_bits``) are stored
packed (``<key>:codes`` + ``<key>:stats``) and decode to exactly what the model trained with
(:mod:`peftc.storage.codec`).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch

from peftc.errors import ArtifactError, PeftcError
from peftc.storage.atomic import replace_directory, staging_dir
from peftc.storage.codec import decode_delta, encode_delta
from peftc.storage.manifest import DELTA, FORMAT, MANIFEST, read_manifest
from peftc.version import __version__

__all__ = ["DELTA", "MANIFEST", "apply_delta", "load_into", "read_delta", "read_manifest", "replace_directory", "save"]


def _delta_tensors(model: Any) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for task in model.bank.names:
        for key, tensor in model.bank.task_tensors(task).items():
            out[f"tasks/{task}/{key}"] = tensor
    for key, tensor in model.shared_state().items():
        out[f"shared/{key}"] = tensor
    return {k: v.detach().to("cpu").contiguous().clone() for k, v in out.items()}


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def manifest_for(model: Any, delta_sha256: str, n_tensors: int) -> dict[str, Any]:
    return {
        "format": FORMAT,
        "peftc": __version__,
        "spec": model.spec.to_document(),
        "params": dict(model.spec.values),
        "backbone": model.backbone.to_dict(),
        "tasks": [{"name": t, "classes": model.bank.classes(t)} for t in model.bank.names],
        "active_task": model.active_task,
        "delta": {"file": DELTA, "sha256": delta_sha256, "tensors": n_tensors},
        "report": model.report.to_dict(),
        **({"regions": list(model.regions)} if model.regions else {}),  # region mode: how load must compile it
    }


def save(model: Any, directory: str | Path) -> Path:
    """Write the artifact for ``model`` into ``directory``; all-or-nothing."""
    from safetensors import SafetensorError
    from safetensors.torch import save_file

    target = Path(directory)
    if target.exists() and not target.is_dir():
        raise ArtifactError(f"{target} exists and is not a directory")
    if target.is_dir() and any(target.iterdir()) and not (target / MANIFEST).is_file():
        raise ArtifactError(f"{target} is a non-empty directory that is not a peftc artifact; choose another path")
    try:
        staging = staging_dir(target)
    except OSError as exc:
        raise ArtifactError(f"cannot write artifact to {target}: {exc.strerror or exc}") from None
    try:
        tensors, quantized = encode_delta(model.net, _delta_tensors(model))  # quantised tensors packed
        # One metadata key: safetensors writes a multi-key map in hash order, which would make equal saves differ.
        stamp = json.dumps({"format": FORMAT, "spec": model.spec.name}, sort_keys=True)
        save_file(tensors, str(staging / DELTA), metadata={"peftc": stamp})
        manifest = manifest_for(model, _sha256(staging / DELTA), len(tensors))
        if quantized:
            manifest["delta"]["quantized"] = quantized  # key -> bits, shape (peftc.methods.adaptformer.quant)
        (staging / MANIFEST).write_text(json.dumps(manifest, indent=2, default=str) + "\n", encoding="utf-8")
        for f in staging.iterdir():
            with f.open("rb") as handle:
                os.fsync(handle.fileno())
        _keep_others(target, staging)
        replace_directory(staging, target)
    except (OSError, SafetensorError) as exc:  # a full disk reaches safetensors' writer as SafetensorError
        shutil.rmtree(staging, ignore_errors=True)
        raise ArtifactError(f"cannot write artifact to {target}: {getattr(exc, 'strerror', None) or exc}") from None
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return target


def _keep_others(target: Path, staging: Path) -> None:
    """Carry what else an artifact directory holds (``peftc train`` keeps its runs in ``train/``) into the new one.

    Saving replaces the manifest and the delta, not the rest of the directory. Entries are hard-linked (copied
    where links fail), so the old directory stays whole until the swap and an interrupted save loses nothing.
    """
    if not (target / MANIFEST).is_file():
        return
    for entry in target.iterdir():
        if entry.name in (MANIFEST, DELTA) or entry.name.startswith("."):
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.copytree(entry, staging / entry.name, symlinks=True, copy_function=_link_or_copy,
                            ignore=shutil.ignore_patterns(".*.partial-*", ".*.old-*"))  # dead writers' staging
        else:
            _link_or_copy(entry, staging / entry.name)


def _link_or_copy(src: str | Path, dst: str | Path) -> None:
    try:
        os.link(src, dst, follow_symlinks=False)
    except OSError:
        shutil.copy2(src, dst, follow_symlinks=False)


def read_delta(directory: Path, manifest: dict[str, Any]) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    delta = directory / manifest["delta"]["file"]
    if not delta.is_file():
        raise ArtifactError(f"{directory}: {delta.name} is missing")
    if _sha256(delta) != manifest["delta"]["sha256"]:
        raise ArtifactError(f"{delta} does not match its manifest (corrupt or replaced)")
    try:
        return load_file(str(delta))
    except (SafetensorError, OSError) as exc:
        raise ArtifactError(f"cannot read {delta}: {exc}") from None


def load_into(model: Any, directory: str | Path) -> Any:
    """Load an artifact's delta into an already compiled ``model``; refuses one made for another backbone/spec."""
    directory = Path(directory)
    manifest = read_manifest(directory)
    info = manifest["backbone"]
    if info["id"] != model.backbone.id or info["hash"] != model.backbone.hash:
        raise ArtifactError(
            f"{directory}: this delta was made for backbone {info['id']!r} ({info['hash'][:12]}…), "
            f"not {model.backbone.id!r} ({model.backbone.hash[:12]}…)"
        )
    theirs, ours = manifest["spec"], model.spec.to_document()
    if theirs.get("name") != ours["name"] or theirs.get("rules") != json.loads(json.dumps(ours["rules"])):
        raise ArtifactError(
            f"{directory}: this delta was made for spec {theirs.get('name')!r} with params {manifest.get('params')}, "
            f"not {ours['name']!r} with params {dict(model.spec.values)}"
        )
    apply_delta(model, manifest, read_delta(directory, manifest), directory)
    return model


def _traced(regions: Any) -> str:
    return f"per region ({', '.join(regions)})" if regions else "whole"


def apply_delta(model: Any, manifest: dict[str, Any], tensors: dict[str, torch.Tensor], directory: Path) -> None:
    if list(manifest.get("regions", [])) != list(model.regions):
        raise ArtifactError(f"{directory}: this delta was made on the backbone traced "
                            f"{_traced(manifest.get('regions', []))}, but it now traces {_traced(model.regions)}; "
                            "its tensors would not fit")
    tensors = decode_delta(model.net, tensors, manifest["delta"].get("quantized") or {})
    for task in manifest["tasks"]:
        if task["name"] not in model.bank:
            model.bank.add(task["name"], task["classes"])
    listed = {task["name"] for task in manifest["tasks"]}
    grouped: dict[str, dict[str, torch.Tensor]] = {}
    shared: dict[str, torch.Tensor] = {}
    for key, tensor in tensors.items():
        scope, _, rest = key.partition("/")
        if scope == "tasks":
            task, _, name = rest.partition("/")
            if task not in listed:  # loading would drop it and the next save delete it: refuse instead
                raise ArtifactError(f"{directory / DELTA}: tensor {key!r} belongs to task {task!r}, which "
                                    f"{MANIFEST} does not list (tasks: {', '.join(sorted(listed))})")
            grouped.setdefault(task, {})[name] = tensor
        elif scope == "shared":
            shared[rest] = tensor
        else:
            raise ArtifactError(f"{directory / DELTA}: unexpected tensor {key!r}")
    try:
        for task in model.bank.names:
            model.bank.load_task_tensors(task, grouped.get(task, {}))
    except PeftcError as exc:
        fits = f"spec {model.spec.name!r} on {model.backbone.id}"
        raise ArtifactError(f"{directory}: delta does not fit {fits}: {exc}") from None
    expected = model.shared_state()
    if set(expected) != set(shared):
        diff = sorted(set(expected) ^ set(shared))
        raise ArtifactError(f"{directory}: shared tensors do not fit this model (e.g. {diff[0]!r})")
    with torch.no_grad():
        for key, value in shared.items():
            if expected[key].shape != value.shape:
                have = tuple(expected[key].shape)
                raise ArtifactError(f"{directory}: {key} has shape {tuple(value.shape)}, model has {have}")
            expected[key].copy_(value)
    model.set_task(manifest["active_task"])
