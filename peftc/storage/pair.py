"""A compiled vision-language pair's artifact: ``pair.json`` (what was compiled, on which two models) and
``delta.safetensors`` (the trainable tensors, under the pair's own names).

Loading compiles the stored spec on the same two models again (``peftc.load(DIR, backbone=peftc.pair(vit, lm))``)
and refuses models whose weights hash differently from the recorded ones. Written atomically; no pickles.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path
from typing import Any

import torch

from peftc.errors import ArtifactError
from peftc.storage.atomic import replace_directory, staging_dir
from peftc.storage.manifest import DELTA
from peftc.version import __version__

__all__ = ["PAIR", "is_pair_artifact", "load_pair_delta", "read_pair", "save_pair"]

PAIR = "pair.json"
FORMAT = "peftc.pair/1"


def is_pair_artifact(directory: str | Path) -> bool:
    return (Path(directory) / PAIR).is_file()


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def save_pair(model: Any, directory: str | Path) -> Path:
    """Write ``model``'s artifact into ``directory``, all or nothing."""
    from safetensors.torch import save_file

    target = Path(directory)
    if target.exists() and (not target.is_dir() or (any(target.iterdir()) and not is_pair_artifact(target))):
        raise ArtifactError(f"{target} exists and is not a pair artifact; choose another path")
    staging = staging_dir(target)
    try:
        tensors = {n: p.detach().cpu().contiguous().clone() for n, p in model.named_trainable_parameters()}
        save_file(tensors, str(staging / DELTA), metadata={"peftc": FORMAT})
        manifest = {
            "format": FORMAT, "peftc": __version__, "spec": model.spec.to_document(),
            "params": dict(model.spec.values), "vision": model.vision.backbone.to_dict(),
            "language": {"class": type(model.language).__name__, "hash": model.language_hash},
            "delta": {"file": DELTA, "sha256": _sha256(staging / DELTA), "tensors": len(tensors)},
            "trainable_params": model.trainable_params,
        }
        (staging / PAIR).write_text(json.dumps(manifest, indent=2, default=str) + "\n", encoding="utf-8")
        replace_directory(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return target


def read_pair(directory: str | Path) -> dict[str, Any]:
    path = Path(directory) / PAIR
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ArtifactError(f"cannot read {path}: {exc}") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise ArtifactError(f"{path} is not a {FORMAT} manifest")
    return manifest


def load_pair_delta(model: Any, directory: str | Path, manifest: dict[str, Any] | None = None) -> Any:
    """Load the artifact's tensors into ``model`` (compiled from the same spec on the same two models)."""
    from safetensors.torch import load_file

    directory = Path(directory)
    manifest = manifest or read_pair(directory)
    for part, recorded, given in (("visual encoder", manifest["vision"]["hash"], model.vision.backbone.hash),
                                  ("language model", manifest["language"]["hash"], model.language_hash)):
        if recorded != given:
            raise ArtifactError(f"{directory}: this delta was made for a {part} with weights {recorded[:12]}…, but "
                                f"the one given has weights {given[:12]}…; a delta only fits the models it was "
                                "trained on")
    delta = directory / manifest["delta"]["file"]
    if not delta.is_file() or _sha256(delta) != manifest["delta"]["sha256"]:
        raise ArtifactError(f"{delta} is missing or does not match its manifest")
    tensors = load_file(str(delta))
    ours = dict(model.named_trainable_parameters())
    if set(ours) != set(tensors):
        odd = sorted(set(ours) ^ set(tensors))
        raise ArtifactError(f"{directory}: the delta does not fit this pair (e.g. {odd[0]!r})")
    with torch.no_grad():
        for name, value in tensors.items():
            if ours[name].shape != value.shape:
                raise ArtifactError(f"{directory}: {name} has shape {tuple(value.shape)}, the model has "
                                    f"{tuple(ours[name].shape)}")
            ours[name].copy_(value)
    return model
