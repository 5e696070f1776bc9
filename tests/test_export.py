"""Deployment: ONNX export checked by ONNX Runtime, all-tasks graphs, Triton, torch.compile, and bad input.

Exports happen at batch 2 and are run at other batch sizes (3, 5), so every parity check here also checks
that the batch dimension stayed dynamic.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

import peftc
from peftc.cli import app
from peftc.export.compile import compile_module
from peftc.export.errors import BackendUnavailable, ParityError
from peftc.export.onnx import ExportResult, write_onnx
from peftc.export.ort import OrtRunner, cuda_status, resolve_providers
from peftc.export.source import Deployable
from peftc.export.triton import triton_config
from peftc.runtime.model import Compiled

from .conftest import synthetic_task, train_steps
from .test_fold import Tiny

runner = CliRunner()
SIZE = 64


def cli(*args: str) -> tuple[int, str]:
    result = runner.invoke(app, list(args))
    return result.exit_code, result.output


def leftovers(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if ".partial-" in p.name or ".old-" in p.name)


@pytest.fixture(scope="module")
def artifact(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """CLR on resnet18 with two trained tasks (3 and 4 classes): non-identity kernels, moved BN statistics."""
    torch.manual_seed(0)
    model = peftc.compile("clr", "resnet18", num_classes=3)
    model.add_task("b", num_classes=4)
    train_steps(model, *synthetic_task(classes=3, size=SIZE, n=8), steps=1)
    model.set_task("b")
    train_steps(model, *synthetic_task(classes=4, size=SIZE, n=8, seed=1), steps=1)
    model.set_task("default")
    path = tmp_path_factory.mktemp("export") / "clr"
    model.save(path)
    return path


def eager(artifact: Path, task: str, x: torch.Tensor) -> np.ndarray:
    model = peftc.load(artifact).set_task(task)
    with torch.no_grad():
        return model(x).numpy()


def test_clr_resnet18_onnx_parity_triton_and_run(artifact: Path, tmp_path: Path) -> None:
    out = tmp_path / "out" / "clr.onnx"
    code, text = cli("export", str(artifact), "--onnx", str(out), "--triton", str(tmp_path / "repo"), "--task", "b",
                     "--image-size", str(SIZE), str(SIZE), "--json")
    assert code == 0, text
    data = json.loads(text)
    parity = data["parity"]
    assert parity["batch"] == 3 and parity["providers"][0] == "CPUExecutionProvider"
    assert parity["max_abs_diff"] <= 1e-4 * max(1.0, parity["output_scale"])
    # folded: BN into the (trained) CLR convs and downsample convs; 4-class head of task b
    fold = data["fold"]
    assert fold["counts"] == {"plain": 17, "batchnorm": 20} and fold["remaining"] == {}
    assert fold["params_after"] == 11_689_512 - 513_000 + (512 * 4 + 4) - 9_600 + 35_136 + 4_800 == 11_208_900
    assert leftovers(out.parent) == [] and sorted(p.name for p in out.parent.iterdir()) == ["clr.onnx"]

    graph = onnx.load(str(out))
    image = graph.graph.input[0].type.tensor_type.shape.dim
    assert image[0].dim_param and [d.dim_value for d in image[1:]] == [3, SIZE, SIZE]
    meta = {p.key: p.value for p in graph.metadata_props}
    assert meta["peftc.task"] == "b" and meta["peftc.spec"] == "clr" and meta["peftc.backbone"] == "resnet18"

    x = torch.randn(5, 3, SIZE, SIZE)
    got, want = OrtRunner(str(out), "cpu")(x), eager(artifact, "b", x)
    assert got.shape == (5, 4) and np.abs(got - want).max() <= 1e-4 * max(1.0, np.abs(want).max())

    model_dir = tmp_path / "repo" / data["triton"].rsplit("/", 1)[-1]
    config = (model_dir / "config.pbtxt").read_text()
    assert (model_dir / "1" / "model.onnx").read_bytes() == out.read_bytes()
    assert f"dims: [ 3, {SIZE}, {SIZE} ]" in config and "dims: [ 4 ]" in config
    assert "max_batch_size: 32" in config and "dynamic_batching" in config and 'backend: "onnxruntime"' in config

    code, text = cli("run", str(out), "--backend", "ort", "--batch", "1", "--batch", "2", "--runs", "2", "--json")
    timings = json.loads(text)["timings"]
    assert code == 0 and [t["batch"] for t in timings] == [1, 2] and all(t["median_ms"] > 0 for t in timings)

    picture = tmp_path / "picture.png"
    Image.fromarray((np.random.default_rng(0).random((80, 96, 3)) * 255).astype("uint8")).save(picture)
    code, text = cli("run", str(out), "--backend", "ort", "--input", str(picture), "--json")
    onnx_top = json.loads(text)["top"]
    assert code == 0 and len(onnx_top) == 4 and math.isclose(sum(t["probability"] for t in onnx_top), 1, rel_tol=1e-4)
    code, text = cli("run", str(artifact), "--backend", "eager", "--task", "b", "--input", str(picture),
                     "--image-size", str(SIZE), str(SIZE), "--json")
    assert code == 0 and [t["class"] for t in json.loads(text)["top"]] == [t["class"] for t in onnx_top]


def test_all_tasks_graph_routes_each_sample(artifact: Path, tmp_path: Path) -> None:
    out = tmp_path / "all.onnx"
    result = peftc.export_onnx(artifact, out, all_tasks=True, image_size=(SIZE, SIZE))
    assert result.tasks == ["default", "b"] and result.classes == [3, 4] and result.input_names == ["image", "task"]
    assert result.parity is not None and result.parity.ok and not result.folded
    x = torch.randn(4, 3, SIZE, SIZE)
    task = torch.tensor([1, 0, 1, 7])
    got = OrtRunner(str(out), "cpu")(x, task)
    assert got.shape == (4, 4)
    b, default = eager(artifact, "b", x), eager(artifact, "default", x)
    scale = max(1.0, np.abs(b).max(), np.abs(default).max())
    assert np.abs(got[[0, 2]] - b[[0, 2]]).max() <= 1e-4 * scale
    assert np.abs(got[1, :3] - default[1]).max() <= 1e-4 * scale and got[1, 3] == -np.inf  # 3-class task padded
    assert np.isnan(got[3]).all()  # an unknown task id is never answered by another task


def vit_parity(model: Compiled, path: Path, task: str | None = None) -> ExportResult:
    """Export (batch 2), then check a batch of 3 again here, independently of the exporter's own check."""
    result = peftc.export_onnx(model, path, task=task)
    assert result.parity is not None and result.parity.batch == 3 and result.parity.ok
    if task is not None:
        model.set_task(task)
    x = torch.randn(3, *model.backbone.input_size)
    with torch.no_grad():
        want = model(x).numpy()
    got = OrtRunner(str(path), "cpu")(x)
    assert np.abs(got - want).max() <= 1e-4 * max(1.0, np.abs(want).max())
    return result


def test_ln_tuning_selects_each_samples_task_inside_one_graph(tmp_path: Path) -> None:
    """LN tuning's task-agnostic inference exported: the graph picks each sample's task by its key."""
    from peftc.export.multitask import all_tasks_graph
    from peftc.methods.ln_tuning.select import task_selector

    model = peftc.compile("ln_tuning", "timm:vit_tiny_patch16_224", backbone_kwargs={"img_size": 32, "depth": 3})
    selector = task_selector(model)
    x = torch.randn(3, 3, 32, 32) * torch.tensor([0.5, 1.0, 2.0]).view(3, 1, 1, 1) + torch.arange(-1.0, 2.0).view(
        3, 1, 1, 1)
    queries = selector.query(x)
    for i, name in enumerate("abc"):
        model.add_task(name)
        model.set_task(name)
        with torch.no_grad():
            for p in selector.ln_parameters():
                p.add_(0.3 * torch.randn(p.shape))
            selector.key_parameters()[0].copy_(queries[i])  # sample i is nearest to task i's key
    assert selector.predict(x).tolist() == [0, 1, 2]
    model.save(tmp_path / "ln")
    code, out = cli("export", str(tmp_path / "ln"), "--onnx", str(tmp_path / "ln.onnx"), "--select-task", "--json")
    assert code == 0, out
    result = json.loads(out)
    assert result["input_names"] == ["image"] and result["selects_task"] and result["tasks"] == ["a", "b", "c"]
    one_copy = 4 * model.report.backbone_params
    assert result["bytes"] < 1.1 * one_copy, "both passes must share one copy of the frozen backbone"
    code, out = cli("run", str(tmp_path / "ln.onnx"), "--backend", "ort", "--runs", "1", "--warmup", "0", "--json")
    assert code == 0 and json.loads(out)["selects_task"] is True, out
    got = OrtRunner(str(tmp_path / "ln.onnx"), "cpu")(x)
    with torch.no_grad():
        want, forced = selector(x).numpy(), model(x).numpy()  # forced: task c's rows for every sample
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-4)
    assert np.abs(got - forced)[:2].max() > 1e-2, "samples 0 and 1 ran with the active task's rows"
    # the same rows behind a task input: --all-tasks routes a timm ViT (its graph has defaulted inputs)
    routed = all_tasks_graph(model)
    with torch.no_grad():
        by_input = routed.module(x, torch.tensor([routed.tasks.index(t) for t in "abc"]))
    torch.testing.assert_close(by_input, torch.from_numpy(want), rtol=0, atol=1e-5)


def test_tome_deit_tiny_exports(tmp_path: Path) -> None:
    # four blocks at 64 px (16 patches + class token, r=4 merges per block): the same graph per block as at full
    # size, at a quarter of the export time
    model = peftc.compile("tome", "timm:deit_tiny_patch16_224", r=4, backbone_kwargs={"img_size": 64, "depth": 4})
    result = vit_parity(model, tmp_path / "tome.onnx")  # needs the stable-sort translation (ONNX TopK)
    assert result.fold is not None and len(result.fold["remaining"]) == 4  # token merging runs as it is


def test_bad_input_is_one_message_and_leaves_no_file(artifact: Path, tmp_path: Path) -> None:
    not_artifact = tmp_path / "empty"
    not_artifact.mkdir()
    code, text = cli("export", str(not_artifact), "--onnx", str(tmp_path / "a.onnx"))
    assert code == 1 and "not a peftc artifact" in text and "Traceback" not in text

    code, text = cli("export", str(artifact), "--onnx", str(tmp_path / "b.onnx"), "--task", "nope")
    assert code == 1 and "unknown task 'nope'" in text and "default" in text

    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    code, text = cli("export", str(artifact), "--onnx", str(blocker / "c.onnx"))
    assert code == 1 and "cannot write" in text and str(blocker) in text

    code, text = cli("export", str(artifact), "--onnx", str(tmp_path / "d.onnx"), "--select-task")
    assert code == 1 and "needs task keys" in text and "Traceback" not in text  # a CLR artifact has none
    code, text = cli("export", str(artifact), "--onnx", str(tmp_path / "e.onnx"), "--select-task", "--all-tasks")
    assert code == 1 and "not several" in text

    code, text = cli("export", str(artifact))
    assert code == 1 and "nothing to export" in text
    code, text = cli("run", str(artifact), "--backend", "tensorrt")
    assert code == 1 and "unknown backend" in text
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a-file", "empty"]


def test_failed_parity_keeps_the_previous_file(tmp_path: Path) -> None:
    module = Tiny().eval()

    def wrong(x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return module(x) + 1.0

    deployable = Deployable(module, (3, 16, 16), "default", ["default"], [5], wrong, None, "tiny", "tiny")
    target = tmp_path / "tiny.onnx"
    target.write_bytes(b"previous export")
    with pytest.raises(ParityError, match="differs from eager"):
        write_onnx(deployable, target)
    assert target.read_bytes() == b"previous export" and leftovers(tmp_path) == []


def test_torch_compile_matches_eager() -> None:
    module = Tiny().eval()
    compiled = compile_module(module, torch.randn(2, 3, 16, 16))
    x = torch.randn(3, 3, 16, 16)  # another batch size: the batch dimension is dynamic
    with torch.no_grad():
        assert (compiled(x) - module(x)).abs().max().item() <= 1e-4


def test_ort_provider_choice_is_quiet(capfd: pytest.CaptureFixture[str]) -> None:
    usable, why = cuda_status()
    assert resolve_providers("auto")[0] == ("CUDAExecutionProvider" if usable else "CPUExecutionProvider")
    assert resolve_providers("cpu") == ["CPUExecutionProvider"]
    if not usable:
        with pytest.raises(BackendUnavailable, match="cuda"):
            resolve_providers("cuda")
        assert why
    captured = capfd.readouterr()
    assert "ExecutionProvider" not in captured.err and "Failed" not in captured.err


def test_triton_config_for_all_tasks() -> None:
    text = triton_config("m", input_size=[3, 224, 224], classes=10, all_tasks=True, max_batch=8)
    assert 'name: "task"' in text and "TYPE_INT64" in text and "reshape: { shape: [ ] }" in text
    assert "preferred_batch_size: [ 4, 8 ]" in text and "max_batch_size: 8" in text
