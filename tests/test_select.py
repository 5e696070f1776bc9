"""Selectors: every key, the matching order, and the diagnostics when nothing matches."""

from __future__ import annotations

import pytest

from peftc.analysis.backbones import build_backbone
from peftc.analysis.index import NodeIndex, block_positions
from peftc.analysis.select import select
from peftc.analysis.trace import trace
from peftc.errors import SpecError
from peftc.language import Selector
from peftc.language.predicate import Predicate, PredicateSyntaxError, UnknownName


@pytest.fixture(scope="module")
def resnet18() -> NodeIndex:
    module = build_backbone("resnet18").module
    return NodeIndex(trace(module), block_positions(module))


@pytest.fixture(scope="module")
def vit_tiny() -> NodeIndex:
    module = build_backbone("timm:vit_tiny_patch16_224").module
    return NodeIndex(trace(module), block_positions(module))


def names(index: NodeIndex, **keys: object) -> list[str]:
    return [c.name for c in select(Selector(**keys), index)]


def test_type_matches_along_the_mro(resnet18: NodeIndex, vit_tiny: NodeIndex) -> None:
    assert len(names(resnet18, type="Conv2d")) == 20
    assert len(names(resnet18, type="_BatchNorm")) == 20
    assert len(names(resnet18, type="torch.nn.modules.batchnorm.BatchNorm2d")) == 20
    # timm's LayerNorm subclass stays a node and is a LayerNorm
    assert len(names(vit_tiny, type="LayerNorm")) == 25
    assert len(names(vit_tiny, type="Linear")) == 49


def test_function_nodes_by_fn_prefix(resnet18: NodeIndex) -> None:
    adds = names(resnet18, type="fn:add")
    assert len(adds) == 8 and adds[0] == "layer1.0.add"


def test_parameters_read_directly(vit_tiny: NodeIndex) -> None:
    assert names(vit_tiny, type="Parameter") == ["cls_token", "pos_embed"]


def test_name_glob_and_regex(resnet18: NodeIndex) -> None:
    assert names(resnet18, name="layer4.*.conv2") == ["layer4.0.conv2", "layer4.1.conv2"]
    assert names(resnet18, name="re:layer[12]\\.0\\.conv1") == ["layer1.0.conv1", "layer2.0.conv1"]
    assert names(resnet18, name=["conv1", "fc"]) == ["conv1", "fc"]


def test_where_predicates(resnet18: NodeIndex) -> None:
    assert len(names(resnet18, type="Conv2d", where="kernel_size != (1, 1)")) == 17
    assert names(resnet18, type="Conv2d", where="stride == (2, 2) and kernel_size == (1, 1)") == [
        "layer2.0.downsample.0", "layer3.0.downsample.0", "layer4.0.downsample.0"]
    assert names(resnet18, where="type == 'Linear'") == ["fc"]
    assert len(names(resnet18, type="Conv2d", where="out_channels >= 256 and params > 500000")) == 7


def test_blocks_slices(vit_tiny: NodeIndex, resnet18: NodeIndex) -> None:
    fc1 = [n for n in names(vit_tiny, name="*.mlp.fc1", blocks="1::2")]
    assert fc1 == [f"blocks.{i}.mlp.fc1" for i in (1, 3, 5, 7, 9, 11)]
    assert names(vit_tiny, name="*.mlp.fc1", blocks=[0, -1]) == ["blocks.0.mlp.fc1", "blocks.11.mlp.fc1"]
    # ResNet stages number their blocks per stage
    assert names(resnet18, name="*.conv1", blocks="1:") == [f"layer{i}.1.conv1" for i in range(1, 5)]


def test_block_positions_are_per_container() -> None:
    positions = block_positions(build_backbone("resnet50").module)
    assert positions["layer3.5"] == ("layer3", 5, 6)
    assert "layer3.5.conv1" not in positions


def test_exclude(resnet18: NodeIndex) -> None:
    convs = names(resnet18, type="Conv2d", exclude={"name": "*downsample*"})
    assert len(convs) == 17 and not any("downsample" in n for n in convs)


def test_no_match_explains_the_failing_key(resnet18: NodeIndex) -> None:
    with pytest.raises(SpecError, match="no node has type 'Conv3d'.*did you mean 'Conv2d'"):
        select(Selector(type="Conv3d"), resnet18)
    with pytest.raises(SpecError, match="no node named 'layer9.*'"):
        select(Selector(type="Conv2d", name="layer9.*"), resnet18)
    with pytest.raises(SpecError, match="none of the 20 matching nodes satisfies where"):
        select(Selector(type="Conv2d", where="kernel_size == (5, 5)"), resnet18)
    with pytest.raises(SpecError, match="no attribute 'kernal_size'.*did you mean 'kernel_size'"):
        select(Selector(type="Conv2d", where="kernal_size == 3"), resnet18)
    with pytest.raises(SpecError, match="unknown role 'heda'.*did you mean 'head'"):
        select(Selector(role="heda"), resnet18)
    with pytest.raises(SpecError, match="exclude removes all"):
        select(Selector(type="Linear", exclude={"name": "fc"}), resnet18)
    assert select(Selector(type="Conv3d", optional=True), resnet18) == []


def test_head_role_is_library_independent(resnet18: NodeIndex, vit_tiny: NodeIndex) -> None:
    assert names(resnet18, role="head") == ["fc"]
    assert names(vit_tiny, role="head") == ["head"]
    for backbone, expected in (("mobilenet_v3_small", ["classifier.3"]), ("convnext_tiny", ["classifier.2"]),
                               ("timm:deit_tiny_distilled_patch16_224", ["head", "head_dist"])):
        module = build_backbone(backbone).module
        assert names(NodeIndex(trace(module), block_positions(module)), role="head") == expected


def test_predicate_language_is_safe() -> None:
    assert Predicate("a in (1, 2) and not b")({"a": 2, "b": False}) is True
    assert Predicate("len(x) == 2 and x[0] * 2 >= 4")({"x": (2, 3)}) is True
    assert Predicate("1 < y <= 3")({"y": 3}) is True
    for bad in ("__import__('os')", "x.__class__", "(lambda: 1)()", "[i for i in x]", "open('f')"):
        with pytest.raises(PredicateSyntaxError):
            Predicate(bad)
    with pytest.raises(UnknownName):
        Predicate("nope == 1")({})
