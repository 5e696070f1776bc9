"""Schedules: ``schedule:`` phases validated with positions, resolved at compile time, applied by
``model.schedule_at(progress)`` to the active task; artifacts do not depend on the phase."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

import peftc
from peftc.analysis.backbones import build_backbone
from peftc.errors import SpecError
from peftc.language import load_spec
from peftc.runtime.schedule import ScheduleError

from .conftest import synthetic_task, train_steps


@pytest.fixture(scope="module")
def resnet18() -> nn.Module:
    return build_backbone("resnet18").module


def _trainable(model: peftc.runtime.model.Compiled) -> set[str]:
    return {n for n, _ in model.named_trainable_parameters()}


def test_confit_phases(resnet18: nn.Module) -> None:
    model = peftc.compile("confit", resnet18, num_classes=3)
    everything = _trainable(model)
    bn = {n for n in everything if isinstance(model.net.get_submodule(n.rsplit(".", 1)[0]), nn.BatchNorm2d)}
    head = {"fc.weight", "fc.bias"}
    assert len(bn) == 40 and head <= everything and len(everything) == 62  # 20 convs, 20 BNs x 2, the head

    change = model.schedule_at(0.0)
    assert (change.phase, change.label, _trainable(model)) == (0, "head", head)
    assert set(change.frozen) == everything - head and not change.trained
    assert not model.schedule_at(0.19).changed
    change = model.schedule_at(0.2)
    assert (change.label, set(change.trained), change.frozen) == ("head+bn", bn, ())
    assert _trainable(model) == head | bn
    assert not model.schedule_at(0.4999).changed
    change = model.schedule_at(0.5)
    assert change.label == "all" and set(change.trained) == everything - head - bn
    assert _trainable(model) == everything and model.schedule_at(1.0).phase == 2
    assert set(model.schedule_at(0.1).frozen) == everything - head  # going back is allowed
    for bad in (-0.1, 1.01):
        with pytest.raises(ScheduleError, match=r"within \[0, 1\]"):
            model.schedule_at(bad)
    # one optimizer over everything any phase trains
    assert {id(p) for p in model.schedule.parameters(model.net)} == {
        id(p) for n, p in model.net.named_parameters() if n in everything}


def test_params_move_the_phases(resnet18: nn.Module) -> None:
    model = peftc.compile("confit", resnet18, num_classes=3, bn_from=0.3, all_from=0.9)
    assert model.schedule_at(0.29).label == "head" and model.schedule_at(0.3).label == "head+bn"
    assert model.schedule_at(0.89).label == "head+bn" and model.schedule_at(0.9).label == "all"


def test_schedule_follows_the_active_task(resnet18: nn.Module) -> None:
    model = peftc.compile("confit", resnet18, num_classes=3)
    model.schedule_at(0.0)
    model.add_task("b")
    model.set_task("b")  # task b's own BN tensors and head
    model.schedule_at(0.3)
    params = dict(model.net.named_parameters())
    assert params["layer1.0.bn1.weight"].requires_grad and params["fc.weight"].requires_grad
    assert not params["layer1.0.conv1.weight"].requires_grad


SPEC = """\
peftc: 1
name: staged
params:
  later: {type: float, default: 0.5}
rules:
  - freeze: {}
  - train: {type: _BatchNorm, buffers: true}
  - head: {classes: 3}
schedule:
  - {from: 0, train: [{role: head}]}
  - {from: $later, label: bn, train: [{role: head}, {type: BatchNorm2d, params: weight}]}
"""


def _spec(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "staged.yaml"
    path.write_text(text)
    return path


@pytest.mark.parametrize(("old", "new", "message"), [
    ("{from: 0, train", "{from: 0.1, train",
     r"staged\.yaml:10:6: schedule\[0\]\.from: the first phase must start at 0"),
    ("from: $later", "from: 0.0", r"staged\.yaml:11:6: schedule\[1\]\.from: phases must start in increasing order"),
    ("type: BatchNorm2d", "tpye: BatchNorm2d", r"staged\.yaml:11:54: schedule\[1\]\.train\[1\]\.tpye: unknown key "
                                               r"'tpye' \(did you mean 'type'\?\)"),
    ("train: [{role: head}]}", "train: most}", r"schedule\[0\]\.train: Input should be 'all'"),
    ("from: $later", "from: 1.5", r"schedule\[1\]\.from: Input should be less than 1"),
])
def test_spec_errors_point_into_the_yaml(tmp_path: Path, old: str, new: str, message: str) -> None:
    assert old in SPEC
    with pytest.raises(SpecError, match=message):
        load_spec(_spec(tmp_path, SPEC.replace(old, new, 1)))


def test_selectors_are_resolved_at_compile_time(tmp_path: Path, resnet18: nn.Module) -> None:
    with pytest.raises(SpecError, match=r"staged\.yaml:11:\d+: schedule\[1\]\.train\[1\]\.type: no node has type "
                                        r"'Conv3d'"):
        peftc.compile(_spec(tmp_path, SPEC.replace("type: BatchNorm2d", "type: Conv3d")), resnet18)
    with pytest.raises(SpecError, match=r"schedule\[1\]\.train\[1\]: selects no parameter that the rules train"):
        peftc.compile(_spec(tmp_path, SPEC.replace("type: BatchNorm2d", "type: Conv2d")), resnet18)


def test_params_patterns_and_saving_in_any_phase(tmp_path: Path) -> None:
    model = peftc.compile(_spec(tmp_path, SPEC), "resnet18")
    model.schedule_at(0.5)
    trainable = _trainable(model)
    assert "fc.weight" in trainable and "bn1.weight" in trainable and "bn1.bias" not in trainable
    model.schedule_at(0.0)  # save while only the head trains: the artifact still holds the BN tensors
    train_steps(model, *synthetic_task(n=4, size=16), steps=1)
    model.save(tmp_path / "a")
    loaded = peftc.load(tmp_path / "a")
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))
    assert len(loaded.schedule.phases) == 2 and loaded.schedule_at(0.7).label == "bn"


def test_include_inherits_or_replaces_the_schedule(tmp_path: Path) -> None:
    (tmp_path / "mine.yaml").write_text("peftc: 1\nname: mine\ninclude: confit\n")
    assert [p.label for p in load_spec(tmp_path / "mine.yaml").schedule] == ["head", "head+bn", "all"]
    (tmp_path / "own.yaml").write_text(
        "peftc: 1\nname: own\ninclude: confit\nschedule:\n  - {from: 0, label: only, train: all}\n")
    assert [p.label for p in load_spec(tmp_path / "own.yaml").schedule] == ["only"]


def test_no_schedule_is_one_phase(resnet18: nn.Module) -> None:
    model = peftc.compile("clr", resnet18)
    before = _trainable(model)
    change = model.schedule_at(0.7)
    assert (change.phase, change.label, change.changed) == (0, "all", False) and _trainable(model) == before
