"""The benchmark suites ``python -m benchmarks`` knows: which script runs each, with which arguments, and which
result file it writes.

Each suite is an ordinary script (``python -m benchmarks.<module>``) that prints its tables and writes
``benchmarks/results/<result>.json``; the runner only decides the arguments. Whether a script accepts
``--quick`` (or another flag) is read from its source text, so the runner never imports a suite (importing
torch costs seconds) and keeps working while a suite's owner is still adding flags.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent

__all__ = ["SUITES", "Suite", "quick_args"]


@dataclass(frozen=True)
class Suite:
    name: str
    module: str  # benchmarks.<module>
    result: str  # benchmarks/results/<result>.json
    title: str
    quick_extra: tuple[str, ...] = ()  # added to --quick when the script accepts each flag
    quick_fallback: tuple[str, ...] | None = None  # reduced arguments for a script without --quick

    @property
    def path(self) -> Path:
        return ROOT / f"{self.module}.py"

    def exists(self) -> bool:
        return self.path.is_file()

    def source(self) -> str:
        return self.path.read_text(encoding="utf-8") if self.exists() else ""


SUITES: dict[str, Suite] = {s.name: s for s in (
    Suite("compile", "compile_time", "compile_time", "Compile time: trace + passes per spec × backbone"),
    Suite("train-step", "train_step", "train_step", "Training step: time and peak memory vs full fine-tuning "
          "and the peers"),
    Suite("deploy", "deploy", "deploy", "Deployment: plain vs rewritten, folded/unfolded, eager/compile/ORT"),
    Suite("tokens", "tome", "tome", "Token merging (ToMe): throughput vs r", quick_extra=("--eager-only",)),
    Suite("replacement", "replacement", "replacement", "Replacement Learning: parameters, memory and time vs "
          "end-to-end", quick_fallback=("--rounds", "1", "--steps", "2", "--warmup", "1", "--only", "resnet50")),
    Suite("storage", "storage", "storage", "Storage: bytes per task on disk vs HF PEFT's adapter"),
    Suite("online", "online", "online", "Online class-incremental learning: the generative classifier vs ER-softmax, "
          "ER-ACE and TaER"),
    Suite("trainer", "trainer", "trainer", "Trainer: peftc train vs a hand-written loop, and the loader alone"),
    Suite("memvp", "memvp", "memvp", "MemVP: visual tokens as FFN memory vs prompt concatenation vs text only"),
    Suite("coverage", "coverage", "coverage", "Coverage: every built-in spec on every backbone family "
          "(docs/backbones.md)"),
)}


def quick_args(suite: Suite, source: str | None = None) -> tuple[str, ...] | None:
    """Arguments for a quick run, or None when the script offers no quick mode and no fallback is known.

    ``source`` is the script's text (read from disk when not given)."""
    source = suite.source() if source is None else source
    if "--quick" in source:
        return ("--quick", *(flag for flag in suite.quick_extra if flag in source))
    if suite.quick_fallback is not None and all(
            a in source for a in suite.quick_fallback if a.startswith("--")):
        return suite.quick_fallback
    return None
