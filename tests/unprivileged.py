"""Run the ``peftc`` command without the power to ignore file permissions, even when the tests run as root (CI).

Root normally writes into a read-only folder (CAP_DAC_OVERRIDE), which would make a permission test pass
without testing anything. The child drops that capability (and CAP_FOWNER) from its bounding set before it
starts, so it stays uid 0 — and can still read the interpreter — but obeys mode bits; where dropping needs a
privilege the machine does not grant, it becomes ``nobody`` instead. A child that cannot lose the privilege
fails the test rather than skipping it.
"""

from __future__ import annotations

import ctypes
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
_PR_CAPBSET_DROP = 24
_CAPS = (1, 3)  # CAP_DAC_OVERRIDE, CAP_FOWNER


def _lose_privilege() -> None:  # runs in the child, between fork and exec
    if os.geteuid() != 0:
        return
    libc = ctypes.CDLL(None, use_errno=True)
    if all(libc.prctl(_PR_CAPBSET_DROP, cap, 0, 0, 0) == 0 for cap in _CAPS):
        return
    os.setgroups([])
    os.setgid(65534)
    os.setuid(65534)


def run_peftc(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    """``python -m peftc ARGS`` in a child that obeys file permissions."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    return subprocess.run([sys.executable, "-m", "peftc", *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=300, preexec_fn=_lose_privilege)
