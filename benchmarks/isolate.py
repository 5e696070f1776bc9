"""Run measurements in their own processes, and read a process's peak memory.

Memory numbers are only meaningful when nothing else has allocated in the same process: the CPU high-water
mark (VmHWM) never goes down, and the CUDA caching allocator keeps what earlier models freed. So every
measurement runs in a fresh child process: :func:`run_isolated` for one call, :class:`Worker` for an object
that lives in its own process and answers calls, so that several of them can be timed step by step in turn.
On Linux children are *forked* from a parent that has imported torch but run no tensor op and never touched
CUDA, so a child costs milliseconds instead of a second-long ``import torch``; elsewhere they are spawned.

CPU peak memory is the resident-set high-water mark. On Linux it is reset just before the measured region
(``/proc/self/clear_refs`` ← ``5``) and read from ``VmHWM``, so it covers only training, not model construction;
where that is impossible it falls back to ``resource.getrusage`` (``ru_maxrss``), the high-water mark since the
process started, and says so in ``method``. On a GPU it is ``torch.cuda.max_memory_allocated``.
"""

from __future__ import annotations

import multiprocessing as mp
import sys
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

__all__ = ["IsolatedError", "Peak", "Worker", "run_isolated"]

_STATUS = Path("/proc/self/status")
_CLEAR_REFS = Path("/proc/self/clear_refs")


class IsolatedError(RuntimeError):
    """The child process failed; ``str()`` holds its traceback's last line, ``details`` the whole of it."""

    def __init__(self, message: str, details: str = ""):
        super().__init__(message)
        self.details = details


def _status_kib(field: str) -> int | None:
    try:
        for line in _STATUS.read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return None


def rss_bytes() -> int | None:
    """The current resident set size, where the OS tells it (Linux)."""
    kib = _status_kib("VmRSS")
    return None if kib is None else kib * 1024


class Peak:
    """Peak memory of this process over a region: ``reset()`` at its start, ``bytes()`` at its end."""

    def __init__(self, device: str = "cpu"):
        self.device = device
        self.method = "cuda.max_memory_allocated" if device.startswith("cuda") else "VmHWM"

    def reset(self) -> None:
        if self.device.startswith("cuda"):
            import torch

            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            return
        try:
            _CLEAR_REFS.write_text("5")  # Linux >= 4.0: VmHWM := VmRSS
        except OSError:
            self.method = "ru_maxrss"  # cannot reset: peak since the process started

    def bytes(self) -> int:
        if self.device.startswith("cuda"):
            import torch

            torch.cuda.synchronize()
            return int(torch.cuda.max_memory_allocated())
        if self.method == "VmHWM":
            kib = _status_kib("VmHWM")
            if kib is not None:
                return kib * 1024
            self.method = "ru_maxrss"
        import resource

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return int(peak if sys.platform == "darwin" else peak * 1024)  # bytes on macOS, KiB on Linux


def _child(conn: Any, fn: Callable[..., Any], args: tuple[Any, ...]) -> None:
    try:
        conn.send(("ok", fn(*args)))
    except BaseException as exc:  # report everything to the parent, which decides what it means
        conn.send(("error", f"{type(exc).__name__}: {exc}", traceback.format_exc()))
    finally:
        conn.close()


def _context() -> Any:
    method = "fork" if "fork" in mp.get_all_start_methods() and sys.platform.startswith("linux") else "spawn"
    return mp.get_context(method)


def run_isolated(fn: Callable[..., Any], *args: Any, timeout: float | None = None) -> Any:
    """``fn(*args)`` in a fresh child process; returns its (picklable) result or raises :class:`IsolatedError`.

    ``fn`` must be a module-level function. The parent must not have initialised CUDA (the child may).
    """
    ctx = _context()
    parent, child = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_child, args=(child, fn, args), daemon=True)
    proc.start()
    child.close()
    try:
        if not parent.poll(timeout):
            proc.kill()
            raise IsolatedError(f"timed out after {timeout:.0f} s")
        message = parent.recv()
    except EOFError:
        proc.join(5)
        message = ("error", f"child process died (exit code {proc.exitcode})", "")
    finally:
        proc.join(5)
        if proc.is_alive():
            proc.kill()
        parent.close()
    if message[0] == "ok":
        return message[1]
    raise IsolatedError(message[1], message[2])


def _serve(conn: Any, factory: Callable[..., Any], args: tuple[Any, ...]) -> None:
    try:
        obj = factory(*args)
        conn.send(("ok", getattr(obj, "ready", None)))
        while True:
            name, call_args = conn.recv()
            if name == "stop":
                conn.send(("ok", None))
                return
            conn.send(("ok", getattr(obj, name)(*call_args)))
    except BaseException as exc:  # report everything to the parent, which decides what it means
        conn.send(("error", f"{type(exc).__name__}: {exc}", traceback.format_exc()))
    finally:
        conn.close()


class Worker:
    """``factory(*args)`` built in its own child process; ``call(name, *args)`` runs that method there.

    The object's ``ready`` attribute (if any) comes back as :attr:`ready` once it is built. Calls are
    synchronous, so several workers can be driven in turn (one timed step each, round-robin) while each keeps its
    own memory. A failure in the child raises :class:`IsolatedError` and ends the worker.
    """

    def __init__(self, factory: Callable[..., Any], *args: Any, timeout: float | None = None):
        ctx = _context()
        self._conn, child = ctx.Pipe(duplex=True)
        self._proc = ctx.Process(target=_serve, args=(child, factory, args), daemon=True)
        self._proc.start()
        child.close()
        self.ready = self._reply(timeout)

    def _reply(self, timeout: float | None) -> Any:
        try:
            if not self._conn.poll(timeout):
                self.close()
                raise IsolatedError(f"timed out after {timeout:.0f} s")
            message = self._conn.recv()
        except (EOFError, OSError):
            self._proc.join(5)
            message = ("error", f"worker process died (exit code {self._proc.exitcode})", "")
        if message[0] == "ok":
            return message[1]
        self.close()
        raise IsolatedError(message[1], message[2])

    def call(self, name: str, *args: Any, timeout: float | None = None) -> Any:
        self._conn.send((name, args))
        return self._reply(timeout)

    def close(self) -> None:
        """Stop the child (politely, then by force) and release the pipe."""
        if self._proc.is_alive():
            try:
                self._conn.send(("stop", ()))
                self._conn.poll(5)
            except (OSError, EOFError, BrokenPipeError):
                pass
            self._proc.join(5)
            if self._proc.is_alive():
                self._proc.kill()
                self._proc.join()
        self._conn.close()

    def __enter__(self) -> Worker:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
