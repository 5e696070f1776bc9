"""The tap of a vision-language pair: the visual encoder's graph made to output the tokens a stream reads.

MemVP (like LLaVA) reads a CLIP ViT's *penultimate* block through the final norm, without CLS. The spec's
``pair:`` section says which block, whether the norm applies and whether the prepended tokens go; this pass makes
the graph's output ``norm(block_k(…))[:, prefix:]`` and drops what only the old output needed (the blocks after
``k``, the head). Everything is found by structure: ``mlp_residual`` is each block's output, ``final_norm`` the
norm after the last block, and the prepended tokens (CLS, registers) are those the first block sees beyond the
patch grid the stem makes. The modules of the dropped blocks stay (frozen, and any rule's blocks in them counted:
the official MemVP code also keeps an adapter in the CLIP block it skips).
"""

from __future__ import annotations

import math
import operator

import torch
from torch import fx

from peftc.analysis.roles import final_norm, mlp_residual, stem, transformer_layout
from peftc.errors import PeftcError
from peftc.language.schema import PairSection
from peftc.passes.base import CompileState, Rewrite

__all__ = ["tap_tokens"]


def tap_tokens(state: CompileState, pair: PairSection) -> torch.Size:
    """Make ``state.gm`` output the tokens ``pair`` names; returns their example shape ``(1, tokens, width)``."""
    index = state.index
    blocks = mlp_residual(index)
    if not blocks:
        raise PeftcError("the visual encoder has no transformer blocks (pre-norm attention + MLP sublayers): no "
                         "block's tokens to feed a language model")
    if not -len(blocks) <= pair.block < len(blocks):
        raise PeftcError(f"pair.block {pair.block} is outside the encoder's {len(blocks)} blocks")
    tapped = blocks[pair.block].node
    prefix = _prefix_tokens(state) if pair.prefix_tokens == "drop" else 0
    graph = state.gm.graph
    out = tapped
    if pair.norm:
        norms = final_norm(index)
        if not norms:
            raise PeftcError("pair.norm: the visual encoder has no norm after its last block")
        with graph.inserting_after(out):
            out = _mark(graph.call_module(str(norms[0].node.target), (out,)), blocks[pair.block].name, "norm")
    if prefix:
        with graph.inserting_after(out):
            out = _mark(graph.call_function(operator.getitem, (out, (slice(None), slice(prefix, None)))),
                        blocks[pair.block].name, "tokens")
    next(n for n in graph.nodes if n.op == "output").args = (out,)
    graph.eliminate_dead_code()
    detail = {"block": pair.block, "norm": pair.norm, "prefix_tokens_dropped": prefix, "stream": pair.stream}
    state.ledger.rewrites.append(Rewrite("pair", "tap", blocks[pair.block].name, detail))
    state.graph_changed()
    shape = state.shape_of(out)
    assert shape is not None
    return shape


def _mark(node: fx.Node, block: str, what: str) -> fx.Node:
    node.meta.update(peftc_rule="pair", peftc_name=f"{block}.tap_{what}")
    return node


def _prefix_tokens(state: CompileState) -> int:
    """Tokens the first block sees beyond the stem's patch grid (CLS, registers), prepended as timm/CLIP do."""
    layout = transformer_layout(state.gm)
    subs = sorted([*layout.attn, *layout.mlp], key=lambda s: list(state.gm.graph.nodes).index(s.add))
    grids = [s for s in (state.shape_of(c.node) for c in stem(state.index)) if s is not None and len(s) == 4]
    tokens = state.shape_of(subs[0].skip) if subs else None
    if tokens is None or len(tokens) != 3 or not grids:
        return 0
    return max(0, int(tokens[1]) - math.prod(grids[-1][2:]))  # (B, C, h, w): h·w patches
