"""Convpass: a convolutional bypass for ViT sublayers (JieShibo/PETL-ViT, ``convpass/vtab/convpass.py``).

``down`` (Linear d → dim, xavier, zero bias) → QuickGELU → the patch tokens as a ``B × dim × H × W`` image
through a 3×3 conv (padding 1); the prefix tokens (class token, DeiT's distillation token, registers) each
through the same conv as a 1×1 image, i.e. its centre tap plus bias → tokens re-assembled in their order →
QuickGELU → dropout → ``up`` (Linear dim → d, weight and bias zero, so the model equals the backbone at init).

A channels-last ``B × H × W × d`` input (a hierarchical transformer's stage, as in Swin) is its own grid,
with no prefix tokens. Otherwise the patch grid is read from the model, never assumed: at build time the block
finds the patch-embedding conv (the last ``Conv2d`` before it in the graph), takes its output grid ``H × W`` at
the example input, and counts as prefix tokens whatever the token sequence holds beyond ``H · W``. At run time a
sequence of another length (another input resolution) is accepted when its patch count is a square.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from peftc.blocks.contract import Block
from peftc.blocks.registry import Site, block_factory
from peftc.errors import PeftcError
from peftc.methods.convpass.args import ConvpassArgs

__all__ = ["Convpass", "ConvpassArgs", "QuickGELU", "patch_grid"]


class QuickGELU(nn.Module):
    """``x · sigmoid(1.702 x)`` (CLIP's GELU approximation, used by Convpass)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(1.702 * x)


class Convpass(Block):
    """The convolutional bypass over ``B × N × d`` token sequence with ``prefix`` leading non-patch tokens."""

    def __init__(self, features: int, grid: tuple[int, int], prefix: int, dim: int = 8, dropout: float = 0.1,
                 conv_init: str = "identity"):
        super().__init__()
        self.features = features
        self.grid = (int(grid[0]), int(grid[1]))
        self.prefix = int(prefix)
        self.dim = dim
        self.down = nn.Linear(features, dim)
        self.act = QuickGELU()
        self.conv = nn.Conv2d(dim, dim, 3, padding=1)
        self.dropout = nn.Dropout(dropout)
        self.up = nn.Linear(dim, features)
        with torch.no_grad():
            nn.init.xavier_uniform_(self.down.weight)
            nn.init.zeros_(self.down.bias)
            if conv_init == "identity":
                self.conv.weight.zero_()
                self.conv.weight[:, :, 1, 1] = torch.eye(dim)
            else:
                nn.init.xavier_uniform_(self.conv.weight)
            nn.init.zeros_(self.conv.bias)
            nn.init.zeros_(self.up.weight)
            nn.init.zeros_(self.up.bias)

    def _grid_for(self, patches: int) -> tuple[int, int]:
        h, w = self.grid
        if patches == h * w:
            return h, w
        side = math.isqrt(patches)
        if side * side != patches:
            raise PeftcError(
                f"convpass: {patches} patch tokens fit neither the {h}x{w} grid it was built for nor a square"
            )
        return side, side

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 4:  # a channels-last B × H × W × d token grid (Swin): the grid is explicit
            h = self.conv(self.act(self.down(x)).permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
            return self.up(self.dropout(self.act(h)))
        b, n, _ = x.shape
        h = self.act(self.down(x))
        p = self.prefix
        gh, gw = self._grid_for(n - p)
        patches = h[:, p:].reshape(b, gh, gw, self.dim).permute(0, 3, 1, 2)
        patches = self.conv(patches).permute(0, 2, 3, 1).reshape(b, gh * gw, self.dim)
        if p:
            # A 1x1 image through a 3x3 conv with padding 1 sees only the centre tap, plus the bias.
            centre = self.conv.weight[:, :, 1, 1]
            patches = torch.cat([F.linear(h[:, :p], centre, self.conv.bias), patches], dim=1)
        return self.up(self.dropout(self.act(patches)))

    def extra_repr(self) -> str:
        return f"{self.features} -> {self.dim}, grid={self.grid}, prefix={self.prefix}"


def patch_grid(site: Site) -> tuple[int, int]:
    """The ``H × W`` patch grid: output size of the last ``Conv2d`` before ``site`` in the graph."""
    convs = site.shared.get("convs")
    if convs is None:  # the backbone's own Conv2d nodes, looked up once per compilation (blocks add none)
        gm = site.node.graph.owning_module
        convs = site.shared["convs"] = {n for n in site.node.graph.nodes if n.op == "call_module" and isinstance(
            gm.get_submodule(str(n.target)), nn.Conv2d)}
    grid = None
    for node in site.node.graph.nodes:
        if node is site.node:
            break
        if node in convs:
            shape = site.shapes(node)
            if shape is not None and len(shape) == 4:
                grid = (int(shape[2]), int(shape[3]))
    if grid is None:
        raise PeftcError(f"convpass at {site.name!r}: no patch-embedding Conv2d before it to read the grid")
    return grid


def _stage_grid(grid: tuple[int, int], tokens: int) -> tuple[int, int]:
    """The patch grid, or — fewer tokens than patches, a later stage of a hierarchical model (Swin's B × N × C
    MLP input) — the patch grid downsampled by the stride that fits the token count exactly."""
    h, w = grid
    for stride in range(2, h + 1):
        if tokens >= h * w:
            break
        if h % stride == 0 and w % stride == 0 and (h // stride) * (w // stride) == tokens:
            return h // stride, w // stride
    return grid


def _check_token_grid(site: Site, shape: torch.Size) -> None:
    """A ``B × H × W × C`` input is a token grid when ``H × W`` is the image downsampled by one stride (Swin's
    stages); MaxViT's ``B × G × P × C`` window partitions are not, and a conv over them would mix windows."""
    image = next((site.shapes(n) for n in site.node.graph.nodes if n.op == "placeholder"), None)
    rows, cols = int(shape[1]), int(shape[2])
    if image is not None and len(image) == 4:
        stride = image[2] // rows if image[2] % rows == 0 else None
        if stride is not None and rows * stride == image[2] and cols * stride == image[3]:
            return
    raise PeftcError(f"convpass convolves over the token grid; {site.name!r} gives {tuple(shape)}, whose middle "
                     f"dims are not the {tuple(image[2:]) if image is not None else '?'} image downsampled by one "
                     "stride (window partitions, as in MaxViT, not a spatial grid)")


@block_factory("convpass")
def convpass(site: Site, args: ConvpassArgs) -> Convpass:
    """Convpass: down, QuickGELU, 3x3 conv over the patch grid, QuickGELU, up (zero init)."""
    shape = site.shape("output")
    if shape is not None and len(shape) == 4:
        _check_token_grid(site, shape)
        return Convpass(int(shape[3]), (int(shape[1]), int(shape[2])), 0, args.dim, args.dropout, args.conv_init)
    if shape is None or len(shape) != 3:
        raise PeftcError(f"convpass reads a B x N x C token sequence or a B x H x W x C token grid; {site.name!r} "
                         f"gives {shape}")
    grid = _stage_grid(patch_grid(site), int(shape[1]))
    prefix = int(shape[1]) - grid[0] * grid[1]
    if prefix < 0:
        raise PeftcError(
            f"convpass at {site.name!r}: {shape[1]} tokens, fewer than the {grid[0]}x{grid[1]} patches"
        )
    return Convpass(int(shape[2]), grid, prefix, args.dim, args.dropout, args.conv_init)
