"""The Graphviz form of a diff: ``dot -Tsvg diff.dot > diff.svg``.

Both graphs are overlaid (:meth:`GraphDiff.display_graph`); each repeated block is a dashed cluster, node
outlines and fills follow :mod:`peftc.tools.render.style`, removed edges are dashed red and new ones green. Every node
carries a ``tooltip`` (type, shapes, parameters, FLOPs) and a ``class`` (its change kinds) that Graphviz copies
into SVG output.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from peftc.tools.render.style import STATE_FILL, STATUS, node_label, node_tooltip

if TYPE_CHECKING:
    from peftc.tools.compare import GraphDiff

__all__ = ["quote", "render_dot"]

_EDGE = {"same": 'color="#8a939c"', "added": 'color="#1b873f", penwidth=1.6',
         "removed": 'color="#c62828", style=dashed'}


def quote(text: str) -> str:
    """A DOT double-quoted string (backslashes, quotes and newlines escaped)."""
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'


def render_dot(d: GraphDiff) -> str:
    g = d.display_graph()
    title = f"{d.a.label} → {d.b.label}"
    out = [
        "digraph peftc_diff {",
        f"  graph [rankdir=TB, fontname=Helvetica, fontsize=12, labelloc=t, label={quote(title)}];",
        '  node [shape=box, style="rounded,filled", fontname=Helvetica, fontsize=9, margin="0.08,0.03"];',
        "  edge [arrowsize=0.6];",
    ]
    clusters: dict[str | None, list[str]] = {}
    for name, attrs in g.nodes(data=True):
        clusters.setdefault(attrs["info"].block, []).append(name)
    for block, names in clusters.items():
        indent = "  "
        if block is not None:
            out.append(f"  subgraph {quote('cluster_' + block)} {{")
            out.append(f'    label={quote(block)}; style="rounded,dashed"; color="#b7bec6"; fontsize=10;')
            indent = "    "
        for name in names:
            attrs = g.nodes[name]
            info, status = attrs["info"], attrs["status"]
            fill, outline = STATUS[status]
            fill = fill or STATE_FILL[info.state]
            top, bottom = node_label(info, block)
            width = 2.2 if status != "same" else 1.0
            style = '"rounded,filled,dashed"' if status == "removed" else '"rounded,filled"'
            out.append(
                f"{indent}{quote(name)} [label={quote(top + chr(10) + bottom)}, fillcolor={quote(fill)}, "
                f"color={quote(outline)}, penwidth={width}, style={style}, "
                f"class={quote(' '.join([*attrs['kinds'], 'own-' + (info.state or 'none')]))}, "
                f"tooltip={quote(node_tooltip(info, attrs['before'], attrs['kinds']))}];"
            )
        if block is not None:
            out.append("  }")
    for u, v, attrs in g.edges(data=True):
        out.append(f"  {quote(u)} -> {quote(v)} [{_EDGE[attrs['status']]}];")
    out.append("}")
    return "\n".join(out) + "\n"
