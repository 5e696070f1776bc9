"""Task data from folders: an ImageFolder (one sub-folder per class) or a folder holding ``train/`` and ``val/``.

Everything a user can get wrong is found before training starts and reported as a :class:`DataError` naming
the folder or file: a missing path, a class folder that is not there, a split without images, an image that
cannot be read (a broken link, a permission error). A file that *can* be read but does not decode as an image
(a corrupt or truncated PNG) is a different thing: real data sets contain a few, so such samples are skipped
and counted — the loader yields them as :class:`Corrupt` markers that :func:`collate` drops — and the trainer
reports the count instead of crashing half-way through an epoch.

Class order is the order of ``classes`` when given, else the sorted folder names; label ``i`` is ``classes[i]``
in both splits, and the trainer stores the list with the task so evaluation uses the same mapping.
"""

from __future__ import annotations

import io
import os
import random
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from peftc.errors import PeftcError, TaskError, did_you_mean, render_path
from peftc.images import to_rgb
from peftc.language.reader import read_yaml_file

__all__ = ["IMAGE_EXTENSIONS", "Corrupt", "DataError", "ImageDataset", "SequenceError", "SequenceTask", "Split",
           "TaskData", "TaskSequence", "check_readable", "collate", "discover", "ensure_task_name", "read_sequence"]

IMAGE_EXTENSIONS = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm"})
_VAL_NAMES = ("val", "valid", "validation")


class DataError(PeftcError):
    """A data folder is missing, malformed or holds an image that cannot be read."""


@dataclass(frozen=True)
class Split:
    """One split: ``(image path, label)`` pairs and the folder they came from."""

    root: Path
    samples: tuple[tuple[Path, int], ...]

    def __len__(self) -> int:
        return len(self.samples)

    def counts(self, classes: int) -> list[int]:
        out = [0] * classes
        for _, label in self.samples:
            out[label] += 1
        return out


@dataclass(frozen=True)
class TaskData:
    """A task's classes and its two splits. ``layout`` is ``split`` (train/ + val/) or ``folder`` (held out)."""

    root: Path
    classes: tuple[str, ...]
    train: Split
    val: Split
    layout: str
    notes: tuple[str, ...] = field(default=())


def _images_under(folder: Path) -> list[Path]:
    """Image files below ``folder`` (recursively, sorted, hidden entries skipped); unreadable entries raise.

    Linked folders are followed, each real folder once, so a link loop cannot count its images again.
    """
    found: list[Path] = []
    seen: set[tuple[int, int]] = set()
    for dirpath, dirnames, filenames in os.walk(folder, onerror=_walk_error, followlinks=True):
        here = os.stat(dirpath)
        if (here.st_dev, here.st_ino) in seen:
            dirnames[:] = []
            continue
        seen.add((here.st_dev, here.st_ino))
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in sorted(filenames):
            path = Path(dirpath) / name
            if name.startswith(".") or path.suffix.lower() not in IMAGE_EXTENSIONS:
                continue
            if not path.is_file():  # a broken link, a socket, ...
                raise DataError(f"cannot read image {path}: not a regular file (a broken link?)")
            if not os.access(path, os.R_OK):
                raise DataError(f"cannot read image {path}: permission denied")
            found.append(path)
    return found


def _walk_error(exc: OSError) -> None:
    raise DataError(f"cannot read folder {exc.filename}: {exc.strerror or exc}")


def _class_folders(root: Path) -> list[str]:
    try:
        return sorted(e.name for e in root.iterdir() if e.is_dir() and not e.name.startswith("."))
    except OSError as exc:
        raise DataError(f"cannot read folder {root}: {exc.strerror or exc}") from None


def _scan(root: Path, classes: Sequence[str], what: str) -> Split:
    samples: list[tuple[Path, int]] = []
    present = _class_folders(root)
    if not present:
        raise DataError(f"{what} split {root} is empty: expected one folder of images per class")
    for label, name in enumerate(classes):
        folder = root / name
        if not folder.is_dir():
            raise DataError(f"missing class folder {folder}" + did_you_mean(name, present)
                            + f"; {root} has: {', '.join(present)}")
        images = _images_under(folder)
        if not images:
            raise DataError(f"no images in {folder} (the {what} split of class {name!r} is empty)")
        samples += [(path, label) for path in images]
    return Split(root, tuple(samples))


def _held_out(split: Split, classes: int, fraction: float, seed: int) -> tuple[Split, Split]:
    """Split one folder into train and val: a fixed, per-class share chosen by a seeded shuffle of the names."""
    train: list[tuple[Path, int]] = []
    val: list[tuple[Path, int]] = []
    for label in range(classes):
        items = [s for s in split.samples if s[1] == label]
        order = sorted(items, key=lambda s: str(s[0]))
        random.Random(seed * 1_000_003 + zlib.crc32(str(label).encode())).shuffle(order)
        n_val = max(1, round(len(order) * fraction)) if len(order) > 1 else 0
        val += order[:n_val]
        train += order[n_val:]
    return Split(split.root, tuple(train)), Split(split.root, tuple(val))


def discover(path: str | Path, classes: Sequence[str] | None = None, *, val_fraction: float = 0.2,
             seed: int = 0) -> TaskData:
    """Find a task's data under ``path`` (see the module docstring); ``classes`` picks and orders the classes."""
    root = Path(path)
    if not root.exists():
        raise DataError(f"data folder not found: {root}")
    if not root.is_dir():
        raise DataError(f"data path {root} is not a folder")
    train_root = root / "train"
    if train_root.is_dir():
        val_root = next((root / n for n in _VAL_NAMES if (root / n).is_dir()), None)
        if val_root is None:
            raise DataError(f"{root} has train/ but no val/ folder (add val/, or point --data at a folder of "
                            "class folders to hold out a validation share)")
        names = list(classes) if classes else _class_folders(train_root)
        _check_names(names, train_root)
        train = _scan(train_root, names, "train")
        val = _scan(val_root, names, "val")
        extra = sorted(set(_class_folders(val_root)) - set(names)) if not classes else []
        if extra:
            raise DataError(f"{val_root / extra[0]} is not a class of {train_root} (train classes: "
                            f"{', '.join(names)})")
        return TaskData(root, tuple(names), train, val, "split")
    if not 0.0 < val_fraction < 1.0:
        raise DataError(f"the validation share must be between 0 and 1, got {val_fraction}")
    names = list(classes) if classes else _class_folders(root)
    _check_names(names, root)
    whole = _scan(root, names, "data")
    train, val = _held_out(whole, len(names), val_fraction, seed)
    if not val.samples:
        raise DataError(f"{root}: too few images to hold out a validation share (add a val/ split)")
    note = f"no train/ and val/ in {root}: holding out {val_fraction:.0%} of each class for validation"
    return TaskData(root, tuple(names), train, val, "folder", (note,))


def _check_names(names: Sequence[str], root: Path) -> None:
    for name in names:
        if not name or name in (".", "..") or "/" in name or "\\" in name or name.startswith("."):
            raise DataError(f"class {name!r} is not a folder name inside {root} (no '/', '..' or leading '.')")
    if not names:
        raise DataError(f"{root} is empty: expected one folder of images per class")
    if len(set(names)) != len(names):
        raise DataError(f"class names repeat in {list(names)}")
    if len(names) < 2:
        raise DataError(f"{root}: a classification task needs at least 2 classes, found {list(names)}")


@dataclass(frozen=True)
class Corrupt:
    """A sample whose file was read but did not decode; :func:`collate` drops it and reports its path."""

    path: Path
    reason: str


def load_rgb(path: Path) -> Any:
    """Decode ``path`` as an RGB PIL image; unreadable → :class:`DataError`, undecodable → ``ValueError``."""
    from PIL import Image

    try:
        data = path.read_bytes()
    except OSError as exc:
        raise DataError(f"cannot read image {path}: {exc.strerror or exc}") from None
    try:
        with Image.open(io.BytesIO(data)) as image:
            return to_rgb(image)
    except Exception as exc:  # PIL raises many types for damaged files (OSError, SyntaxError, ValueError, ...)
        raise ValueError(f"{type(exc).__name__}: {exc}") from None


def check_readable(data: TaskData, corrupt: set[Path]) -> None:
    """Refuse a task with a class none of whose images (in either split) decode: it would train or score blind."""
    for split, what in ((data.train, "training"), (data.val, "validation")):
        for label, name in enumerate(data.classes):
            paths = [p for p, lab in split.samples if lab == label]
            if paths and all(p in corrupt for p in paths):
                raise DataError(f"every {what} image of class {name!r} in {split.root} is corrupt "
                                f"({len(paths)} files, e.g. {paths[0]}); fix or remove them")


class ImageDataset(torch.utils.data.Dataset):
    """A split as ``(image tensor, label)`` pairs through ``transform``; corrupt files come back as Corrupt."""

    def __init__(self, split: Split, transform: Callable[[Any], torch.Tensor]):
        self.split = split
        self.transform = transform

    def __len__(self) -> int:
        return len(self.split.samples)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int] | Corrupt:
        path, label = self.split.samples[index]
        try:
            image = load_rgb(path)
        except ValueError as exc:
            return Corrupt(path, str(exc))
        return self.transform(image), label


def collate(batch: list[Any]) -> tuple[torch.Tensor, torch.Tensor, list[Path]]:
    """Stack the good samples; return the paths of the corrupt ones beside them."""
    good = [b for b in batch if not isinstance(b, Corrupt)]
    bad = [b.path for b in batch if isinstance(b, Corrupt)]
    if not good:
        return torch.empty(0), torch.empty(0, dtype=torch.long), bad
    images = torch.stack([g[0] for g in good])
    labels = torch.tensor([g[1] for g in good], dtype=torch.long)
    return images, labels, bad


# -- task names and sequence files (``tasks.yaml``) -----------------------------------------------------------


def ensure_task_name(name: str) -> str:
    """``name`` if it can name a task (and a folder in an artifact): non-empty, no ``/``, no leading dot."""
    if not name or "/" in name or name.startswith("."):
        raise TaskError(f"task names are non-empty, without '/', and do not start with '.', got {name!r}")
    return name


class SequenceError(PeftcError):
    """The sequence file is missing or malformed."""


class SequenceTask(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str
    data: Path
    classes: list[str] | None = None
    epochs: int | None = Field(default=None, ge=1)


class TaskSequence(BaseModel):
    """A ``tasks.yaml``: tasks in training order, their folders relative to the file (and ``root``)."""

    model_config = ConfigDict(extra="forbid")

    root: Path = Path(".")
    epochs: int | None = Field(default=None, ge=1)
    tasks: list[SequenceTask] = Field(min_length=1)
    split: dict[str, Any] | None = None  # how `peftc split` made it: kind, class order, seed (peftc.train.split)


def read_sequence(path: str | Path, schema: type[TaskSequence] = TaskSequence) -> TaskSequence:
    """Parse and check a sequence file (or a subclass's, e.g. a stream file); task folders become absolute
    (relative to the file and ``root``)."""
    path = Path(path)
    doc = read_yaml_file(path, SequenceError, "sequence file")
    raw = doc.data
    was_list = isinstance(raw, list)  # a bare list of tasks is accepted too
    if was_list:
        raw = {"tasks": raw}
    if not isinstance(raw, dict):
        raise SequenceError(f"{path}: expected a mapping with 'tasks:' (a list of {{name, data}})")
    try:
        seq = schema.model_validate(raw)
    except ValidationError as exc:
        errors = []
        for err in exc.errors()[:3]:
            loc = tuple(err["loc"])[1 if was_list else 0:]
            at = next((doc.positions[loc[:k]] for k in range(len(loc), -1, -1) if loc[:k] in doc.positions), None)
            line = f":{at.line}" if at is not None and at.line else ""
            key = render_path(err["loc"])
            errors.append(f"{path}{line}: {key}: {err['msg']}")
        raise SequenceError("\n".join(errors)) from None
    base = (path.parent / seq.root).resolve()
    names = [t.name for t in seq.tasks]
    for t in seq.tasks:
        ensure_task_name(t.name)
        if names.count(t.name) > 1:
            raise SequenceError(f"{path}: task {t.name!r} appears more than once")
        t.data = t.data if t.data.is_absolute() else base / t.data
    return seq
