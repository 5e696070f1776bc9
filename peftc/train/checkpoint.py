"""Resumable checkpoints without pickles: the model as an artifact, everything else as safetensors + JSON.

A task's checkpoint is one directory, ``<artifact>/train/<task>/checkpoint``, replaced atomically after every
epoch (written beside it, then swapped in with renames, like the artifact itself)::

    model/                 the artifact (peftc.json + delta.safetensors) at the end of the last finished epoch
    optimizer.safetensors  the optimizer's per-parameter tensors (``state/<index>/<name>``)
    rng.safetensors        torch's CPU (and CUDA) generator states
    best.safetensors       the best epoch's trained tensors, for early stopping (when there is one)
    stage.safetensors      tensors the running stage keeps outside the model (a temporary head, say)
    state.json             stage, epoch, step, best accuracy, history, optimizer param groups, schedule, Python RNG

Optimizer state is split by type: tensors go to safetensors, plain values (lr, betas, step counts stored as
numbers) to JSON, and loading rebuilds exactly the ``state_dict`` torch produced.
"""

from __future__ import annotations

import json
import random
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from peftc.errors import PeftcError
from peftc.storage.atomic import replace_directory, staging_dir

__all__ = ["Checkpoint", "CheckpointError", "optimizer_from_files", "optimizer_to_files", "rng_state",
           "set_rng_state"]

STATE = "state.json"
OPTIMIZER = "optimizer.safetensors"
RNG = "rng.safetensors"
BEST = "best.safetensors"
EXTRA = "stage.safetensors"
MODEL = "model"


class CheckpointError(PeftcError):
    """A checkpoint is missing, damaged or belongs to another run."""


# -- optimizer ------------------------------------------------------------------------------------------------

def optimizer_to_files(state: Mapping[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Split ``optimizer.state_dict()`` into (tensors for safetensors, JSON-able rest)."""
    tensors: dict[str, torch.Tensor] = {}
    plain: dict[str, Any] = {"state": {}, "param_groups": []}
    for index, entry in state["state"].items():
        kept: dict[str, Any] = {}
        for name, value in entry.items():
            if isinstance(value, torch.Tensor):
                tensors[f"state/{index}/{name}"] = value.detach().to("cpu").contiguous().clone()
                kept[name] = {"tensor": f"state/{index}/{name}"}
            else:
                kept[name] = value
        plain["state"][str(index)] = kept
    for group in state["param_groups"]:
        plain["param_groups"].append({k: list(v) if isinstance(v, tuple) else v for k, v in group.items()})
    return tensors, plain


def optimizer_from_files(tensors: Mapping[str, torch.Tensor], plain: Mapping[str, Any]) -> dict[str, Any]:
    """Inverse of :func:`optimizer_to_files` (tuples such as ``betas`` come back as tuples)."""
    state: dict[int, dict[str, Any]] = {}
    for index, entry in plain["state"].items():
        state[int(index)] = {
            name: tensors[value["tensor"]] if isinstance(value, dict) and "tensor" in value else value
            for name, value in entry.items()
        }
    groups = [{k: tuple(v) if k == "betas" else v for k, v in g.items()} for g in plain["param_groups"]]
    return {"state": state, "param_groups": groups}


# -- random number generators ---------------------------------------------------------------------------------

def rng_state() -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(tensors, JSON) capturing torch's CPU/CUDA generators and Python's ``random``."""
    tensors = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"torch_cuda_{i}"] = s
    version, internal, gauss = random.getstate()
    return tensors, {"python": [version, list(internal), gauss]}


def set_rng_state(tensors: Mapping[str, torch.Tensor], plain: Mapping[str, Any]) -> None:
    torch.set_rng_state(tensors["torch_cpu"])
    cuda = [tensors[k] for k in sorted(tensors) if k.startswith("torch_cuda_")]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda[: torch.cuda.device_count()])
    version, internal, gauss = plain["python"]
    random.setstate((version, tuple(internal), gauss))


# -- the directory ----------------------------------------------------------------------------------------------

class Checkpoint:
    """The checkpoint directory of one task's run (see the module docstring)."""

    def __init__(self, path: Path):
        self.path = Path(path)

    @property
    def exists(self) -> bool:
        return (self.path / STATE).is_file()

    def write(self, model: Any, state: dict[str, Any], optimizer: torch.optim.Optimizer | None = None,
              best: Mapping[str, torch.Tensor] | None = None,
              extra: Mapping[str, torch.Tensor] | None = None) -> None:
        """Write a complete checkpoint next to the current one, then swap it in (all or nothing)."""
        from safetensors.torch import save_file

        from peftc.storage.artifact import save as save_artifact

        try:
            staging = staging_dir(self.path)
        except OSError as exc:
            raise CheckpointError(f"cannot write checkpoint {self.path}: {exc.strerror or exc}") from None
        try:
            save_artifact(model, staging / MODEL)
            state = dict(state)
            if optimizer is not None:
                tensors, plain = optimizer_to_files(optimizer.state_dict())
                save_file(tensors, str(staging / OPTIMIZER))
                state["optimizer"] = plain
            rng_tensors, rng_plain = rng_state()
            save_file(rng_tensors, str(staging / RNG))
            state["rng"] = rng_plain
            if best:
                save_file({k: v.detach().to("cpu").contiguous() for k, v in best.items()}, str(staging / BEST))
            if extra:
                save_file({k: v.detach().to("cpu").contiguous() for k, v in extra.items()}, str(staging / EXTRA))
            (staging / STATE).write_text(json.dumps(state, indent=1) + "\n", encoding="utf-8")
            replace_directory(staging, self.path)
        except OSError as exc:
            shutil.rmtree(staging, ignore_errors=True)
            raise CheckpointError(f"cannot write checkpoint {self.path}: {exc.strerror or exc}") from None
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise

    def read_state(self) -> dict[str, Any]:
        try:
            return json.loads((self.path / STATE).read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as exc:
            raise CheckpointError(f"checkpoint {self.path / STATE} is unreadable: {exc}") from None

    def _tensors(self, name: str) -> dict[str, torch.Tensor]:
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        path = self.path / name
        if not path.is_file():
            return {}
        try:
            return load_file(str(path))
        except (SafetensorError, OSError) as exc:
            raise CheckpointError(f"cannot read {path}: {exc}") from None

    def load_model(self) -> Any:
        from peftc.compiler import load

        return load(self.path / MODEL)

    def optimizer_state(self, state: Mapping[str, Any]) -> dict[str, Any] | None:
        if "optimizer" not in state:
            return None
        return optimizer_from_files(self._tensors(OPTIMIZER), state["optimizer"])

    def restore_rng(self, state: Mapping[str, Any]) -> None:
        set_rng_state(self._tensors(RNG), state["rng"])

    def best(self) -> dict[str, torch.Tensor]:
        return self._tensors(BEST)

    def extra(self) -> dict[str, torch.Tensor]:
        return self._tensors(EXTRA)

    def remove(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)
