"""The artifact codec: tensors a block stores below 32 bits travel packed, ``8 // bits`` codes to a byte.

A block offers packed storage through the contract (:class:`~peftc.blocks.contract.Block`): ``packed_bits()``
names its tensors stored at fewer bits, ``pack(name, tensor) -> Packed`` and ``unpack(name, packed) -> Tensor``
convert (the quantiser — what the codes mean — is the block's). :func:`encode_delta` and :func:`decode_delta`
apply that to an artifact's tensors, whatever block they belong to: ``<key>:codes`` (uint8) and ``<key>:stats``
(float32 μ, σ) in place of ``<key>``, with ``{"bits", "shape"}`` in the manifest.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from peftc.blocks.contract import offers
from peftc.errors import ArtifactError, PeftcError

__all__ = ["CODES", "STATS", "Packed", "decode_delta", "encode_delta", "pack_codes", "packed_nbytes",
           "quantized_bits", "stored_nbytes", "unpack_codes"]

CODES = ":codes"  # artifact key suffixes of a packed tensor
STATS = ":stats"
PACKABLE_BITS = (1, 2, 4, 8)


@dataclass(frozen=True)
class Packed:
    """A quantised tensor as stored: codes packed ``8 // bits`` to a byte, plus float32 μ and σ."""

    codes: torch.Tensor  # uint8, 1-D, ⌈numel · bits / 8⌉ bytes
    mu: float
    sigma: float
    bits: int
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return self.codes.numel() + 8


def packed_nbytes(numel: int, bits: int) -> int:
    """Bytes a tensor of ``numel`` elements takes when stored at ``bits`` (32: plain float32)."""
    if bits != 32 and bits not in PACKABLE_BITS:
        raise PeftcError(f"bits must be one of {', '.join(map(str, (*PACKABLE_BITS, 32)))}, got {bits!r}")
    return 4 * numel if bits == 32 else math.ceil(numel * bits / 8) + 8


def pack_codes(idx: torch.Tensor, bits: int) -> torch.Tensor:
    """Integer codes in ``0 .. 2**bits - 1`` → uint8 bytes holding ``8 // bits`` codes each (low bits first)."""
    per = 8 // bits
    flat = idx.reshape(-1).to(torch.uint8).cpu()
    pad = (-flat.numel()) % per
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    shifts = torch.arange(per, dtype=torch.uint8) * bits
    return (flat.reshape(-1, per) << shifts).sum(dim=1, dtype=torch.uint8) if per > 1 else flat.clone()


def unpack_codes(codes: torch.Tensor, bits: int, numel: int) -> torch.Tensor:
    """The inverse of :func:`pack_codes`: the first ``numel`` codes, as int64."""
    per = 8 // bits
    shifts = torch.arange(per, dtype=torch.uint8) * bits
    mask = (1 << bits) - 1
    idx = (codes.reshape(-1, 1) >> shifts) & mask
    return idx.reshape(-1)[:numel].long()


# -- the artifact codec --------------------------------------------------------------------------------------


def _owner(root: nn.Module, name: str) -> tuple[nn.Module | None, str]:
    path, _, attr = name.rpartition(".")
    try:
        return (root.get_submodule(path) if path else root), attr
    except AttributeError:
        return None, attr


def quantized_bits(root: nn.Module, name: str) -> int:
    """Bits the tensor ``name`` (qualified under ``root``) is stored at; 32 unless its module quantises it."""
    module, attr = _owner(root, name)
    bits = module.packed_bits() if offers(module, "packed_bits") else {}
    return int(bits.get(attr, 32))


def stored_nbytes(root: nn.Module, name: str, tensor: torch.Tensor) -> int:
    """Bytes ``tensor`` takes in an artifact: packed when quantised, else its raw size."""
    bits = quantized_bits(root, name)
    return packed_nbytes(tensor.numel(), bits) if bits < 32 else tensor.numel() * tensor.element_size()


def _model_name(key: str) -> str:
    """``tasks/<task>/<name>`` or ``shared/<name>`` → ``<name>``."""
    scope, _, rest = key.partition("/")
    return rest.partition("/")[2] if scope == "tasks" else rest


def encode_delta(
    root: nn.Module, tensors: Mapping[str, torch.Tensor]
) -> tuple[dict[str, torch.Tensor], dict[str, dict[str, Any]]]:
    """Replace every quantised tensor of an artifact by ``<key>:codes`` (uint8) and ``<key>:stats`` (μ, σ).

    Returns the tensors to write and a manifest entry ``{key: {"bits": b, "shape": [...]}}``.
    """
    out: dict[str, torch.Tensor] = {}
    info: dict[str, dict[str, Any]] = {}
    for key, tensor in tensors.items():
        module, attr = _owner(root, _model_name(key))
        if module is None or quantized_bits(root, _model_name(key)) == 32:
            out[key] = tensor
            continue
        packed = module.pack(attr, tensor)
        out[key + CODES] = packed.codes
        out[key + STATS] = torch.tensor([packed.mu, packed.sigma], dtype=torch.float32)
        info[key] = {"bits": packed.bits, "shape": list(packed.shape)}
    return out, info


def decode_delta(
    root: nn.Module, tensors: Mapping[str, torch.Tensor], info: Mapping[str, Any]
) -> dict[str, torch.Tensor]:
    """The inverse of :func:`encode_delta`: packed entries become the float tensors the model trained with."""
    out = dict(tensors)
    for key, meta in info.items():
        try:
            codes, stats = out.pop(key + CODES), out.pop(key + STATS)
        except KeyError:
            raise ArtifactError(f"packed tensor {key!r} is missing its codes or stats") from None
        module, attr = _owner(root, _model_name(key))
        if module is None or not hasattr(module, "unpack"):
            raise ArtifactError(f"packed tensor {key!r} has no quantising module in this model")
        mu, sigma = (float(v) for v in stats.to(torch.float32))
        try:
            packed = Packed(codes, mu, sigma, int(meta["bits"]), tuple(meta["shape"]))
            out[key] = module.unpack(attr, packed)
        except PeftcError as exc:
            raise ArtifactError(f"packed tensor {key!r}: {exc}") from None
    return out


