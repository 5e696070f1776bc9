"""``peftc split``: turn a data set into the continual-learning sequences papers report (a ``tasks.yaml``).

* **class-incremental**: an ImageFolder (or a folder with ``train/`` and ``val/``) → T tasks over disjoint class
  groups, in a fixed class order: ``seed:S`` is PyCIL's convention (``utils/data_manager.py``:
  ``np.random.seed(S); order = np.random.permutation(n_classes)`` over the class indices, i.e. the sorted folder
  names; PyCIL's default seed is 1993), or a file naming the classes in order. ``init_classes`` B gives the
  "B + steps" form: a first task of B classes, the rest split evenly over the other T − 1 tasks.
* **domain-incremental**: a folder of domains, each a data folder with the same classes → one task per domain,
  every task with all classes in the same label order.

The class order, the seed and the increments are stored in the file (``split:``), so a sequence says how it was
made; task folders are written relative to the file, so the pair moves together.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import yaml

from peftc.storage.atomic import write_file
from peftc.train.data import DataError, discover

__all__ = ["PYCIL_SEED", "SplitError", "class_order", "increments", "split_classes", "split_domains", "write_split"]

PYCIL_SEED = 1993


class SplitError(DataError):
    """The data cannot be split as asked (too many tasks, an order that is not a permutation, …)."""


def _classes_of(root: Path) -> list[str]:
    """The data set's classes, sorted (label i = the i-th name, as torchvision's ImageFolder and PyCIL read them)."""
    return list(discover(root, val_fraction=0.5).classes)  # checks the folder: classes, images, splits


def class_order(classes: list[str], order: str | None) -> tuple[list[str], int | None]:
    """(classes in training order, the seed or None); ``order`` is ``seed:S``, a file of names, or None (1993)."""
    spec = order or f"seed:{PYCIL_SEED}"
    if spec.startswith("seed:"):
        import numpy as np

        try:
            seed = int(spec[5:])
        except ValueError:
            raise SplitError(f"--order {spec}: the seed must be an integer (e.g. seed:{PYCIL_SEED})") from None
        np.random.seed(seed)  # PyCIL's convention, global state included, so the orders match PyCIL's
        return [classes[i] for i in np.random.permutation(len(classes)).tolist()], seed
    path = Path(spec)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise SplitError(f"--order {spec}: cannot read the class-order file ({exc.strerror or exc}); give seed:S "
                         "or a file with one class name per line") from None
    names = [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    missing = [c for c in classes if c not in names]
    unknown = [n for n in names if n not in classes]
    repeated = sorted({n for n in names if names.count(n) > 1})
    if missing or unknown or repeated:
        parts = [f"{label}: {', '.join(items[:5])}{' …' if len(items) > 5 else ''}"
                 for label, items in (("missing", missing), ("not a class", unknown), ("repeated", repeated)) if items]
        raise SplitError(f"{path}: the class order must name every class exactly once ({'; '.join(parts)})")
    return names, None


def increments(n_classes: int, tasks: int, init_classes: int | None = None) -> list[int]:
    """Classes per task: ``n/T`` each, or ``B`` then ``(n − B)/(T − 1)`` each; uneven splits are refused."""
    if tasks < 1:
        raise SplitError(f"--tasks must be at least 1, got {tasks}")
    if init_classes is None:
        if tasks > n_classes or n_classes % tasks:
            raise SplitError(f"{n_classes} classes do not split into {tasks} tasks of equal size "
                             f"(choose one of: {', '.join(str(d) for d in _divisors(n_classes))})")
        return [n_classes // tasks] * tasks
    if not 1 <= init_classes <= n_classes:
        raise SplitError(f"--init-classes must be between 1 and {n_classes} (the classes there are), got "
                         f"{init_classes}")
    rest = n_classes - init_classes
    if tasks == 1 or rest == 0:
        if tasks != 1 or rest:
            raise SplitError(f"--init-classes {init_classes} of {n_classes} classes leaves {rest} for {tasks - 1} "
                             "more tasks")
        return [init_classes]
    if rest % (tasks - 1) or rest < tasks - 1:
        raise SplitError(f"after --init-classes {init_classes}, {rest} classes do not split into {tasks - 1} equal "
                         "steps (--tasks counts the first task too: B50 + 5 steps of 10 on 100 classes is "
                         "--init-classes 50 --tasks 6)")
    return [init_classes] + [rest // (tasks - 1)] * (tasks - 1)


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def _names(count: int) -> list[str]:
    width = len(str(count))
    return [f"task{i + 1:0{width}d}" for i in range(count)]


def _relative(target: Path, out: Path) -> str:
    return Path(os.path.relpath(target.resolve(), out.resolve().parent)).as_posix()


def split_classes(data: str | Path, tasks: int, out: str | Path, order: str | None = None,
                  init_classes: int | None = None) -> dict[str, Any]:
    """The class-incremental sequence of ``data`` as a ``tasks.yaml`` document (see the module docstring)."""
    root = Path(data)
    classes = _classes_of(root)
    ordered, seed = class_order(classes, order)
    sizes = increments(len(ordered), tasks, init_classes)
    rows, start = [], 0
    for name, size in zip(_names(len(sizes)), sizes):
        rows.append({"name": name, "data": ".", "classes": ordered[start: start + size]})
        start += size
    meta = {"kind": "class-incremental", "source": str(root.resolve()), "classes": len(ordered), "order": ordered,
            "seed": seed, "order_convention": "PyCIL: np.random.seed(seed); np.random.permutation(n)"
            if seed is not None else "file", "init_classes": init_classes, "increments": sizes}
    return {"root": _relative(root, Path(out)), "split": meta, "tasks": rows}


def split_domains(data: str | Path, out: str | Path, tasks: int | None = None, order: str | None = None
                  ) -> dict[str, Any]:
    """The domain-incremental sequence of a folder of domains: one task per domain, all with the same classes."""
    root = Path(data)
    if not root.is_dir():
        raise SplitError(f"data folder not found: {root}")
    domains = sorted(e.name for e in root.iterdir() if e.is_dir() and not e.name.startswith("."))
    if len(domains) < 2:
        raise SplitError(f"{root}: a domain-incremental split needs at least 2 domain folders, found {domains}")
    if tasks is not None and tasks != len(domains):
        raise SplitError(f"{root} has {len(domains)} domains ({', '.join(domains)}); a domain-incremental split "
                         f"has one task per domain, so --tasks must be {len(domains)}")
    classes = _domain_classes(root, domains[0])
    for domain in domains[1:]:
        other = _domain_classes(root, domain)
        if other != classes:
            raise SplitError(f"domains differ in classes: {root / domains[0]} has {', '.join(classes)}; "
                             f"{root / domain} has {', '.join(other)}")
    ordered, seed = class_order(domains, order) if order else (domains, None)
    meta = {"kind": "domain-incremental", "source": str(root.resolve()), "classes": len(classes),
            "order": ordered, "seed": seed, "increments": None, "init_classes": None}
    rows = [{"name": d, "data": d, "classes": classes} for d in ordered]
    return {"root": _relative(root, Path(out)), "split": meta, "tasks": rows}


def _domain_classes(root: Path, domain: str) -> list[str]:
    try:
        return _classes_of(root / domain)
    except DataError as exc:
        raise SplitError(f"{exc} (--domains reads DATA/<domain>/<class>/<images>, or DATA/<domain>/train/…; "
                         "for one folder of classes drop --domains)") from None


def write_split(document: dict[str, Any], out: str | Path) -> Path:
    """Write the sequence atomically (and check it reads back as a valid ``tasks.yaml``)."""
    from peftc.train.data import read_sequence

    out = Path(out)
    text = "# written by peftc split; train it with: peftc train ART --sequence " + out.name + "\n"
    text += yaml.safe_dump(document, sort_keys=False, default_flow_style=None, width=120)
    path = write_file(out, text)
    read_sequence(path)
    return path
