"""The standardised quantiser of binary adapters: code levels, straight-through gradients, packing, exact reload."""

from __future__ import annotations

import math
from statistics import NormalDist

import pytest
import torch

from peftc.errors import PeftcError
from peftc.methods.adaptformer.quant import EPS, QuantLinear, levels, pack, quantize, thresholds, unpack
from peftc.storage.codec import decode_delta, encode_delta, packed_nbytes


def test_one_bit_levels_are_plus_minus_phi_inverse_of_three_quarters() -> None:
    assert levels(1) == pytest.approx((-0.6745, 0.6745), abs=5e-5)
    assert levels(1)[1] == pytest.approx(NormalDist().inv_cdf(0.75), abs=1e-12)
    assert thresholds(1) == (0.0,)


def test_two_bit_levels_and_thresholds() -> None:
    assert levels(2) == pytest.approx((-1.2657, -0.3778, 0.3778, 1.2657), abs=5e-5)
    # each threshold is the midpoint of its neighbours (the reference's fixed point), not Lloyd-Max's ±0.9816
    assert thresholds(2) == pytest.approx((-0.8217, 0.0, 0.8217), abs=5e-5)


def test_one_bit_quantisation_is_mean_plus_signed_std() -> None:
    w = torch.randn(64, 48) * 0.3 + 0.05
    q = quantize(w, 1)
    mu, sigma = w.mean(), w.std()
    expected = mu + 0.6744897501960817 * sigma * torch.sign(w - mu)
    assert torch.allclose(q, expected, atol=1e-6)
    assert q.unique().numel() == 2


def test_two_bit_quantisation_uses_four_levels_around_the_mean() -> None:
    w = torch.randn(4096)
    q = quantize(w, 2)
    mu, sigma = w.mean(), w.std()
    got = sorted(((q.unique() - mu) / sigma).tolist())
    assert got == pytest.approx([-1.2657, -0.3778, 0.3778, 1.2657], abs=1e-3)
    z = (w - mu) / (sigma + EPS)
    inner = z.abs() < 0.8217 - 1e-3
    assert torch.allclose((q[inner] - mu).abs() / sigma, torch.full_like(q[inner], 0.37775), atol=1e-3)


def test_thirty_two_bits_is_the_identity() -> None:
    w = torch.randn(8, 8)
    assert quantize(w, 32) is w


def test_bad_bit_width_is_a_user_error() -> None:
    with pytest.raises(PeftcError, match="bits must be one of"):
        quantize(torch.randn(3), 3)


@pytest.mark.parametrize("bits", [1, 2])
def test_straight_through_gradient_matches_the_reference(bits: int) -> None:
    """Reference: ``wb = q(z).data + z - z.data``, ``W = wb·σ + μ`` with μ, σ in the graph."""
    torch.manual_seed(1)
    w = torch.randn(32, 16, requires_grad=True)
    upstream = torch.randn(32, 16)
    (quantize(w, bits) * upstream).sum().backward()
    ours = w.grad.clone()

    w_ref = w.detach().clone().requires_grad_(True)
    mu, sigma = w_ref.mean(), w_ref.std()
    z = (w_ref - mu) / (sigma + EPS)
    q = quantize(w_ref.detach(), bits)
    level = (q - w_ref.detach().mean()) / w_ref.detach().std()
    wb = level.detach() + z - z.detach()
    ((wb * sigma + mu) * upstream).sum().backward()
    assert ours.abs().sum() > 0
    assert torch.allclose(ours, w_ref.grad, atol=1e-5)


def test_gradient_reaches_the_latent_weight_of_a_quantised_layer() -> None:
    layer = QuantLinear(16, 8, bits=1)
    layer(torch.randn(4, 16)).pow(2).sum().backward()
    assert layer.weight.grad is not None and layer.weight.grad.abs().sum() > 0


@pytest.mark.parametrize(("bits", "numel"), [(1, 768 * 32), (2, 768 * 32), (1, 13), (2, 7), (4, 5)])
def test_pack_unpack_is_exact_and_sized_numel_bits_over_eight(bits: int, numel: int) -> None:
    w = torch.randn(numel)
    p = pack(w, bits)
    assert p.codes.dtype == torch.uint8
    assert p.nbytes == math.ceil(numel * bits / 8) + 8 == packed_nbytes(numel, bits)
    assert torch.equal(unpack(p), quantize(w, bits))


def test_one_bit_adapter_weight_packs_to_3080_bytes() -> None:
    assert packed_nbytes(768 * 32, 1) == 3_072 + 8
    assert packed_nbytes(768 * 32, 32) == 768 * 32 * 4


def test_packing_a_decoded_tensor_gives_back_the_same_codes() -> None:
    w = torch.randn(32, 768) * 1e-3
    p = pack(w, 1)
    decoded = unpack(p)
    again = pack(decoded, 1, known=((p.mu, p.sigma),))
    assert torch.equal(again.codes, p.codes) and (again.mu, again.sigma) == (p.mu, p.sigma)
    # without the stored stats a decoded tensor is not a fixed point of the quantiser
    assert not torch.equal(quantize(decoded, 1), decoded)


def test_loaded_codes_are_used_as_is_until_training_moves_the_weight() -> None:
    torch.manual_seed(2)
    trained = QuantLinear(24, 12, bits=2)
    x = torch.randn(5, 24)
    with torch.no_grad():
        expected = trained(x)
    tensors, info = encode_delta(torch.nn.ModuleDict({"a": trained}), {"shared/a.weight": trained.weight.detach()})
    assert set(tensors) == {"shared/a.weight:codes", "shared/a.weight:stats"}
    assert info == {"shared/a.weight": {"bits": 2, "shape": [12, 24]}}

    fresh = QuantLinear(24, 12, bits=2)
    root = torch.nn.ModuleDict({"a": fresh})
    decoded = decode_delta(root, tensors, info)["shared/a.weight"]
    with torch.no_grad():
        fresh.weight.copy_(decoded)
        assert torch.equal(fresh(x), expected)
    # a training step moves the weight off the decoded grid: quantisation-aware training resumes
    opt = torch.optim.SGD(fresh.parameters(), lr=0.1)
    fresh(x).pow(2).sum().backward()
    opt.step()
    assert fresh.quantized_weight().unique().numel() <= 4
    assert not torch.equal(fresh.quantized_weight(), fresh.weight)


def test_decode_rejects_a_bit_width_the_layer_does_not_use() -> None:
    layer = QuantLinear(8, 8, bits=1)
    tensors, info = encode_delta(torch.nn.ModuleDict({"a": layer}), {"shared/a.weight": layer.weight.detach()})
    other = torch.nn.ModuleDict({"a": QuantLinear(8, 8, bits=2)})
    with pytest.raises(PeftcError, match="stored at 1 bits"):
        decode_delta(other, tensors, info)
