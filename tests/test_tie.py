"""Replacement Learning (``tie``): tied blocks really lose their parameters, compute with their neighbours'
through ``a·θ_prev + b·θ_next``, train, and survive deepcopy, ``.to``, state dicts and save/load."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import peftc
from peftc.analysis.backbones import build_backbone
from peftc.errors import SpecError
from peftc.methods.replacement.tie import tied_blocks
from peftc.methods.replacement.tied import TiedLayer, TieScalars, mix

from .conftest import synthetic_task, train_steps

VIT_B_BLOCK = 7_087_872  # parameters of one ViT-B/16 block (12 x this + embeddings + head = 86,567,656)


def _n(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def _tied(model: peftc.runtime.model.Compiled) -> dict[str, tuple[str, str]]:
    return dict(tied_blocks(model.ledger.rewrites))


def _skeleton(build) -> nn.Module:
    """A full-size model with zeroed weights, built on the meta device (counts need no random init)."""
    with torch.device("meta"):
        module = build()
    module.to_empty(device="cpu")
    with torch.no_grad():
        for t in (*module.parameters(), *module.buffers()):
            t.zero_()
    return module.eval()


def _set_scalars(model: peftc.runtime.model.Compiled, a: float, b: float) -> None:
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, TieScalars):
                m.a.fill_(a)
                m.b.fill_(b)


def _copy_block(reference: nn.Module, src: str, dst: str) -> None:
    """In ``reference``, give block ``dst`` the parameters of block ``src`` (buffers stay ``dst``'s own)."""
    with torch.no_grad():
        source = dict(reference.get_submodule(src).named_parameters())
        for name, p in reference.get_submodule(dst).named_parameters():
            p.copy_(source[name])


# -- counts ---------------------------------------------------------------------------------------------------


def test_vit_base_every_other_block() -> None:
    import timm

    backbone = _skeleton(lambda: timm.create_model("vit_base_patch16_224"))
    model = peftc.compile("replacement", backbone)
    tied = _tied(model)
    assert list(tied) == [f"blocks.{i}" for i in (1, 3, 5, 7, 9, 11)]
    assert tied["blocks.5"] == ("blocks.4", "blocks.6")
    assert tied["blocks.11"] == ("blocks.10", "blocks.10")  # end of the run: the one neighbour, reflected
    assert _n(backbone.blocks[1]) == VIT_B_BLOCK
    assert _n(backbone) - _n(model) == 6 * VIT_B_BLOCK - 12
    r = model.report
    assert (r.removed_params, r.added_params) == (6 * VIT_B_BLOCK, 12)
    rule = next(x for x in r.rules if x.label == "replacement")
    assert (rule.op, rule.removed_params, rule.added_params) == ("tie", 6 * VIT_B_BLOCK, 12)
    keys = model.net.state_dict().keys()
    assert not any(k.startswith("blocks.1.") and not k.startswith("blocks.1.tie.") for k in keys)
    assert {"blocks.1.tie.a", "blocks.1.tie.b", "blocks.0.attn.qkv.weight"} <= set(keys)


def test_torchvision_vit_b_16() -> None:
    import torchvision

    backbone = _skeleton(lambda: torchvision.models.vit_b_16())
    model = peftc.compile("replacement", backbone)
    assert list(_tied(model)) == [f"encoder.layers.encoder_layer_{i}" for i in (1, 3, 5, 7, 9, 11)]
    assert _n(backbone) - _n(model) == 6 * VIT_B_BLOCK - 12


def test_resnet50_counts_and_choices() -> None:
    reference = build_backbone("resnet50").module
    model = peftc.compile("replacement", "resnet50")
    tied = _tied(model)
    assert tied == {"layer1.2": ("layer1.1", "layer1.1"), "layer2.2": ("layer2.1", "layer2.3"),
                    "layer3.2": ("layer3.1", "layer3.3"), "layer3.4": ("layer3.3", "layer3.5"),
                    "layer4.2": ("layer4.1", "layer4.1")}
    blocks = sum(_n(reference.get_submodule(b)) for b in tied)
    assert _n(reference) - _n(model) == blocks - 2 * len(tied)
    assert model.report.removed_params == blocks
    # the strict reading of the card: only blocks with two same-shape neighbours
    strict = peftc.compile("replacement", "resnet50", edge="skip")
    assert list(_tied(strict)) == ["layer2.2", "layer3.2", "layer3.4"]
    blocks = sum(_n(reference.get_submodule(b)) for b in _tied(strict))
    assert _n(reference) - _n(strict) == blocks - 6
    # the optimizer holds the smaller set
    opt = torch.optim.SGD(strict.trainable_parameters(), lr=0.1)
    held = sum(p.numel() for g in opt.param_groups for p in g["params"])
    assert held == _n(reference) - blocks + 6 == strict.report.trainable_params


def test_resnet34_and_resnet18() -> None:
    assert list(_tied(peftc.compile("replacement", "resnet34"))) == [
        "layer1.1", "layer2.2", "layer3.2", "layer3.4", "layer4.2"]
    assert _tied(peftc.compile("replacement", "resnet18")) == {"layer1.1": ("layer1.0", "layer1.0")}


# -- errors ---------------------------------------------------------------------------------------------------


def test_block_without_same_shape_neighbour_is_an_error() -> None:
    with pytest.raises(SpecError) as err:
        peftc.compile("replacement", "resnet18", offset=0)  # layer2.0: downsample, and layer2.1 differs
    msg = str(err.value)
    assert "replacement.yaml" in msg and "cannot tie 'layer2.0'" in msg
    assert "first block of 'layer2'" in msg and "'layer2.1' has different parameters" in msg
    with pytest.raises(SpecError, match=r"cannot tie 'layer1\.1' with both neighbours \(edge: error\)"):
        peftc.compile("replacement", "resnet18", edge="error")
    doc = {"name": "t", "rules": [{"tie": {"every": 1, "target": {"name": "layer3.*"}}}]}
    with pytest.raises(SpecError, match="is tied too"):
        peftc.compile(doc, "resnet34")
    with pytest.raises(SpecError, match=r"rules\[0\]\.tie\.every: Input should be greater than or equal to 1"):
        peftc.compile({"name": "t", "rules": [{"tie": {"every": 0}}]}, "resnet18")


def test_target_limits_the_blocks() -> None:
    doc = {"name": "t", "rules": [{"tie": {"target": {"name": "layer3.*"}}}]}
    assert list(_tied(peftc.compile(doc, "resnet34"))) == ["layer3.2", "layer3.4"]


# -- what a tied layer computes -------------------------------------------------------------------------------


@pytest.mark.parametrize(("a", "b", "side"), [(1.0, 0.0, 0), (0.0, 1.0, 1)])
def test_cnn_computes_with_a_neighbours_parameters(a: float, b: float, side: int) -> None:
    reference = build_backbone("resnet34").module.eval()
    model = peftc.compile("replacement", reference)
    _set_scalars(model, a, b)
    for block, neighbours in _tied(model).items():
        _copy_block(reference, neighbours[side], block)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(model(x), reference(x))


def test_vit_computes_with_the_previous_blocks_parameters() -> None:
    import timm

    reference = timm.create_model("vit_tiny_patch16_224", img_size=32, weight_init="skip").eval()
    with torch.no_grad():  # 'skip' leaves these uninitialised
        reference.pos_embed.normal_(std=0.02)
        reference.cls_token.normal_(std=0.02)
    model = peftc.compile("replacement", reference)
    _set_scalars(model, 1.0, 0.0)
    for block, (prev, _) in _tied(model).items():
        _copy_block(reference, prev, block)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(model(x), reference(x))


@pytest.mark.parametrize("make", [lambda: nn.Linear(6, 4), lambda: nn.Conv2d(3, 4, 3, stride=2, padding=1),
                                  lambda: nn.LayerNorm(6), lambda: nn.BatchNorm2d(3)])
def test_tied_layer_against_a_manual_forward(make) -> None:
    prev, own, nxt = make(), make(), make()
    for p in (*prev.parameters(), *nxt.parameters()):
        nn.init.normal_(p)
    names = [n for n, _ in own.named_parameters()]
    layer = TiedLayer(own, names)
    assert not list(layer.parameters()) and list(layer.state_dict()) == [n for n, _ in own.named_buffers()]
    a = torch.tensor(0.7, requires_grad=True)
    b = torch.tensor(0.2, requires_grad=True)
    pp, nn_ = dict(prev.named_parameters()), dict(nxt.named_parameters())
    x = torch.randn(2, 3, 8, 8) if isinstance(own, (nn.Conv2d, nn.BatchNorm2d)) else torch.randn(2, 5, 6)
    out = layer.train()(x, tie=(a, b, *[t for n in names for t in (pp[n], nn_[n])]))
    w = a * pp["weight"] + b * nn_["weight"]
    bias = a * pp["bias"] + b * nn_["bias"]
    if isinstance(own, nn.Linear):
        manual = F.linear(x, w, bias)
    elif isinstance(own, nn.Conv2d):
        manual = F.conv2d(x, w, bias, stride=2, padding=1)
    elif isinstance(own, nn.LayerNorm):
        manual = F.layer_norm(x, (6,), w, bias, own.eps)
    else:
        manual = F.batch_norm(x, torch.zeros(3), torch.ones(3), w, bias, training=True)
        assert layer.num_batches_tracked.item() == 1 and not torch.equal(layer.running_mean, torch.zeros(3))
    torch.testing.assert_close(out, manual, rtol=0, atol=1e-6)
    # gradients reach both neighbours and both scalars, through the mix: dθ_prev = a·dθ̃, dθ_next = b·dθ̃
    g = torch.randn_like(out)
    out.backward(g)
    (gw,) = torch.autograd.grad(manual, [w], g)
    torch.testing.assert_close(pp["weight"].grad, 0.7 * gw)
    torch.testing.assert_close(nn_["weight"].grad, 0.2 * gw)
    assert a.grad is not None and b.grad is not None and a.grad.abs() > 0 and b.grad.abs() > 0


@pytest.mark.parametrize("reflect", [False, True])
def test_mix_is_one_autograd_node_with_exact_gradients(reflect: bool) -> None:
    """The mix is one node (no per-term products kept for backward) and its gradients are autograd's: double
    precision gradcheck, including a neighbour read for both terms (``edge: reflect``)."""
    a = torch.tensor(0.7, dtype=torch.float64, requires_grad=True)
    b = torch.tensor(0.2, dtype=torch.float64, requires_grad=True)
    prev = torch.randn(4, 3, 3, 3, dtype=torch.float64, requires_grad=True)
    nxt = prev if reflect else torch.randn(4, 3, 3, 3, dtype=torch.float64, requires_grad=True)
    out = mix(a, b, prev, nxt)
    assert type(out.grad_fn).__name__ == "_MixBackward" and out.grad_fn.next_functions[0][0] is not None
    torch.testing.assert_close(out, a * prev + b * nxt)
    assert torch.autograd.gradcheck(mix, (a, b, prev, nxt))
    with torch.no_grad():
        assert mix(a, b, prev, nxt).grad_fn is None


def test_gradients_reach_neighbours_and_scalars_in_the_model() -> None:
    model = peftc.compile("replacement", "resnet34", num_classes=3)
    model.train()
    F.cross_entropy(model(torch.randn(2, 3, 32, 32)), torch.tensor([0, 2])).backward()
    params = dict(model.net.named_parameters())
    for name in ("layer3.2.tie.a", "layer3.2.tie.b", "layer3.1.conv1.weight", "layer3.3.conv1.weight",
                 "layer3.1.bn2.weight", "layer3.3.bn2.bias"):
        assert params[name].grad is not None and params[name].grad.abs().sum() > 0, name
    assert not any(n.startswith("layer3.2.") and not n.startswith("layer3.2.tie.") for n in params)


# -- training, state, copies, artifacts -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def resnet18() -> nn.Module:
    return build_backbone("resnet18").module


def test_training_lowers_loss_and_moves_the_scalars(resnet18: nn.Module) -> None:
    model = peftc.compile("replacement", resnet18, num_classes=3)
    images, labels = synthetic_task(n=6, size=16)
    losses = train_steps(model, images, labels, steps=5, lr=1e-3)
    assert losses[-1] < losses[0]
    a = dict(model.net.named_parameters())["layer1.1.tie.a"]
    assert a.item() != 0.5


def test_deepcopy_to_and_state_dict(resnet18: nn.Module) -> None:
    model = peftc.compile("replacement", resnet18, num_classes=3)
    train_steps(model, *synthetic_task(n=6, size=16), steps=1)
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        expected = model(x)
        twin = copy.deepcopy(model)
        assert torch.equal(twin(x), expected)
        assert not {id(p) for p in twin.parameters()} & {id(p) for p in model.parameters()}
        # the copy's tied layer reads the copy's neighbour: changing it changes the copy only
        dict(twin.net.named_parameters())["layer1.0.conv1.weight"].mul_(2)
        assert not torch.equal(twin(x), expected) and torch.equal(model(x), expected)
        double = copy.deepcopy(model).to(torch.float64)
        assert double(x.double()).dtype == torch.float64
        torch.testing.assert_close(double(x.double()).float(), expected, rtol=1e-4, atol=1e-4)
        again = peftc.compile("replacement", resnet18, num_classes=3)
        again.load_state_dict(model.state_dict())
        assert torch.equal(again(x), expected)
    assert len(model.state_dict()) == len(dict(model.named_parameters())) + len(dict(model.named_buffers()))


def test_fold_unties_every_layer_and_deploys_at_backbone_cost(resnet18: nn.Module) -> None:
    from peftc.export import fold

    model = peftc.compile("replacement", resnet18, num_classes=3)
    train_steps(model, *synthetic_task(n=6, size=16), steps=2, lr=1e-2)  # moves scalars, neighbours, BN stats
    model.eval()
    folded = fold(model)
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(folded.module(x), model(x), rtol=1e-5, atol=1e-5)
    kinds = {type(m) for m in folded.module.modules()}
    assert not kinds & {TiedLayer, TieScalars, nn.BatchNorm2d}  # untied, then every BN merged into its conv
    assert folded.report.counts() == {"tied": 4, "batchnorm": 20}
    assert folded.report.remaining == {}
    # a tied block deploys as what it replaced: the same parameter count as the untouched backbone, folded
    probe = fold(peftc.compile("linear_probe", resnet18, num_classes=3))
    assert folded.report.params_after == probe.report.params_after
    assert folded.report.params_after > folded.report.params_before  # layer1.1 etc. own their mixed copies again


def test_fold_materialises_a_parameter_read_outside_any_layer() -> None:
    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(4, 4)
            self.gamma = nn.Parameter(torch.randn(4))  # read directly: a get_attr, mixed by a call_function

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x + self.gamma * self.fc(x)

    from peftc.export import fold

    net = nn.Sequential(*(Block() for _ in range(3)))
    model = peftc.compile({"name": "t", "rules": [{"tie": {"init": [0.3, 0.6]}}]}, net)
    folded = fold(model)
    x = torch.randn(5, 4)
    with torch.no_grad():
        torch.testing.assert_close(folded.module(x), model(x), rtol=0, atol=1e-6)
    gamma = dict(folded.module.named_parameters())["1.gamma"]
    torch.testing.assert_close(gamma, 0.3 * net[0].gamma + 0.6 * net[2].gamma)
    assert sum(p.numel() for p in folded.module.parameters()) == _n(net)


def test_per_task_scalars(resnet18: nn.Module) -> None:
    doc = {"name": "t", "rules": [{"tie": {"task_state": "new", "init": [0.9, 0.1]}}]}
    model = peftc.compile(doc, resnet18)
    model.add_task("b")
    first = dict(model.net.named_parameters())["layer1.1.tie.a"]
    model.set_task("b")
    second = dict(model.net.named_parameters())["layer1.1.tie.a"]
    assert first is not second and second.item() == pytest.approx(0.9)


def _plain_stack() -> nn.Sequential:
    """A VGG-style plain Sequential: the children are single layers, three same-shape conv → BN pairs."""
    torch.manual_seed(0)
    layers: list[nn.Module] = [nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU()]
    for _ in range(3):
        layers += [nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU()]
    return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4)).eval()


def test_plain_sequential_ties_layers_with_scalars_beside_them() -> None:
    backbone = _plain_stack()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # fx warned "Failed to fetch module 6.tie" before the scalars moved out
        model = peftc.compile("replacement", backbone)
    tied = _tied(model)
    # the convs after the first form a run (3, 6, 9); all four BNs another: positions 1 and 3 of each are tied
    assert tied == {"6": ("3", "9"), "4": ("1", "7"), "10": ("7", "7")}
    assert isinstance(model.net.get_submodule("6"), TiedLayer)
    assert isinstance(model.net.get_submodule("6_tie"), TieScalars)
    x = torch.randn(2, 3, 16, 16)
    train_steps(model, *synthetic_task(4, n=4, size=16), steps=1)
    assert model.net.get_submodule("3").weight.grad is not None  # the neighbour learns through the tie
    assert model(x).shape == (2, 4)


def test_branchy_blocks_tie() -> None:
    """ShuffleNet's blocks: a stage's first block (two branches, stride 2) is a run of its own."""
    import torchvision

    torch.manual_seed(0)
    net = torchvision.models.ShuffleNetV2(stages_repeats=[3, 2, 2], stages_out_channels=[8, 16, 32, 64, 128],
                                          num_classes=4)
    model = peftc.compile("replacement", net.eval())
    assert "stage2.2" in _tied(model) and model(torch.randn(2, 3, 32, 32)).shape == (2, 4)


def test_dense_blocks_say_why_nothing_ties() -> None:
    class Dense(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.layers = nn.ModuleDict({f"l{i}": nn.Conv2d(3 + 2 * i, 2, 1) for i in range(3)})

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            for layer in self.layers.values():
                x = torch.cat([x, layer(x)], 1)
            return x.mean((2, 3))

    with pytest.raises(SpecError, match=r"the 3 blocks of 'layers' differ .* 'layers.l0' vs 'layers.l1': weight"):
        peftc.compile("replacement", Dense())
