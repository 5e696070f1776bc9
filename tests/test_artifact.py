"""Artifacts: round trips, refusal of foreign deltas, atomic writes, local weight files."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import peftc
from peftc.analysis.backbones import build_backbone
from peftc.errors import ArtifactError, BackboneError
from peftc.storage import artifact

from .conftest import synthetic_task, train_steps


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, torch.Tensor]]:
    """CLR on resnet18 with two trained tasks, saved; returns the directory and each task's outputs."""
    model = peftc.compile("clr", "resnet18")
    outputs = {}
    images, _ = synthetic_task()
    for name, classes, seed in (("A", 3, 1), ("B", 4, 2)):
        model.add_task(name, num_classes=classes).set_task(name)
        x, y = synthetic_task(classes=classes, seed=seed)
        train_steps(model, x, y, steps=2)
    for name in model.tasks:
        model.set_task(name)
        with torch.no_grad():
            outputs[name] = model(images).clone()
    directory = tmp_path_factory.mktemp("art") / "clr-r18"
    model.save(directory)
    return directory, outputs


def test_round_trip_is_exact(trained: tuple[Path, dict[str, torch.Tensor]]) -> None:
    directory, outputs = trained
    model = peftc.load(directory)
    images, _ = synthetic_task()
    assert model.tasks == ["default", "A", "B"] and model.active_task == "B"
    for name, expected in outputs.items():
        model.set_task(name)
        with torch.no_grad():
            assert torch.equal(model(images), expected), name


def test_delta_holds_only_task_and_trained_tensors(trained: tuple[Path, dict[str, torch.Tensor]]) -> None:
    directory, _ = trained
    tensors = load_file(str(directory / "delta.safetensors"))
    assert all(k.startswith(("tasks/", "shared/")) for k in tensors)
    assert not any(k.endswith("conv1.weight") and ".clr." not in k for k in tensors), "frozen conv weights saved"
    per_task = [k for k in tensors if k.startswith("tasks/A/")]
    assert "tasks/A/fc.weight" in per_task and "tasks/A/layer1.0.conv1.clr.weight" in per_task
    assert "tasks/A/layer1.0.bn1.running_mean" in per_task
    assert tensors["tasks/B/fc.weight"].shape == (4, 512)
    manifest = json.loads((directory / "peftc.json").read_text())
    assert manifest["backbone"]["id"] == "resnet18" and manifest["tasks"][1] == {"name": "A", "classes": 3}
    assert not list(directory.glob("*.pt")) and not list(directory.glob("*.pkl"))


def test_wrong_backbone_is_refused(trained: tuple[Path, dict[str, torch.Tensor]]) -> None:
    directory, _ = trained
    with pytest.raises(ArtifactError, match="made for backbone 'resnet18', not 'resnet34'"):
        peftc.load(directory, backbone="resnet34")
    other = build_backbone("resnet18", seed=1).module
    with pytest.raises(ArtifactError, match="a delta only fits the exact backbone"):
        peftc.load(directory, backbone=other)


def test_delta_for_another_spec_is_refused(trained: tuple[Path, dict[str, torch.Tensor]]) -> None:
    directory, _ = trained
    model = peftc.compile("clr", "resnet18", variant="full")
    with pytest.raises(ArtifactError, match="made for spec 'clr'"):
        model.load_delta(directory)
    with pytest.raises(ArtifactError, match="made for backbone"):
        peftc.compile("clr", "resnet34").load_delta(directory)


def test_corrupt_delta_is_detected(trained: tuple[Path, dict[str, torch.Tensor]], tmp_path: Path) -> None:
    directory, _ = trained
    copy = tmp_path / "copy"
    copy.mkdir()
    for f in directory.iterdir():
        (copy / f.name).write_bytes(f.read_bytes())
    data = bytearray((copy / "delta.safetensors").read_bytes())
    data[-1] ^= 0xFF
    (copy / "delta.safetensors").write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match="does not match its manifest"):
        peftc.load(copy)


def test_not_an_artifact(tmp_path: Path) -> None:
    with pytest.raises(ArtifactError, match="not a peftc artifact"):
        peftc.load(tmp_path)
    with pytest.raises(ArtifactError, match="not found"):
        peftc.load(tmp_path / "missing")


def test_interrupted_write_keeps_the_old_artifact(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    model = peftc.compile("clr", "resnet18", num_classes=3)
    target = tmp_path / "art"
    model.save(target)
    before = {f.name: f.read_bytes() for f in target.iterdir()}

    def killed(tensors: dict, path: str, metadata: object = None) -> None:
        Path(path).write_bytes(b"partial")  # half a file, then the process "dies"
        raise KeyboardInterrupt

    monkeypatch.setattr("safetensors.torch.save_file", killed)
    with torch.no_grad():
        next(model.trainable_parameters()).add_(1.0)
    with pytest.raises(KeyboardInterrupt):
        model.save(target)
    assert {f.name: f.read_bytes() for f in target.iterdir()} == before
    assert [p.name for p in tmp_path.iterdir()] == ["art"], "staging directory left behind"
    monkeypatch.undo()
    peftc.load(target)  # still loads


def test_refuses_to_overwrite_a_foreign_directory(tmp_path: Path) -> None:
    (tmp_path / "keep.txt").write_text("mine")
    with pytest.raises(ArtifactError, match="not a peftc artifact"):
        peftc.compile("clr", "resnet18").save(tmp_path)
    assert (tmp_path / "keep.txt").read_text() == "mine"


@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
def test_local_weights_file(tmp_path: Path, suffix: str) -> None:
    state = build_backbone("resnet18", seed=7).module.state_dict()
    path = tmp_path / f"w{suffix}"
    if suffix == ".pt":
        torch.save(state, path)
    else:
        save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    model = peftc.compile("clr", "resnet18", weights=path)
    assert model.backbone.source == "weights"
    assert model.backbone.hash == build_backbone("resnet18", seed=7).hash
    model.save(tmp_path / "art")
    assert peftc.load(tmp_path / "art").backbone.hash == model.backbone.hash


def test_weights_file_errors(tmp_path: Path) -> None:
    with pytest.raises(BackboneError, match="weights file not found"):
        build_backbone("resnet18", weights=tmp_path / "none.pt")
    path = tmp_path / "r34.safetensors"
    save_file({k: v.contiguous() for k, v in build_backbone("resnet34").module.state_dict().items()}, str(path))
    with pytest.raises(BackboneError, match="does not fit resnet18"):
        build_backbone("resnet18", weights=path)
    unsafe = tmp_path / "unsafe.pt"
    torch.save({"conv1.weight": torch.zeros(1), "payload": Path("/etc/passwd")}, unsafe)
    with pytest.raises(BackboneError, match="cannot read weights file"):  # weights_only refuses arbitrary objects
        build_backbone("resnet18", weights=unsafe)


def test_manifest_lists_tasks_and_report(trained: tuple[Path, dict[str, torch.Tensor]]) -> None:
    manifest = artifact.read_manifest(trained[0])
    assert [t["name"] for t in manifest["tasks"]] == ["default", "A", "B"]
    assert manifest["report"]["added_params"] == 35_136


