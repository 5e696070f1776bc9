"""Run the ``peftc`` command without the power to ignore file permissions, even when the tests run as root (CI).

Root normally writes into a read-only folder (CAP_DAC_OVERRIDE), which would make a permission test pass
without testing anything. A small launcher drops that capability (and CAP_FOWNER) from its bounding set and
re-executes itself as ``python -m peftc``, so the command stays uid 0 — and can still read the interpreter — but
obeys mode bits; where dropping needs a privilege the machine does not grant, it becomes ``nobody`` instead. A
command that cannot lose the privilege fails the test rather than skipping it.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

_LAUNCHER = """
import ctypes, os, sys
if os.geteuid() == 0:
    libc = ctypes.CDLL(None, use_errno=True)
    if not all(libc.prctl(24, cap, 0, 0, 0) == 0 for cap in (1, 3)):  # PR_CAPBSET_DROP DAC_OVERRIDE, FOWNER
        os.setgroups([]); os.setgid(65534); os.setuid(65534)
os.execv(sys.executable, [sys.executable, "-m", "peftc", *sys.argv[1:]])
"""


def run_peftc(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    """``python -m peftc ARGS`` in a process that obeys file permissions."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    return subprocess.run([sys.executable, "-c", _LAUNCHER, *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=300)
