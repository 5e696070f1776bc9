"""One palette for every graphical diff (DOT and HTML), so a colour means the same thing in both.

Change status colours the *outline* (and fills added, removed and replaced nodes); tensor ownership colours the
*fill* of every other node, so "what changed" and "who learns" read at a glance.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from peftc.analysis.propagation import format_shape
from peftc.tools.view import format_flops

if TYPE_CHECKING:
    from peftc.tools.view import NodeInfo

__all__ = ["STATE_FILL", "STATUS", "node_label", "node_tooltip", "short_name"]

# status → (fill, outline); None: keep the ownership fill
STATUS: dict[str, tuple[str | None, str]] = {
    "added": ("#c9f2d0", "#1b873f"),
    "removed": ("#fbd5d5", "#c62828"),
    "replaced": ("#ffe9b3", "#d98e04"),
    "rewired": (None, "#1f5fbf"),
    "reshaped": (None, "#8e44ad"),
    "ownership": (None, "#0f8b8d"),
    "same": (None, "#9aa3ad"),
}
# tensor state → fill
STATE_FILL: dict[str | None, str] = {
    "frozen": "#eef0f3",
    "trainable": "#d6e6ff",
    "task": "#ead9ff",
    "tied": "#ffdcec",
    None: "#ffffff",
}


def short_name(name: str, block: str | None) -> str:
    """The name inside its repeated block (``layer1.0.conv2.clr`` → ``conv2.clr``), at most 26 characters."""
    short = name[len(block) + 1:] if block and name.startswith(block + ".") else name
    return short if len(short) <= 26 else "…" + short[-25:]


def node_label(info: NodeInfo, block: str | None) -> tuple[str, str]:
    """Two lines for a node box: its short name, and its type with the output shape."""
    shape = format_shape(info.shape)
    kind = info.type if len(info.type) <= 18 else info.type[:17] + "…"
    bottom = f"{kind} · {shape}" if info.shape is not None else kind
    return short_name(info.name, block), bottom if len(bottom) <= 32 else bottom[:31] + "…"


def node_tooltip(info: NodeInfo, before: NodeInfo | None, kinds: list[str]) -> str:
    """What hovering a node shows: name, type, shapes, parameters by state, FLOPs, what changed and why."""
    lines = [info.name, f"type: {info.type}" + (f"({info.config})" if info.config else "")]
    if before is not None and before.type != info.type:
        lines.append(f"was: {before.type}" + (f"({before.config})" if before.config else ""))
    shape = format_shape(info.shape)
    if before is not None and before.shape != info.shape:
        shape = f"{format_shape(before.shape)} → {shape}"
    lines.append(f"shape: {shape}")
    states = info.states()
    params = f"params: {info.params:,}"
    if states:
        params += " (" + ", ".join(f"{s} {n:,}" for s, n in states.items()) + ")"
    lines.append(params)
    buffers = sum(t.numel for t in info.tensors if t.kind == "buffer")
    if buffers:
        lines.append(f"stats: {buffers:,}")
    lines.append(f"FLOPs: {format_flops(info.flops)}")
    if info.inputs:
        lines.append("inputs: " + ", ".join(info.inputs))
    if kinds:
        lines.append("changed: " + ", ".join(kinds))
    if info.rule:
        lines.append(f"rule: {info.rule}")
    return "\n".join(lines)
