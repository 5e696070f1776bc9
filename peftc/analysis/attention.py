"""A traceable multi-head self-attention laid out like timm's ``Attention``.

torchvision's ``nn.MultiheadAttention`` keeps q, k and v in one opaque ``in_proj_weight`` and runs inside a
fused kernel, so a spec cannot reach its projections. :class:`SelfAttention` holds the *same* tensors as two
ordinary Linears — ``qkv: Linear(d, 3d)`` and ``proj: Linear(d, d)`` — and computes attention with the graph
shape of timm (``qkv → reshape → permute → unbind → q_norm/k_norm → scaled_dot_product_attention → transpose →
reshape → proj``). It is traced *through*, so ``qkv`` and ``proj`` become ``call_module`` nodes exactly like
timm's and one spec (``role: qkv``) selects both; graph passes that need the keys (ToMe) find them as the
second input of the ``scaled_dot_product_attention`` node on either library, or call
:meth:`SelfAttention.split_heads`.

It keeps ``nn.MultiheadAttention``'s call signature and results (``(out, weights or None)``), so the module
that called the original needs no change. :func:`peftc.analysis.canonical.canonicalize` performs the swap.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["SelfAttention"]


class SelfAttention(nn.Module):
    """Multi-head attention with a fused ``qkv`` Linear and an output ``proj`` Linear (timm's layout).

    ``batch_first`` inputs ``(B, N, C)``. Called as ``attn(x, x, x)`` (self-attention) it projects q, k, v
    with one ``qkv`` call; with distinct key/value tensors it projects each with its slice of the same weight,
    so it computes exactly what ``nn.MultiheadAttention`` computes for any call.
    """

    def __init__(self, dim: int, num_heads: int, *, bias: bool = True, attn_drop: float = 0.0,
                 batch_first: bool = True):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} is not divisible by num_heads {num_heads}")
        self.dim = dim
        self.embed_dim = dim  # nn.MultiheadAttention's name for it
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim**-0.5
        self.batch_first = batch_first
        self.qkv = nn.Linear(dim, dim * 3, bias=bias)
        self.q_norm = nn.Identity()
        self.k_norm = nn.Identity()
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = nn.Linear(dim, dim, bias=bias)

    @classmethod
    def from_multihead(cls, mha: nn.MultiheadAttention) -> SelfAttention:
        """A SelfAttention sharing ``mha``'s Parameter objects (no copy: optimizers still see them)."""
        if not can_convert(mha):
            raise ValueError("only batch-first nn.MultiheadAttention with equal q/k/v dims, no bias_k/bias_v "
                             "and no add_zero_attn can be converted")
        new = cls(mha.embed_dim, mha.num_heads, bias=mha.in_proj_bias is not None, attn_drop=mha.dropout)
        new.qkv.weight = mha.in_proj_weight
        new.proj.weight = mha.out_proj.weight
        if mha.in_proj_bias is not None:
            new.qkv.bias = mha.in_proj_bias
            new.proj.bias = mha.out_proj.bias
        new.train(mha.training)
        return new

    # -- the timm-shaped path -------------------------------------------------------------------------------
    def split_heads(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(B, N, C)`` → q, k, v, each ``(B, heads, N, head_dim)`` (k and q after ``k_norm``/``q_norm``)."""
        B, N, _ = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        return self.q_norm(q), self.k_norm(k), v

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor | None = None,
        value: torch.Tensor | None = None,
        key_padding_mask: torch.Tensor | None = None,
        need_weights: bool = True,
        attn_mask: torch.Tensor | None = None,
        average_attn_weights: bool = True,
        is_causal: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        key = query if key is None else key
        value = query if value is None else value
        if key is query and value is query:
            q, k, v = self.split_heads(query)
        else:
            q, k, v = self._split_each(query, key, value)
        B, N = query.shape[0], query.shape[1]
        mask = _merge_masks(attn_mask, key_padding_mask, q.dtype, is_causal, self.num_heads, q.shape[-2],
                            k.shape[-2])
        weights = None
        if need_weights:
            logits = (q * self.scale) @ k.transpose(-2, -1)
            if mask is not None:
                logits = logits + mask
            probs = logits.softmax(dim=-1)
            weights = probs.mean(dim=1) if average_attn_weights else probs
            x = self.attn_drop(probs) @ v
        else:
            x = F.scaled_dot_product_attention(
                q, k, v, attn_mask=mask, dropout_p=self.attn_drop.p if self.training else 0.0,
                is_causal=is_causal and mask is None,
            )
        x = x.transpose(1, 2).reshape(B, N, self.dim)
        x = self.proj(x)
        return x, weights

    def _split_each(
        self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Cross-attention call: each input projected with its own third of the fused weight."""
        w = self.qkv.weight.chunk(3)
        b = self.qkv.bias.chunk(3) if self.qkv.bias is not None else (None, None, None)
        out = []
        for i, t in enumerate((query, key, value)):
            B, N, _ = t.shape
            out.append(F.linear(t, w[i], b[i]).reshape(B, N, self.num_heads, self.head_dim).transpose(1, 2))
        return self.q_norm(out[0]), self.k_norm(out[1]), out[2]

    def extra_repr(self) -> str:
        return f"dim={self.dim}, num_heads={self.num_heads}, head_dim={self.head_dim}"


def can_convert(mha: nn.Module) -> bool:
    """Whether ``mha`` is an ``nn.MultiheadAttention`` SelfAttention reproduces exactly."""
    return (
        isinstance(mha, nn.MultiheadAttention)
        and mha.batch_first
        and mha._qkv_same_embed_dim
        and mha.in_proj_weight is not None
        and mha.bias_k is None
        and mha.bias_v is None
        and not mha.add_zero_attn
    )


def _merge_masks(
    attn_mask: torch.Tensor | None,
    key_padding_mask: torch.Tensor | None,
    dtype: torch.dtype,
    is_causal: bool,
    heads: int,
    n_q: int,
    n_k: int,
) -> torch.Tensor | None:
    """One additive float mask broadcastable to ``(B, heads, Nq, Nk)`` (boolean masks: True = masked out)."""
    if is_causal and attn_mask is None and key_padding_mask is None:
        return None  # SDPA's own causal path
    mask = None
    if attn_mask is not None:
        mask = _additive(attn_mask, dtype)
        if mask.dim() == 3:  # (B*heads, Nq, Nk), nn.MultiheadAttention's per-head layout
            mask = mask.reshape(-1, heads, n_q, n_k)
    if is_causal and attn_mask is None:
        mask = torch.full((n_q, n_k), float("-inf"), dtype=dtype).triu(1)
    if key_padding_mask is not None:
        pad = _additive(key_padding_mask, dtype)[:, None, None, :]
        mask = pad if mask is None else mask + pad
    return mask


def _additive(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    if mask.dtype == torch.bool:
        return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(mask, float("-inf"))
    return mask.to(dtype)
