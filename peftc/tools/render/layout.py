"""A top-down layered layout for the HTML diff, computed here so the page needs no layout engine.

Backbones are long chains with short side branches (residual shortcuts, downsample convs, attention's q/k/v), so
a simple layered layout reads well:

1. The graph (in data-flow order) is cut into *bands*: maximal runs of nodes in the same repeated block
   (``layer1.0``, ``blocks.3``) or outside any. A band collapses to one summary box, so the page can fold
   repeated blocks; collapsing one only shifts the bands below it.
2. Inside a band, a node's layer is one below its lowest predecessor in the band (longest path).
3. Left to right, each node wants the mean x of its predecessors (so chains stay straight); nodes of one layer
   keep at least one column apart and the row is shifted back to its wanted centre.

Edges are cubic curves from a box's bottom to the next box's top; long edges (shortcuts) bow to the right so
they do not run through the boxes of the main chain. The page's script redraws them with the same formula.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

__all__ = ["BAND_TOP", "BOW", "COL", "NODE_H", "NODE_W", "ROW", "Band", "Layout", "edge_path", "layout"]

NODE_W, NODE_H = 172, 38  # a node box
COL, ROW = 196, 64  # grid pitch
BAND_TOP = 24  # room for a band's label above its first row
MARGIN = 24
BOW = 0.55 * COL  # how far long edges swing out


@dataclass
class Band:
    """A run of nodes drawn (and folded) together."""

    index: int
    block: str | None
    nodes: list[str]
    layers: int = 1
    collapsible: bool = False
    collapsed: bool = False
    y: float = 0.0  # offset in the current (initial) state
    summary_x: float = 0.0

    @property
    def expanded_height(self) -> float:
        return BAND_TOP + self.layers * ROW

    @property
    def collapsed_height(self) -> float:
        return BAND_TOP + ROW

    @property
    def height(self) -> float:
        return self.collapsed_height if self.collapsed else self.expanded_height


@dataclass
class Layout:
    """Node centres relative to their band, the bands, and the canvas width."""

    x: dict[str, float] = field(default_factory=dict)
    y: dict[str, float] = field(default_factory=dict)  # relative to the band's top
    band_of: dict[str, int] = field(default_factory=dict)
    bands: list[Band] = field(default_factory=list)
    width: float = 0.0

    @property
    def height(self) -> float:
        return sum(b.height for b in self.bands) + 2 * MARGIN

    def restack(self) -> None:
        """Recompute band offsets from their collapsed state."""
        y = MARGIN
        for band in self.bands:
            band.y = y
            y += band.height

    def anchor(self, name: str) -> tuple[float, float]:
        """Where edges meet ``name`` now: its box centre, or its band's summary box when the band is folded."""
        band = self.bands[self.band_of[name]]
        if band.collapsed:
            return band.summary_x, band.y + BAND_TOP + NODE_H / 2
        return self.x[name], band.y + self.y[name]

    def edge(self, u: str, v: str) -> str | None:
        """The SVG path of edge u → v in the current state; None when both ends sit in one folded band."""
        bu, bv = self.band_of[u], self.band_of[v]
        if bu == bv and self.bands[bu].collapsed:
            return None
        return edge_path(self.anchor(u), self.anchor(v))


def edge_path(src: tuple[float, float], dst: tuple[float, float]) -> str:
    """Bottom of ``src`` to top of ``dst``; edges that skip a row bow right (the page's script mirrors this)."""
    x1, y1 = src[0], src[1] + NODE_H / 2
    x2, y2 = dst[0], dst[1] - NODE_H / 2
    dy = max(16.0, (y2 - y1) / 2)
    bow = BOW if y2 - y1 > ROW else 0.0
    return (f"M{x1:.1f},{y1:.1f} C{x1 + bow:.1f},{y1 + dy:.1f} {x2 + bow:.1f},{y2 - dy:.1f} "
            f"{x2:.1f},{y2:.1f}")


def _bands(order: list[str], block_of: Mapping[str, str | None]) -> list[Band]:
    bands: list[Band] = []
    for name in order:
        block = block_of[name]
        if not bands or bands[-1].block != block:
            bands.append(Band(len(bands), block, []))
        bands[-1].nodes.append(name)
    runs: dict[str | None, int] = {}
    for band in bands:
        runs[band.block] = runs.get(band.block, 0) + 1
    for band in bands:
        band.collapsible = band.block is not None and runs[band.block] == 1 and len(band.nodes) > 1
    return bands


def layout(
    order: list[str],
    preds: Mapping[str, Iterable[str]],
    block_of: Mapping[str, str | None],
    collapsed: Iterable[str] = (),
) -> Layout:
    """Lay out nodes given in data-flow ``order``; ``collapsed`` names the blocks folded initially."""
    folded = set(collapsed)
    out = Layout(bands=_bands(order, block_of))
    for band in out.bands:
        members = set(band.nodes)
        layer: dict[str, int] = {}
        for name in band.nodes:
            inside = [layer[p] for p in preds.get(name, ()) if p in members and p in layer]
            layer[name] = max(inside) + 1 if inside else 0
        band.layers = max(layer.values()) + 1
        rows: dict[int, list[str]] = {}
        for name in band.nodes:
            rows.setdefault(layer[name], []).append(name)
        for index in sorted(rows):
            _place_row(rows[index], preds, out.x)
        for name in band.nodes:
            out.band_of[name] = band.index
            out.y[name] = BAND_TOP + layer[name] * ROW + NODE_H / 2
        xs = [out.x[n] for n in band.nodes]
        band.summary_x = (min(xs) + max(xs)) / 2
        band.collapsed = band.collapsible and band.block in folded
    left = min(out.x.values(), default=0.0) - NODE_W / 2 - MARGIN
    for name in out.x:
        out.x[name] -= left
    for band in out.bands:
        band.summary_x -= left
    out.width = max(out.x.values(), default=0.0) + NODE_W / 2 + BOW + MARGIN
    out.restack()
    return out


def _place_row(row: list[str], preds: Mapping[str, Iterable[str]], x: dict[str, float]) -> None:
    """Each node at the mean x of its placed predecessors, at least one column apart, centred on the wish."""
    wanted = []
    for i, name in enumerate(row):
        placed = [x[p] for p in preds.get(name, ()) if p in x]
        wanted.append((sum(placed) / len(placed) if placed else 0.0, i, name))
    wanted.sort()
    positions: list[float] = []
    for want, _, _ in wanted:
        positions.append(want if not positions else max(want, positions[-1] + COL))
    shift = sum(w - p for (w, _, _), p in zip(wanted, positions)) / len(positions)
    for (_, _, name), pos in zip(wanted, positions):
        x[name] = pos + shift
