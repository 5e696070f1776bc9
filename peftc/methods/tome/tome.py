"""Token merging (ToMe, Bolya et al., ICLR 2023): the merge a ``merge_tokens`` rule puts into each ViT block.

The ``merge_tokens`` pass (:mod:`peftc.methods.tome.merge_tokens`) rewrites a traced ViT so that, in each selected
block, the residual stream after the attention add goes through a :class:`TokenMerge` node before the MLP::

    size = initial_size(x)                                   # ones (B, N, 1), before the first merging block
    … attention(q, k, v, attn_mask=attention_mask(q, bias)) …
    x, size, bias = blocks.i.tome(x, size, k, bias)          # merge r tokens, track sizes
    x = x + mlp(norm2(x))

No class is patched: the merge is an ordinary module in the graph, its inputs and outputs are graph edges
(``blocks.i.tome``, ``….tome.x``, ``….tome.size``, ``….tome.bias``), and ``r`` is a plain attribute of each
module, so it can be changed between forward passes (:func:`set_r`) without recompiling anything.

What one merge does (facebookresearch/ToMe ``tome/merge.py``, as the METHODS card states it):

* **metric** — the block's keys averaged over heads, ``(B, N, head_dim)``, L2-normalised;
* **bipartite soft matching** — A = even token indices, B = odd; ``scores = A·Bᵀ``; protected tokens (cls, and
  DeiT's distillation token) never take part: a protected A token's score row and a protected B token's score
  column are −∞. Each A token keeps its best B match; the ``r`` A tokens with the highest best-score are merged
  into their match (scatter-add), the others stay;
* **order** — protected tokens first in their original order, then the unmerged A tokens (ascending index),
  then B. With one protected token (cls) this is exactly ToMe's ``cat([unmerged A, B])``, so cls stays at index
  0; DeiT's distillation token (B[0]) stays at index 1, where timm's head reads it (ToMe itself would move it);
* **sizes** — a merged token is the size-weighted mean of its parts and its size is their sum, so sizes always
  sum to the input token count;
* **proportional attention** — ``log(size)`` is added to the attention logits per key column. The bias is
  handed to ``scaled_dot_product_attention`` as its float ``attn_mask``, so fused kernels stay usable. As in
  ToMe, there is no bias until a block has actually merged tokens: with ``r = 0`` everywhere the model computes
  exactly what the backbone computes;
* **r** — capped at ``(tokens − protected) // 2`` per block; a schedule ``(r, inflection)`` runs linearly from
  ``int(r·(1 − inflection))`` to ``2r − that`` over the merging blocks (:func:`merge_schedule`).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch
from torch import fx, nn

from peftc.blocks.contract import Block
from peftc.errors import PeftcError

__all__ = [
    "TokenMerge",
    "add_attention_bias",
    "attention_mask",
    "bipartite_soft_matching",
    "get_r",
    "initial_size",
    "merge_schedule",
    "merge_wavg",
    "set_prop_attn",
    "set_r",
    "token_merges",
]


# -- schedules ---------------------------------------------------------------------------------------------
def merge_schedule(num_layers: int, r: int | Sequence[int], inflection: float = 0.0) -> list[int]:
    """r for each of ``num_layers`` merging blocks.

    ``r`` an int with ``inflection`` 0 → the same r everywhere; with an inflection → linear from
    ``min = int(r·(1 − inflection))`` to ``max = 2r − min`` (``(16, −1)`` over 12 layers = 32, 29, …, 2, 0;
    values are truncated toward zero, as ToMe's ``parse_r`` does). A list gives r per layer and is padded with
    zeros when shorter than the number of layers (ToMe's convention).
    """
    if num_layers < 0:
        raise ValueError(f"num_layers must be >= 0, got {num_layers}")
    if isinstance(r, bool):
        raise PeftcError(f"r must be an int or a list of ints, got {r!r}")
    if isinstance(r, Sequence):
        values = [int(v) for v in r]
        if inflection:
            raise PeftcError("an inflection applies to a single r, not to a per-layer list")
        if len(values) > num_layers:
            raise PeftcError(f"r lists {len(values)} values, but only {num_layers} blocks merge tokens")
        if any(v < 0 for v in values):
            raise PeftcError(f"r values must be >= 0, got {values}")
        return values + [0] * (num_layers - len(values))
    r = int(r)
    if r < 0:
        raise PeftcError(f"r must be >= 0, got {r}")
    if num_layers == 0:
        return []
    low = int(r * (1.0 - inflection))
    high = 2 * r - low
    step = (high - low) / (num_layers - 1) if num_layers > 1 else 0.0
    values = [int(low + step * i) for i in range(num_layers)]
    if any(v < 0 for v in values):
        raise PeftcError(f"the schedule (r={r}, inflection={inflection}) gives negative r values: {values}")
    return values


# -- the merge ---------------------------------------------------------------------------------------------
def bipartite_soft_matching(
    metric: torch.Tensor, r: int, protected: int = 1
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Which tokens merge: ``(unmerged A, merged A, their B destinations)`` as ``(B, ·, 1)`` index tensors.

    ``metric`` is ``(B, N, C)``; the first ``protected`` tokens are never merged and never merged into.
    ``r`` must already be capped (``0 < r <= (N − protected) // 2``). Indices of the unmerged A tokens are
    sorted ascending.
    """
    with torch.no_grad():
        metric = metric / metric.norm(dim=-1, keepdim=True)
        a, b = metric[:, ::2], metric[:, 1::2]
        scores = a @ b.transpose(-1, -2)
        keep_a, keep_b = (protected + 1) // 2, protected // 2
        if keep_a:
            rows = torch.arange(scores.shape[1], device=scores.device) < keep_a
            scores = scores.masked_fill(rows[None, :, None], float("-inf"))
        if keep_b:
            cols = torch.arange(scores.shape[2], device=scores.device) < keep_b
            scores = scores.masked_fill(cols[None, None, :], float("-inf"))
        node_max, node_idx = scores.max(dim=-1)
        edge_idx = node_max.argsort(dim=-1, descending=True, stable=True)[..., None]
        unm_idx = edge_idx[:, r:].sort(dim=1).values
        src_idx = edge_idx[:, :r]
        dst_idx = node_idx[..., None].gather(dim=1, index=src_idx)
    return unm_idx, src_idx, dst_idx


def _merge(t: torch.Tensor, unm_idx: torch.Tensor, src_idx: torch.Tensor, dst_idx: torch.Tensor,
           protected: int) -> torch.Tensor:
    """Sum-merge ``t`` (B, N, C) along tokens with the matching's indices; protected tokens first, in order."""
    src, dst = t[:, ::2], t[:, 1::2]
    n, _, c = src.shape
    unm = src.gather(dim=1, index=unm_idx.expand(n, unm_idx.shape[1], c))
    moved = src.gather(dim=1, index=src_idx.expand(n, src_idx.shape[1], c))
    dst = dst.scatter_reduce(1, dst_idx.expand(n, dst_idx.shape[1], c), moved, reduce="sum")
    if protected <= 1:
        return torch.cat([unm, dst], dim=1)  # cls (if any) is unm[:, 0]
    front = [unm[:, i // 2: i // 2 + 1] if i % 2 == 0 else dst[:, i // 2: i // 2 + 1] for i in range(protected)]
    return torch.cat([*front, unm[:, (protected + 1) // 2:], dst[:, protected // 2:]], dim=1)


def merge_wavg(
    x: torch.Tensor, size: torch.Tensor, metric: torch.Tensor, r: int, protected: int = 1
) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge ``r`` tokens of ``x`` (B, N, C): size-weighted means, sizes added. Returns ``(x, size)``."""
    unm_idx, src_idx, dst_idx = bipartite_soft_matching(metric, r, protected)
    merged = _merge(torch.cat([x * size, size], dim=-1), unm_idx, src_idx, dst_idx, protected)  # one pass
    size = merged[..., -1:]
    return merged[..., :-1] / size, size


class TokenMerge(Block):
    """One block's merge: ``(x, size, keys, bias) -> (x, size, bias)``.

    ``x`` (B, N, C) is the residual stream after the attention add, ``size`` (B, N, 1) the token sizes,
    ``keys`` the block's attention keys (B, heads, N, head_dim), ``bias`` the proportional-attention bias the
    block's attention used (None before the first real merge). ``r``, ``prop_attn`` and ``protected`` are plain
    attributes: change them between forward passes.
    """

    def __init__(self, r: int = 0, *, protected: int = 1, prop_attn: bool = True):
        super().__init__()
        self.r = r
        self.protected = protected
        self.prop_attn = prop_attn

    @property
    def r(self) -> int:
        return self._r

    @r.setter
    def r(self, value: int) -> None:
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise PeftcError(f"r must be an int >= 0, got {value!r}")
        self._r = value

    def effective_r(self, tokens: int) -> int:
        """``r`` capped at ``(tokens − protected) // 2`` (never below 0)."""
        return max(0, min(self._r, (tokens - self.protected) // 2))

    def forward(
        self, x: torch.Tensor, size: torch.Tensor, keys: torch.Tensor, bias: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        r = self.effective_r(x.shape[1])
        if r == 0:
            return x, size, bias
        x, size = merge_wavg(x, size, keys.mean(dim=1), r, self.protected)
        return x, size, size_bias(size) if self.prop_attn else None

    def extra_repr(self) -> str:
        return f"r={self._r}, protected={self.protected}, prop_attn={self.prop_attn}"


# -- graph helpers (call_function targets of the rewritten graph) ------------------------------------------
def initial_size(x: torch.Tensor) -> torch.Tensor:
    """Every token starts with size 1: ``(B, N, 1)`` ones in ``x``'s dtype."""
    return torch.ones_like(x[..., :1])


def size_bias(size: torch.Tensor) -> torch.Tensor:
    """``log(size)`` as an additive attention bias over key columns: ``(B, N, 1)`` → ``(B, 1, 1, N)``."""
    return size.log().transpose(1, 2).unsqueeze(1)


def attention_mask(query: torch.Tensor, bias: torch.Tensor | None, mask: torch.Tensor | None = None
                   ) -> torch.Tensor | None:
    """The ``attn_mask`` for ``scaled_dot_product_attention``: the original mask plus the size bias."""
    if bias is None:
        return mask
    bias = bias.to(query.dtype)
    if mask is None:
        return bias
    if mask.dtype == torch.bool:  # True = attend (SDPA's boolean convention)
        mask = torch.zeros(mask.shape, dtype=query.dtype, device=mask.device).masked_fill(~mask, float("-inf"))
    return mask + bias


def add_attention_bias(logits: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """Non-fused attention: the size bias added to the logits right before the softmax."""
    return logits if bias is None else logits + bias.to(logits.dtype)


for _fn in (initial_size, attention_mask, add_attention_bias):
    fx.wrap(_fn.__name__)  # keep them single nodes if a rewritten graph is ever traced again


# -- run-time control --------------------------------------------------------------------------------------
def _in_graph_order(model: nn.Module, kind: type[nn.Module]) -> Iterator[tuple[str, nn.Module]]:
    """``(path, module)`` of every ``kind`` module, in the order the graph calls them."""
    seen: set[int] = set()
    for prefix, gm in ((p, m) for p, m in model.named_modules() if isinstance(m, fx.GraphModule)):
        for node in gm.graph.nodes:
            if node.op != "call_module":
                continue
            module = gm.get_submodule(str(node.target))
            if isinstance(module, kind) and id(module) not in seen:
                seen.add(id(module))
                yield (f"{prefix}.{node.target}" if prefix else str(node.target)), module
    for path, module in model.named_modules():
        if isinstance(module, kind) and id(module) not in seen:
            seen.add(id(module))
            yield path, module


def token_merges(model: nn.Module) -> list[TokenMerge]:
    """The model's :class:`TokenMerge` modules in graph order (one per merging block)."""
    return [m for _, m in _in_graph_order(model, TokenMerge)]  # type: ignore[misc]


def _merges_or_error(model: nn.Module) -> list[TokenMerge]:
    merges = token_merges(model)
    if not merges:
        raise PeftcError("this model merges no tokens (compile it with a spec that has a merge_tokens rule)")
    return merges


def set_r(model: nn.Module, r: int | Sequence[int], inflection: float = 0.0) -> list[int]:
    """Set how many tokens each block merges (int, per-layer list, or ``(r, inflection)``); returns the list."""
    merges = _merges_or_error(model)
    values = merge_schedule(len(merges), r, inflection)
    for module, value in zip(merges, values):
        module.r = value
    return values


def get_r(model: nn.Module) -> list[int]:
    """The r of each merging block, in graph order."""
    return [m.r for m in _merges_or_error(model)]


def set_prop_attn(model: nn.Module, enabled: bool) -> None:
    """Switch proportional attention on or off in every merging block."""
    for module in _merges_or_error(model):
        module.prop_attn = bool(enabled)
