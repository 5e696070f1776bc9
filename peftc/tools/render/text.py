"""The terminal form of a diff: a coloured rich tree, one folded line per repeated change.

```
resnet50 → clr   input 1×3×224×224
params 25,557,032 → 25,591,592 (+34,560) · trainable 0 → 2,136,680 · per task 2,136,680 params + 53,120 stats
├── + added: 17 insertions, +34,560 params
│   ├── conv1 → +clr (576 params)  ChannelConv · task · clr
│   ├── layer1.{0..2}.conv2 → +clr (3×, 576 params each)  ChannelConv · task · clr
…
```
"""

from __future__ import annotations

import io
from typing import TYPE_CHECKING, Any

from rich.console import Console
from rich.markup import escape
from rich.tree import Tree

from peftc.analysis.propagation import format_shape
from peftc.tools.collapse import Collapsed
from peftc.tools.view import format_flops

if TYPE_CHECKING:
    from peftc.tools.compare import Change, GraphDiff

__all__ = ["MAX_LINES", "SECTIONS", "build_tree", "render_text"]

# kind → (marker, colour, title)
SECTIONS: dict[str, tuple[str, str, str]] = {
    "added": ("+", "green", "added"),
    "removed": ("-", "red", "removed"),
    "replaced": ("~", "yellow", "replaced"),
    "rewired": ("↪", "blue", "rewired"),
    "reshaped": ("⇅", "magenta", "reshaped"),
    "ownership": ("●", "cyan", "ownership"),
}
MAX_LINES = 40  # per section; JSON has everything
_STATE_COLOURS = {"frozen": "dim", "trainable": "blue", "task": "magenta", "tied": "yellow"}


def _n(value: int) -> str:
    return f"{value:,}"


def _signed(value: int) -> str:
    return f"+{value:,}" if value > 0 else f"{value:,}" if value < 0 else "±0"


def _state(state: str | None) -> str:
    if state is None:
        return "[dim]absent[/]"
    return f"[{_STATE_COLOURS.get(state, 'white')}]{state}[/]"


def _times(f: Collapsed[Any], each: str = "") -> str:
    if f.count == 1:
        return f"({each})" if each else ""
    return f"({f.count}×, {each} each)" if each else f"({f.count}×)"


def _params_phrase(params: int, tied: int = 0) -> str:
    parts = []
    if params:
        parts.append(f"{_n(params)} params")
    if tied:
        parts.append(f"{_n(tied)} tied")
    return ", ".join(parts)


def _added(f: Collapsed[Change]) -> str:
    c = f.first
    d = c.data
    anchor = d.get("anchor")
    arrow = "∥" if d.get("action") == "parallel" else "→"
    if anchor and c.name.startswith(anchor + "."):
        head = f"{escape(f.expand(anchor))} {arrow} [green]+{escape(c.name[len(anchor) + 1 :])}[/]"
    elif anchor:
        head = f"{escape(f.expand(anchor))} {arrow} [green]+{escape(f.pattern)}[/]"
    else:
        head = f"[green]+{escape(f.pattern)}[/]"
    states = " ".join(_state(s) for s in d.get("state", {}))
    tail = " · ".join(x for x in (escape(d["type"]), states, escape(c.rule or "")) if x)
    return f"{head} {_times(f, _params_phrase(d['params'], d.get('tied', 0)))}  [dim]{tail}[/]"


def _removed(f: Collapsed[Change]) -> str:
    d = f.first.data
    return (
        f"[red]-{escape(f.pattern)}[/] {_times(f, _params_phrase(d['params'], d.get('tied', 0)))}  "
        f"[dim]{escape(d['type'])}[/]"
    )


def _replaced(f: Collapsed[Change]) -> str:
    a, b = f.first.data["a"], f.first.data["b"]
    if (a["type"], a["config"]) == (b["type"], b["config"]):
        what = f"new [yellow]{escape(b['type'])}({escape(b['config'])})[/]"  # rebuilt, same shape
    elif a["type"] == b["type"]:
        old, new = f"{a['type']}({a['config']})", f"{b['type']}({b['config']})"
        what = f"{escape(old)} ⇒ [yellow]{escape(new)}[/]"
    else:
        what = f"{escape(a['type'])} ⇒ [yellow]{escape(b['type'])}[/]"
    states = ""
    if a["state"] != b["state"]:
        states = f", {'+'.join(map(_state, a['state'])) or 'none'} → {'+'.join(map(_state, b['state'])) or 'none'}"
    params = f"{_n(a['params'])} → {_n(b['params'])} params{states}"
    rule = f"  [dim]{escape(f.first.rule)}[/]" if f.first.rule else ""
    return f"{escape(f.pattern)}: {what} {_times(f, params)}{rule}"


def _rewired(f: Collapsed[Change]) -> str:
    d = f.first.data
    new = [x for x in d["b"] if x not in d["a"]]
    gone = [x for x in d["a"] if x not in d["b"]]
    if not new and not gone:  # the same inputs in another order
        new, gone = d["b"], d["a"]
    now = ", ".join(escape(f.expand(x)) for x in new) or "nothing new"
    was = f"(was {', '.join(escape(f.expand(x)) for x in gone)})" if gone else "(a new input)"
    return f"{escape(f.pattern)} ← [blue]{now}[/] {was} {_times(f)}".rstrip()


def _reshaped(f: Collapsed[Change]) -> str:
    first = f.first.data
    after = _spread([m.data["b"] for m in f.members]) if f.count > 1 else _dims(first["b"])
    return f"{escape(f.pattern)}: {_dims(first['a'])} → [magenta]{after}[/] {_times(f)}".rstrip()


def _dims(shape: Any) -> str:
    if shape is None:
        return "-"
    if shape and isinstance(shape[0], list):
        return "(" + ", ".join(_dims(s) for s in shape) + ")"
    return "×".join(map(str, shape))


def _spread(shapes: list[Any]) -> str:
    """Shapes of folded members, each varying dimension as ``first…last``: ``1×184…41×192``."""
    first, last = shapes[0], shapes[-1]
    if first is None or last is None or len(first) != len(last):
        return _dims(first)
    if first and isinstance(first[0], list):
        return "(" + ", ".join(_spread([s[i] for s in shapes]) for i in range(len(first))) + ")"
    return "×".join(str(x) if x == y else f"{x}…{y}" for x, y in zip(first, last))


def _ownership(f: Collapsed[Change]) -> str:
    groups: dict[tuple[str | None, str | None], dict[str, list[Any]]] = {}
    for t in f.first.data["tensors"]:
        g = groups.setdefault((t["a"], t["b"]), {"param": [], "buffer": [], "param_n": [0], "buffer_n": [0]})
        g[t["kind"]].append(t["tensor"] + (f" = {f.expand(t['source'])}" if t.get("source") else ""))
        g[f"{t['kind']}_n"][0] += t["numel"]
    parts = []
    for (sa, sb), g in groups.items():
        what = []
        if g["param"]:
            what.append(f"{', '.join(map(escape, g['param']))} ({_n(g['param_n'][0])} params)")
        if g["buffer"]:
            what.append(f"{', '.join(map(escape, g['buffer']))} ({_n(g['buffer_n'][0])} stats)")
        parts.append(f"{_state(sa)} → {_state(sb)}: {'; '.join(what)}")
    rule = f"  [dim]{escape(f.first.rule)}[/]" if f.first.rule else ""
    times = f" ({f.count}×, each)" if f.count > 1 else ""
    return f"{escape(f.pattern)}: {' | '.join(parts)}{times}{rule}"


_LINES = {
    "added": _added,
    "removed": _removed,
    "replaced": _replaced,
    "rewired": _rewired,
    "reshaped": _reshaped,
    "ownership": _ownership,
}


def _section_title(kind: str, d: GraphDiff) -> str:
    marker, colour, title = SECTIONS[kind]
    items = d.changes[kind]
    if kind in ("added", "removed"):
        params = sum(c.data["params"] for c in items)
        noun = "insertion" if kind == "added" else "removal"
        extra = f", {'+' if kind == 'added' else '-'}{_n(params)} params"
        return (
            f"[bold {colour}]{marker} {title}[/]: {len(items)} {noun}{'s' if len(items) != 1 else ''}{extra}"
        )
    if kind == "ownership":
        moved: dict[tuple[str, str], int] = {}
        for c in items:
            for t in c.data["tensors"]:
                key = (t["kind"], str(t["b"]))
                moved[key] = moved.get(key, 0) + t["numel"]
        detail = ", ".join(
            f"{_n(n)} {'params' if k == 'param' else 'stats'} → {s}" for (k, s), n in moved.items()
        )
        nodes = f"{len(items)} node{'s' if len(items) != 1 else ''}"
        return f"[bold {colour}]{marker} {title}[/]: {nodes} ({detail})"
    return f"[bold {colour}]{marker} {title}[/]: {len(items)} node{'s' if len(items) != 1 else ''}"


def build_tree(d: GraphDiff) -> Tree:
    """The diff as a rich Tree (what ``peftc diff`` prints)."""
    shape = format_shape(tuple(d.b.input))
    if d.a.input != d.b.input:
        shape = f"{format_shape(tuple(d.a.input))} / {shape}"
    s = d.summary()
    root = Tree(
        f"[bold]{escape(d.a.label)} → {escape(d.b.label)}[/]   [dim]input {shape}[/]", guide_style="dim"
    )
    totals = [
        f"params {_n(s['params']['a'])} → {_n(s['params']['b'])} ({_signed(s['params']['delta'])})",
        f"trainable {_n(s['trainable']['a'])} → {_n(s['trainable']['b'])}",
        f"per task {_n(s['task_params']['b'])} params + {_n(s['task_buffers']['b'])} stats",
        f"FLOPs {format_flops(s['flops']['a'])} → {format_flops(s['flops']['b'])}",
    ]
    root.add(" · ".join(totals))
    for line in dict.fromkeys([*d.a.source.get("tracing", ()), *d.b.source.get("tracing", ())]):
        root.add(f"[dim]{escape(line)}[/]")
    if d.empty:
        root.add("[green]no changes[/]")
    for kind in SECTIONS:
        if not d.changes[kind]:
            continue
        branch = root.add(_section_title(kind, d))
        folds = d.collapsed(kind)
        for f in folds[:MAX_LINES]:
            branch.add(_LINES[kind](f))
        if len(folds) > MAX_LINES:
            branch.add(f"[dim]… {len(folds) - MAX_LINES} more lines (--format json lists every change)[/]")
    if d.tensors is not None:
        t = d.tensors
        branch = root.add(
            f"[bold]saved tensors[/]: {t['same']} equal, {len(t['changed'])} differ, "
            f"{len(t['only_a'])} only in {escape(d.a.label)}, {len(t['only_b'])} only in {escape(d.b.label)}"
        )
        for entry in t["changed"][:20]:
            if "shape" in entry:
                branch.add(f"{escape(entry['tensor'])}: shape {entry['shape']['a']} → {entry['shape']['b']}")
            else:
                branch.add(f"{escape(entry['tensor'])}: max |Δ| {entry['max_abs_diff']:.3g}")
        for key in t["only_a"][:10]:
            branch.add(f"[red]-{escape(key)}[/]")
        for key in t["only_b"][:10]:
            branch.add(f"[green]+{escape(key)}[/]")
    return root


def render_text(d: GraphDiff, *, color: bool = False, width: int = 110) -> str:
    """The tree as text; ``color=True`` keeps ANSI colours (for a terminal), else plain."""
    console = Console(
        file=io.StringIO(),
        width=width,
        record=True,
        force_terminal=color,
        color_system="standard" if color else None,
        no_color=not color,
        highlight=False,
    )
    console.print(build_tree(d))
    return console.export_text(styles=color)
