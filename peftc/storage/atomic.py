"""Atomic writes: every file and directory peftc writes appears whole or not at all, and never vanishes.

A writer builds its output in a hidden sibling (``.NAME.partial-PID-XXXXXXXX``) and swaps it in:

- a **directory** (artifact, checkpoint, ToCom plugin, Triton model) replaces an existing one with one
  ``renameat2(RENAME_EXCHANGE)`` on Linux, so the path always holds the old or the new directory, even across a
  kill -9 or a power loss. Where the exchange is not available, the old directory is renamed aside
  (``.NAME.old-PID-…``) and the new one renamed in, with SIGINT/SIGTERM held back between the two renames; a
  kill -9 in that gap is repaired by :func:`recover` the next time the path is opened.
- a **file** (``peftc diff -o``, ``tasks.yaml``, journals) is written, flushed to disk and ``os.replace``-d, or
  hard-linked into place when it must not overwrite anything.

A Ctrl-C that arrives once the new output is in place is re-raised as :class:`InterruptedAfterWrite`, so the
command can say truthfully that the write happened. Staging left behind by a killed process is swept the next
time anything is written beside it.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import shutil
import signal
import sys
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path

__all__ = ["InterruptedAfterWrite", "recover", "replace_directory", "staging_dir", "sweep", "write_file"]

_ACTIVE: set[str] = set()  # staging paths this process is still using


class InterruptedAfterWrite(KeyboardInterrupt):
    """Ctrl-C arrived after the new output was in place: the write happened."""


def _stage_name(target: Path, kind: str) -> Path:
    return target.parent / f".{target.name}.{kind}-{os.getpid()}-{uuid.uuid4().hex[:8]}"


def staging_dir(target: Path) -> Path:
    """A fresh, empty staging directory beside ``target`` (after sweeping stale ones); OSError if it cannot be."""
    target.parent.mkdir(parents=True, exist_ok=True)
    sweep(target)
    staging = _stage_name(target, "partial")
    staging.mkdir()
    _ACTIVE.add(str(staging))
    return staging


def _owner_gone(entry: Path) -> bool:
    """True when the process that made this staging entry no longer uses it."""
    if str(entry) in _ACTIVE:
        return False
    pid = entry.name.rsplit("-", 2)[-2] if entry.name.count("-") >= 2 else ""
    if not pid.isdigit() or int(pid) == os.getpid():
        return True
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except OSError:
        return False  # alive, another user's
    return False


def _stale(target: Path, kind: str) -> list[Path]:
    prefix = f".{target.name}.{kind}-"
    try:
        return sorted((e for e in target.parent.iterdir() if e.name.startswith(prefix) and _owner_gone(e)),
                      key=lambda e: e.stat().st_mtime)
    except OSError:
        return []


def recover(target: Path) -> None:
    """If ``target`` is missing but a killed swap left its old version aside, put that back."""
    if target.exists() or target.is_symlink():
        return
    aside = _stale(target, "old")
    if aside:
        with contextlib.suppress(OSError):
            aside[-1].rename(target)


def sweep(target: Path) -> None:
    """Recover ``target`` if a swap was killed, then remove staging that killed writers left beside it."""
    recover(target)
    for entry in _stale(target, "partial") + _stale(target, "old"):
        _remove(entry)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(OSError):
            path.unlink()


@contextlib.contextmanager
def _held_signals() -> Iterator[None]:
    """Hold SIGINT and SIGTERM back while a swap must not stop half-way; one that came is re-raised afterwards.

    (Python runs signal handlers in the main thread only, so elsewhere there is nothing to hold.)
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    pending: list[int] = []
    previous = {sig: signal.signal(sig, lambda signum, _frame: pending.append(signum))
                for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler if handler is not None else signal.SIG_DFL)
        if pending:
            signal.raise_signal(pending[0])


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths in one step (Linux ``renameat2(RENAME_EXCHANGE)``); False where that is not available."""
    if not sys.platform.startswith("linux"):
        return False
    libc = ctypes.CDLL(None, use_errno=True)
    fn = getattr(libc, "renameat2", None)
    if fn is None:
        return False
    at_fdcwd, rename_exchange = -100, 2
    if fn(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP, errno.EPERM):
        return False
    raise OSError(code, os.strerror(code), str(b))


def _swap(staging: Path, target: Path) -> Path | None:
    """Put ``staging`` at ``target``; returns where the previous ``target`` now is (to delete), if there was one."""
    if not (target.exists() or target.is_symlink()):
        staging.rename(target)
        return None
    if _exchange(staging, target):
        return staging
    old = _stage_name(target, "old")
    _ACTIVE.add(str(old))
    target.rename(old)
    try:
        staging.rename(target)
    except BaseException:
        old.rename(target)
        raise
    return old


def replace_directory(staging: Path, target: Path) -> None:
    """Make the finished directory ``staging`` the one at ``target``; a reader sees the old or the new one whole."""
    if target.exists() and not target.is_dir():
        raise NotADirectoryError(errno.ENOTDIR, f"{target} exists and is not a directory", str(target))
    _ACTIVE.discard(str(staging))
    swapped = False
    try:
        with _held_signals():
            old = _swap(staging, target)
            swapped = True
    except KeyboardInterrupt:
        if not swapped:
            raise
        raise InterruptedAfterWrite(f"{target} was written before the interrupt") from None  # held until now
    _finish(target, old)


def _finish(target: Path, old: Path | None) -> None:
    try:
        _fsync_dir(target.parent)
        if old is not None:
            _remove(old)
    except KeyboardInterrupt:
        raise InterruptedAfterWrite(f"{target} was written before the interrupt") from None
    finally:
        _ACTIVE.difference_update({str(old)} if old else set())


def write_file(path: str | Path, data: str | bytes, *, overwrite: bool = True) -> Path:
    """Write ``data`` to ``path`` whole or not at all; with ``overwrite=False`` an existing file is an error
    (FileExistsError) and is left untouched."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    sweep(path)
    tmp = _stage_name(path, "partial")
    _ACTIVE.add(str(tmp))
    try:
        with tmp.open("wb") as handle:
            handle.write(data.encode("utf-8") if isinstance(data, str) else data)
            handle.flush()
            os.fsync(handle.fileno())
        with _held_signals():
            if overwrite:
                os.replace(tmp, path)
            else:
                os.link(tmp, path)  # fails if path exists: nothing is overwritten
    finally:
        _ACTIVE.discard(str(tmp))
        _remove(tmp)
    _fsync_dir(path.parent)
    return path


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
