"""The HTML form of a diff: ONE self-contained file (inline SVG, CSS and a small script; no network).

Both graphs are overlaid top-down (:mod:`peftc.tools.render.layout`). Added, removed and replaced nodes are filled
green, red and amber; rewired nodes get a blue outline; every other node is filled by who owns its tensors
(frozen grey, trainable blue, per-task violet, tied pink). Each repeated block is a band that folds into one
summary box (click its label); blocks that repeat an earlier block's changes start folded. Hovering a node shows
its type, shapes, parameters and FLOPs (an SVG ``<title>`` and the side panel). The page draws correctly without
its script; the script only re-lays out on fold and unfold.
"""

from __future__ import annotations

import json
from html import escape
from typing import TYPE_CHECKING, Any

from peftc.analysis.propagation import format_shape
from peftc.tools.render.layout import BAND_TOP, BOW, MARGIN, NODE_H, NODE_W, ROW, Layout, layout
from peftc.tools.render.style import STATE_FILL, STATUS, node_label, node_tooltip, short_name
from peftc.tools.view import format_flops

if TYPE_CHECKING:
    import networkx as nx

    from peftc.tools.compare import GraphDiff

__all__ = ["render_html"]

_ORDER = ("ownership", "reshaped", "rewired", "replaced", "removed", "added")  # later CSS rules win


def _css() -> str:
    rules = [
        "body{margin:0;font:13px/1.4 system-ui,-apple-system,'Segoe UI',Helvetica,Arial,sans-serif;color:#1d232a}",
        "header{padding:14px 20px 6px;border-bottom:1px solid #dde2e7;background:#fafbfc}",
        "h1{font-size:18px;margin:0 0 4px}",
        ".totals{margin:2px 0;color:#4a5561}",
        ".legend{display:flex;flex-wrap:wrap;gap:10px;margin:8px 0}",
        ".legend span{display:inline-flex;align-items:center;gap:4px}",
        ".legend i{display:inline-block;width:16px;height:11px;border-radius:3px;border:2px solid #9aa3ad}",
        "button{font:inherit;margin-right:6px;padding:2px 10px;border:1px solid #b7bec6;border-radius:4px;"
        "background:#fff;cursor:pointer}",
        "details pre{font:12px/1.35 ui-monospace,Menlo,Consolas,monospace;background:#fff;padding:8px;"
        "border:1px solid #dde2e7;overflow:auto;max-height:40vh}",
        ".canvas{overflow:auto}",
        "#info{position:fixed;right:12px;bottom:12px;width:330px;max-height:45vh;overflow:auto;padding:10px;"
        "white-space:pre-wrap;font:12px/1.4 ui-monospace,Menlo,Consolas,monospace;border:1px solid #dde2e7;"
        "border-radius:6px;background:rgba(250,251,252,.95);box-shadow:0 2px 8px rgba(0,0,0,.08)}",
        "svg text{font-size:11px;fill:#1d232a;pointer-events:none}",
        "svg .type{font-size:9.5px;fill:#5b6671}",
        ".edge{fill:none;stroke:#8a939c;stroke-width:1.2}",
        ".edge.added{stroke:#1b873f;stroke-width:1.8}",
        ".edge.removed{stroke:#c62828;stroke-dasharray:5 4}",
        ".node rect{stroke-width:1.2}",
        ".node:hover rect,.summary:hover rect{stroke-width:3}",
        ".band-bg{fill:#f6f8fa;stroke:#d5dbe1;stroke-dasharray:4 3}",
        ".band-label{font-size:11px;fill:#4a5561;font-weight:600;cursor:pointer;pointer-events:all}",
        ".band-back.collapsible .band-label:hover{fill:#1f5fbf}",
        ".band.collapsed .node,.band-back.collapsed .band-bg,.band:not(.collapsed) .summary{display:none}",
        ".band-back.collapsed .open,.band-back:not(.collapsed) .shut{display:none}",
        ".summary{cursor:pointer}",
        ".summary rect{fill:#ffffff;stroke:#6b7682;stroke-dasharray:5 3;stroke-width:1.4}",
        ".summary.has-added rect{stroke:#1b873f}",
        ".badge{stroke:#ffffff;stroke-width:1}",
    ]
    for state, fill in STATE_FILL.items():
        name = state or "none"
        rules.append(f".node.own-{name} rect{{fill:{fill};stroke:{STATUS['same'][1]}}}")
    badge = {"trainable": "#2f6fdb", "task": "#8e44ad", "tied": "#d63384", "frozen": "#9aa3ad"}
    for state, colour in badge.items():
        rules.append(f".own-{state} .badge{{fill:{colour}}}")
    rules.append(".own-none .badge{display:none}")
    for kind in _ORDER:
        fill, outline = STATUS[kind]
        fill_rule = f"fill:{fill};" if fill else ""
        dash = "stroke-dasharray:5 3;" if kind == "removed" else ""
        rules.append(f".node.{kind} rect{{{fill_rule}stroke:{outline};stroke-width:2.4;{dash}}}")
    return "\n".join(rules)


_SCRIPT = """
(function () {
  var L = JSON.parse(document.getElementById('peftc-layout').textContent);
  var svg = document.getElementById('graph');
  var bandEls = Array.prototype.slice.call(svg.querySelectorAll('g.band'));
  var backEls = Array.prototype.slice.call(svg.querySelectorAll('g.band-back'));
  var edgeEls = Array.prototype.slice.call(svg.querySelectorAll('path.edge'));
  function restack() {
    var y = L.margin;
    L.bands.forEach(function (b, i) {
      b.y = y;
      [bandEls[i], backEls[i]].forEach(function (el) {
        el.setAttribute('transform', 'translate(0,' + y + ')');
        el.classList.toggle('collapsed', b.collapsed);
      });
      y += b.collapsed ? L.bandTop + L.row : b.h;
    });
    svg.setAttribute('height', y + L.margin);
    svg.setAttribute('viewBox', '0 0 ' + L.width + ' ' + (y + L.margin));
  }
  function anchor(i) {
    var n = L.nodes[i], b = L.bands[n[0]];
    return b.collapsed ? [b.sx, b.y + L.bandTop + L.nodeH / 2] : [n[1], b.y + n[2]];
  }
  function path(s, t) {
    var x1 = s[0], y1 = s[1] + L.nodeH / 2, x2 = t[0], y2 = t[1] - L.nodeH / 2;
    var dy = Math.max(16, (y2 - y1) / 2), bow = (y2 - y1 > L.row) ? L.bow : 0;
    return 'M' + x1 + ',' + y1 + ' C' + (x1 + bow) + ',' + (y1 + dy) + ' ' + (x2 + bow) + ',' + (y2 - dy) +
      ' ' + x2 + ',' + y2;
  }
  function redraw() {
    restack();
    L.edges.forEach(function (e, k) {
      var bu = L.nodes[e[0]][0], bv = L.nodes[e[1]][0], el = edgeEls[k];
      if (bu === bv && L.bands[bu].collapsed) { el.style.display = 'none'; return; }
      el.style.display = '';
      el.setAttribute('d', path(anchor(e[0]), anchor(e[1])));
    });
  }
  bandEls.forEach(function (el, i) {
    if (!L.bands[i].collapsible) { return; }
    [backEls[i].querySelector('.band-label'), el.querySelector('.summary')].forEach(function (t) {
      t.addEventListener('click', function () { L.bands[i].collapsed = !L.bands[i].collapsed; redraw(); });
    });
  });
  document.getElementById('expand-all').addEventListener('click', function () {
    L.bands.forEach(function (b) { b.collapsed = false; }); redraw();
  });
  document.getElementById('collapse-all').addEventListener('click', function () {
    L.bands.forEach(function (b) { if (b.collapsible) { b.collapsed = true; } }); redraw();
  });
  var info = document.getElementById('info');
  svg.querySelectorAll('g.node, g.summary').forEach(function (el) {
    el.addEventListener('mouseenter', function () { info.textContent = el.querySelector('title').textContent; });
  });
  redraw();
})();
"""


def _signature(g: nx.DiGraph, names: list[str], block: str) -> tuple[Any, ...]:
    return tuple((short_name(n, block), g.nodes[n]["status"], g.nodes[n]["info"].state) for n in names)


def _initially_folded(g: nx.DiGraph) -> set[str]:
    """Blocks that repeat the changes of an earlier unfolded block of the same stage start folded."""
    members: dict[str, list[str]] = {}
    for name, attrs in g.nodes(data=True):
        block = attrs["info"].block
        if block is not None:
            members.setdefault(block, []).append(name)
    seen: dict[str, set[tuple[Any, ...]]] = {}
    folded = set()
    for block, names in members.items():
        stage = block.rpartition(".")[0]
        sig = _signature(g, names, block)
        if sig in seen.setdefault(stage, set()):
            folded.add(block)
        else:
            seen[stage].add(sig)
    return folded


def _node_svg(name: str, attrs: dict[str, Any], index: int, lay: Layout) -> str:
    info = attrs["info"]
    classes = " ".join(["node", *attrs["kinds"], f"own-{info.state or 'none'}"])
    top, bottom = node_label(info, info.block)
    x, y = lay.x[name] - NODE_W / 2, lay.y[name] - NODE_H / 2
    tip = node_tooltip(info, attrs["before"], attrs["kinds"])
    return (
        f'<g class="{classes}" data-name="{escape(name)}" data-i="{index}" transform="translate({x:.1f},{y:.1f})">'
        f"<title>{escape(tip)}</title>"
        f'<rect width="{NODE_W}" height="{NODE_H}" rx="7"/>'
        f'<circle class="badge" cx="{NODE_W - 9}" cy="9" r="4.5"/>'
        f'<text x="9" y="16">{escape(top)}</text>'
        f'<text class="type" x="9" y="30">{escape(bottom)}</text></g>'
    )


def _band_classes(band: Any, base: str) -> str:
    return base + (" collapsible" if band.collapsible else "") + (" collapsed" if band.collapsed else "")


def _band_back_svg(band: Any, lay: Layout) -> str:
    """A block's frame and label, drawn under the edges (its nodes are drawn above them)."""
    parts = [f'<g class="{_band_classes(band, "band-back")}" data-band="{band.index}" '
             f'transform="translate(0,{band.y:.1f})">']
    if band.block is not None:
        xs = [lay.x[n] for n in band.nodes]
        left, right = min(xs) - NODE_W / 2 - 10, max(xs) + NODE_W / 2 + 10
        parts.append(f'<rect class="band-bg" x="{left:.1f}" y="4" width="{right - left:.1f}" '
                     f'height="{band.expanded_height - 8:.1f}" rx="8"/>')
        arrow = '<tspan class="open">▾ </tspan><tspan class="shut">▸ </tspan>' if band.collapsible else ""
        parts.append(f'<text class="band-label" x="{left + 6:.1f}" y="17">{arrow}{escape(band.block)}</text>')
    parts.append("</g>")
    return "".join(parts)


def _band_svg(band: Any, g: nx.DiGraph, lay: Layout, index_of: dict[str, int]) -> str:
    parts = [f'<g class="{_band_classes(band, "band")}" data-band="{band.index}" '
             f'data-block="{escape(band.block or "")}" transform="translate(0,{band.y:.1f})">']
    if band.collapsible:
        kinds: dict[str, int] = {}
        for n in band.nodes:
            for k in g.nodes[n]["kinds"]:
                kinds[k] = kinds.get(k, 0) + 1
        changes = ", ".join(f"{v} {k}" for k, v in kinds.items()) or "unchanged"
        params = sum(g.nodes[n]["info"].params for n in band.nodes)
        tip = f"{band.block}: {len(band.nodes)} nodes, {params:,} params\nchanges: {changes}\n(click to unfold)"
        cls = "summary" + (" has-added" if "added" in kinds else "")
        brief = changes if len(changes) < 34 else changes[:33] + "…"
        parts.append(
            f'<g class="{cls}" transform="translate({band.summary_x - NODE_W / 2:.1f},{BAND_TOP})">'
            f'<title>{escape(tip)}</title><rect width="{NODE_W}" height="{NODE_H}" rx="7"/>'
            f'<text x="9" y="16">{escape(band.block)} · {len(band.nodes)} nodes</text>'
            f'<text class="type" x="9" y="30">{escape(brief)}</text></g>'
        )
    parts.extend(_node_svg(n, g.nodes[n], index_of[n], lay) for n in band.nodes)
    parts.append("</g>")
    return "".join(parts)


def _legend() -> str:
    items = []
    for kind, label in (("added", "added"), ("removed", "removed"), ("replaced", "replaced"),
                        ("rewired", "rewired"), ("ownership", "ownership changed")):
        fill, outline = STATUS[kind]
        items.append(f'<span><i style="background:{fill or "#fff"};border-color:{outline}"></i>{label}</span>')
    for state in ("frozen", "trainable", "task", "tied"):
        items.append(f'<span><i style="background:{STATE_FILL[state]}"></i>{state}</span>')
    return '<div class="legend">' + "".join(items) + "</div>"


def render_html(d: GraphDiff) -> str:
    """The whole page as one string."""
    g = d.display_graph()
    order = list(g.nodes)
    index_of = {n: i for i, n in enumerate(order)}
    preds = {n: [p for p in g.predecessors(n) if index_of[p] < index_of[n]] for n in order}
    lay = layout(order, preds, {n: g.nodes[n]["info"].block for n in order}, _initially_folded(g))
    edges = [(u, v, a["status"]) for u, v, a in g.edges(data=True)]
    edge_svg = []
    for u, v, status in edges:
        path = lay.edge(u, v)
        hidden = ' style="display:none"' if path is None else ""
        edge_svg.append(f'<path class="edge {status}" d="{path or "M0,0"}"{hidden}/>')
    data = {
        "nodes": [[lay.band_of[n], round(lay.x[n], 1), round(lay.y[n], 1)] for n in order],
        "edges": [[index_of[u], index_of[v]] for u, v, _ in edges],
        "bands": [{"h": b.expanded_height, "sx": round(b.summary_x, 1), "collapsible": b.collapsible,
                   "collapsed": b.collapsed, "y": b.y} for b in lay.bands],
        "width": round(lay.width, 1), "margin": MARGIN, "bandTop": BAND_TOP, "row": ROW, "nodeH": NODE_H,
        "bow": BOW,
    }
    s = d.summary()
    title = f"{d.a.label} → {d.b.label}"
    totals = (
        f"params {s['params']['a']:,} → {s['params']['b']:,} ({s['params']['delta']:+,}) · trainable "
        f"{s['trainable']['a']:,} → {s['trainable']['b']:,} · per task {s['task_params']['b']:,} params + "
        f"{s['task_buffers']['b']:,} stats · FLOPs {format_flops(s['flops']['a'])} → {format_flops(s['flops']['b'])}"
        f" · input {format_shape(tuple(d.b.input))}"
    )
    counts = " · ".join(f"{len(v)} {k}" for k, v in d.changes.items() if v) or "no changes"
    height = lay.height
    svg = (
        f'<svg id="graph" xmlns="http://www.w3.org/2000/svg" width="{lay.width:.0f}" height="{height:.0f}" '
        f'viewBox="0 0 {lay.width:.0f} {height:.0f}" data-nodes="{len(order)}">'
        f'<g class="backs">{"".join(_band_back_svg(b, lay) for b in lay.bands)}</g>'
        f'<g class="edges">{"".join(edge_svg)}</g>'
        f'<g class="bands">{"".join(_band_svg(b, g, lay, index_of) for b in lay.bands)}</g></svg>'
    )
    payload = json.dumps(data, separators=(",", ":")).replace("</", "<\\/")
    return (
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
        f"<title>peftc diff: {escape(title)}</title><style>{_css()}</style></head><body>"
        f"<header><h1>{escape(title)}</h1><p class=\"totals\">{escape(totals)}</p>"
        f"<p class=\"totals\">{escape(counts)}</p>{_legend()}"
        '<p><button id="expand-all" type="button">unfold all blocks</button>'
        '<button id="collapse-all" type="button">fold all blocks</button> '
        "<small>click a block's label or summary box to fold or unfold it; hover a node for details</small></p>"
        f"<details><summary>changes, folded</summary><pre>{escape(d.text(width=160))}</pre></details></header>"
        f'<main><div class="canvas">{svg}</div><aside id="info">hover a node</aside></main>'
        f'<script type="application/json" id="peftc-layout">{payload}</script>'
        f"<script>{_SCRIPT}</script></body></html>\n"
    )
