"""The trainer on real hardware settings: precision, frozen 16-bit weights, gradient accumulation, the compiled
training step, metric logs, and the continual-learning benchmark tools (``peftc split``, the field's metrics).

A tiny CNN (one conv, one BatchNorm, one Linear: BitFit trains the biases, the BN statistics stay frozen) trains
on 16x16 colour-coded images, so each run takes a second; only ``--compile`` pays inductor's cold start.
"""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from PIL import Image
from typer.testing import CliRunner

import peftc
from peftc.cli import app
from peftc.train import TrainOptions, train_task
from peftc.train.context import Hooks
from peftc.train.metrics import continual_metrics
from peftc.train.precision import PrecisionError
from tests.tiny import Tiny

pytestmark = pytest.mark.usefixtures("one_thread")

COLOURS = [(220, 40, 40), (40, 200, 60), (50, 60, 220), (230, 220, 40), (200, 50, 210), (40, 210, 210)]


def _images(folder: Path, classes: list[str], per_class: int, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    for c, name in enumerate(classes):
        (folder / name).mkdir(parents=True, exist_ok=True)
        base = torch.tensor(COLOURS[c % len(COLOURS)]).view(3, 1, 1).float()
        for i in range(per_class):
            pixels = (base + 60 * torch.randn(3, 16, 16, generator=gen)).clamp(0, 255).byte()
            Image.fromarray(pixels.permute(1, 2, 0).numpy()).save(folder / name / f"{i}.png")


@pytest.fixture(scope="module")
def colours(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two colour classes: 48 training and 8 validation images each."""
    root = tmp_path_factory.mktemp("colours")
    _images(root / "train", ["red", "green"], 48, 0)
    _images(root / "val", ["red", "green"], 8, 1)
    return root


def _run(tmp: Path, data: Path, name: str, *, epochs: int = 1, hooks: Hooks | None = None, **kwargs):
    """Train task ``t`` of a fresh BitFit artifact on the tiny CNN; returns (result, the model before training)."""
    torch.manual_seed(0)
    model = peftc.compile("bitfit", Tiny(), num_classes=2)
    before = {k: v.detach().clone() for k, v in model.net.named_parameters()}
    art = tmp / name
    model.save(art)
    overrides = {"batch_size": 8, "lr": 0.05, "augment": "none", "epochs": epochs, **kwargs.pop("overrides", {})}
    kwargs.setdefault("device", "cpu")
    options = TrainOptions(workers=0, quiet=True, image_size=16, overrides=overrides, hooks=hooks or Hooks(),
                           **kwargs)
    return train_task(art, "t", data, options, model=model), before


def _trained(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_trainable_parameters()}


def _close(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], tol: float) -> float:
    assert a.keys() == b.keys() and a
    return max(float((a[k].float() - b[k].float()).abs().max()) for k in a)


# -- precision ---------------------------------------------------------------------------------------------------

def test_bf16_autocast_trains_with_fp32_trained_tensors_and_untouched_frozen_ones(tmp_path, colours):
    seen: list[tuple[torch.dtype, torch.dtype]] = []

    def on_step(run, stage, epoch, step, loss):
        with run.precision.autocast():
            out = run.model.net.conv(torch.zeros(1, 3, 4, 4))
        seen.append((out.dtype, run.model.net.conv.bias.dtype))

    result, before = _run(tmp_path, colours, "bf16", epochs=3, hooks=Hooks(on_step=on_step),
                          overrides={"precision": "bf16"}, log=("tensorboard",) if _has_tensorboard() else ())
    model = result.model
    assert set(seen) == {(torch.bfloat16, torch.float32)}  # convs ran in bf16; the trained bias stayed fp32
    losses = [h["loss"] for h in result.summary["stages"][0]["history"]]
    assert losses[-1] < 0.7 * losses[0], losses
    trained = dict(model.named_trainable_parameters())
    assert trained and all(p.dtype == torch.float32 for p in trained.values())
    frozen = {n: p for n, p in model.net.named_parameters() if n not in trained}
    assert frozen and all(torch.equal(p, before[n]) for n, p in frozen.items())
    assert any(not torch.equal(p, before[n]) for n, p in trained.items())
    _check_logs(tmp_path / "bf16" / "train" / "t" / "log", epochs=3, steps_per_epoch=12)


def _has_tensorboard() -> bool:
    try:
        import tensorboard  # noqa: F401
    except ImportError:
        return False
    return True


def _check_logs(folder: Path, epochs: int, steps_per_epoch: int) -> None:
    rows = [json.loads(line) for line in (folder / "epochs.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == list(range(1, epochs + 1))
    for row in rows:
        assert row["loss"] > 0 and 0 <= row["val_accuracy"] <= 1 and row["lr"] > 0 and row["images_per_second"] > 0
    with (folder / "epochs.csv").open() as f:
        table = list(csv.DictReader(f))
    assert [float(r["loss"]) for r in table] == pytest.approx([r["loss"] for r in rows])
    assert {"loss", "val_accuracy", "lr", "images_per_second"} <= set(table[0])
    steps = [json.loads(line) for line in (folder / "steps.jsonl").read_text().splitlines()]
    assert len(steps) == epochs * steps_per_epoch
    assert [s["global_step"] for s in steps] == list(range(1, len(steps) + 1))
    with (folder / "steps.csv").open() as f:
        assert len(list(csv.DictReader(f))) == len(steps)
    if _has_tensorboard():
        assert list((folder / "tensorboard").glob("events.out.tfevents.*"))


def test_frozen_weights_are_stored_in_bf16_while_training_and_come_back_rounded(tmp_path, colours):
    dtypes: set[tuple[torch.dtype, torch.dtype]] = set()

    def on_step(run, *_):
        dtypes.add((run.model.net.conv.weight.dtype, run.model.net.fc.weight.dtype))

    hooks = Hooks(on_step=on_step)
    result, before = _run(tmp_path, colours, "frozen", hooks=hooks, overrides={"precision": "bf16"},
                          frozen_dtype="bf16")
    net = result.model.net
    assert dtypes == {(torch.bfloat16, torch.float32)}  # while training; the head is saved, so never cast
    assert net.conv.weight.dtype == torch.float32 and net.conv.bias.dtype == torch.float32
    assert torch.equal(net.conv.weight, before["conv.weight"].bfloat16().float())
    assert result.summary["val_accuracy"] > 0.5


def test_fp16_without_cuda_and_bad_flags_are_refused_with_one_message(tmp_path, colours):
    if torch.cuda.is_available():
        pytest.skip("fp16 runs on CUDA")
    with pytest.raises(PrecisionError, match="fp16 needs a CUDA device"):
        _run(tmp_path, colours, "fp16", overrides={"precision": "fp16"})
    with pytest.raises(PrecisionError, match="needs autocast"):
        _run(tmp_path, colours, "frozen32", frozen_dtype="bf16")
    for flags, message in ((["--precision", "fp8"], "--precision must be one of fp32, bf16, fp16"),
                           (["--accumulate", "0"], "--accumulate must be at least 1"),
                           (["--frozen-dtype", "int8"], "--frozen-dtype must be one of bf16, fp16"),
                           (["--log", "wandb"], "--log wandb: unknown logger")):
        out = CliRunner().invoke(app, ["train", str(tmp_path / "none"), "--task", "t", "--data", str(colours), *flags])
        assert out.exit_code == 1 and message in out.output and "Traceback" not in out.output, out.output
    assert not (tmp_path / "none").exists()


# -- accumulation and compile --------------------------------------------------------------------------------------

def test_accumulating_four_batches_of_8_equals_one_batch_of_32(tmp_path, colours):
    recipe = {"optimizer": {"name": "sgd", "momentum": 0.9}, "lr_batch": 32}  # lr scales with the effective batch
    small, _ = _run(tmp_path, colours, "acc", overrides={**recipe, "accumulate": 4})
    large, _ = _run(tmp_path, colours, "big", overrides={**recipe, "batch_size": 32})
    assert small.summary["stages"][0]["history"][0]["steps"] == 3 == large.summary["stages"][0]["history"][0]["steps"]
    assert small.summary["lr"] == large.summary["lr"] == pytest.approx(0.05)
    assert _close(_trained(small.model), _trained(large.model), 1e-5) < 1e-5
    plain, _ = _run(tmp_path, colours, "plain", overrides=recipe)  # 12 steps of 8: a different trajectory
    assert _close(_trained(plain.model), _trained(large.model), 1e-5) > 1e-3


def test_compiled_training_step_equals_eager_and_has_no_graph_break(tmp_path, colours, monkeypatch):
    import torch._inductor.config
    from torch._dynamo.utils import counters

    monkeypatch.setattr(torch._inductor.config, "compile_threads", 1)  # no compile-worker pool to start on 2 cores
    torch._dynamo.reset()
    counters.clear()
    subset = tmp_path / "data"
    shutil.copytree(colours / "val", subset / "train")  # 16 images: two steps of 8
    shutil.copytree(colours / "val", subset / "val")
    eager, _ = _run(tmp_path, subset, "eager")
    compiled, _ = _run(tmp_path, subset, "compiled", compile=True)  # fullgraph=True: a graph break would raise
    assert compiled.summary["stages"][0]["history"][0]["steps"] == 2
    assert counters["stats"]["unique_graphs"] >= 1 and not counters["graph_break"]
    assert _close(_trained(compiled.model), _trained(eager.model), 1e-4) < 1e-4


# -- continual-learning benchmarks -----------------------------------------------------------------------------------

def test_metrics_follow_the_fields_definitions_on_a_fixed_matrix():
    # task 1: 0.9 → 0.7 → 0.6 (forgotten); task 2: 0.5 → 0.8 (rises after its own training); task 3 last
    m = [[0.9, None, None], [0.7, 0.5, None], [0.6, 0.8, 1.0]]
    out = continual_metrics(m, before=[None, 0.3, 0.4], baselines=[0.5, 0.25, 0.2])
    assert out["average_accuracy"] == pytest.approx((0.6 + 0.8 + 1.0) / 3)
    assert out["average_incremental_accuracy"] == pytest.approx((0.9 + (0.7 + 0.5) / 2 + (0.6 + 0.8 + 1.0) / 3) / 3)
    # Mammoth/PyCIL: max over every evaluation, the last included, minus the last: task 2 forgot nothing
    assert out["per_task_forgetting"] == pytest.approx([0.9 - 0.6, 0.0])
    assert out["forgetting"] == pytest.approx((0.3 + 0.0) / 2)
    # Avalanche: first (right after training the task) minus last: task 2's rise counts as negative forgetting
    assert out["forgetting_avalanche"] == pytest.approx(((0.9 - 0.6) + (0.5 - 0.8)) / 2)
    assert out["backward_transfer"] == pytest.approx(((0.6 - 0.9) + (0.8 - 0.5)) / 2)
    assert out["forward_transfer"] == pytest.approx(((0.3 - 0.25) + (0.4 - 0.2)) / 2)
    assert continual_metrics(m)["forward_transfer"] is None
    one = continual_metrics([[0.7]])
    assert one["average_accuracy"] == 0.7 and one["forgetting"] is None and one["forgetting_avalanche"] is None


@pytest.fixture(scope="module")
def twenty(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("twenty") / "data"
    names = [f"class{c:02d}" for c in range(20)]
    for c, name in enumerate(names):
        (root / name).mkdir(parents=True)
        for i in range(3):
            Image.new("RGB", (8, 8), (12 * c, 80 * i, 255 - 12 * c)).save(root / name / f"{i}.png")
    return root


def test_split_gives_pycil_ordered_class_incremental_tasks_that_train(tmp_path, twenty):
    import numpy as np

    out = CliRunner().invoke(app, ["split", str(twenty), "--tasks", "10", "-o", str(tmp_path / "seq" / "tasks.yaml")])
    assert out.exit_code == 0, out.output
    text = (tmp_path / "seq" / "tasks.yaml").read_text()
    doc = yaml.safe_load(text)
    classes = sorted(p.name for p in twenty.iterdir())
    np.random.seed(1993)
    expected = [classes[i] for i in np.random.permutation(20)]
    assert doc["split"]["order"] == expected and doc["split"]["seed"] == 1993
    assert [t["classes"] for t in doc["tasks"]] == [expected[i: i + 2] for i in range(0, 20, 2)]
    again = CliRunner().invoke(app, ["split", str(twenty), "--tasks", "10", "-o", str(tmp_path / "again.yaml")])
    assert again.exit_code == 0 and yaml.safe_load((tmp_path / "again.yaml").read_text())["tasks"] == doc["tasks"]

    order = tmp_path / "order.txt"
    order.write_text("\n".join(reversed(classes)))
    b = CliRunner().invoke(app, ["split", str(twenty), "--tasks", "4", "--init-classes", "5", "--order", str(order),
                                 "-o", str(tmp_path / "b.yaml"), "--json"])
    assert b.exit_code == 0, b.output
    assert [t["classes"] for t in json.loads(b.output)["tasks"]] == [classes[::-1][:5], classes[::-1][5:10],
                                                                      classes[::-1][10:15], classes[::-1][15:]]

    art = tmp_path / "art"
    peftc.compile("linear_probe", "timm:test_resnet").save(art)
    run = CliRunner().invoke(app, ["train", str(art), "--sequence", str(tmp_path / "seq" / "tasks.yaml"),
                                   "--epochs", "1", "--image-size", "16", "--batch-size", "4", "--workers", "0",
                                   "--device", "cpu", "--recipe", "augment=none", "--quiet", "--json"])
    assert run.exit_code == 0, run.output
    record = json.loads(run.output)
    assert len(record["matrix"]) == 10 and len(record["trained"]) == 10
    assert record["forgetting"] is not None and "forgetting_avalanche" in record
    # a linear probe trains nothing shared: each task starts where the untrained model would, so FWT is 0
    assert record["start_accuracy"] == record["untrained_accuracy"] and record["forward_transfer"] == 0.0


def test_split_refuses_what_cannot_be_split(tmp_path, twenty):
    (tmp_path / "empty").mkdir()
    order = tmp_path / "order.txt"
    order.write_text("class00\nclass01\n")
    domains = tmp_path / "domains"
    for d, names in (("photo", ["a", "b"]), ("sketch", ["a", "c"])):
        _images(domains / d, names, 2, 0)
    for args, message in (([str(twenty), "--tasks", "30"], "20 classes do not split into 30 tasks"),
                          ([str(twenty), "--tasks", "3"], "choose one of: 1, 2, 4, 5, 10, 20"),
                          ([str(tmp_path / "empty"), "--tasks", "2"], "expected one folder of images per class"),
                          ([str(twenty), "--tasks", "2", "--order", str(order)], "missing: class02"),
                          ([str(twenty), "--tasks", "2", "--order", "seed:x"], "the seed must be an integer"),
                          ([str(domains), "--domains"], "domains differ in classes")):
        out = CliRunner().invoke(app, ["split", *args, "-o", str(tmp_path / "x.yaml")])
        assert out.exit_code == 1 and message in out.output and "Traceback" not in out.output, (args, out.output)
    assert not (tmp_path / "x.yaml").exists()
    shutil.rmtree(domains / "sketch" / "c")
    _images(domains / "sketch", ["b"], 2, 0)
    out = CliRunner().invoke(app, ["split", str(domains), "--domains", "-o", str(tmp_path / "d.yaml"), "--json"])
    assert out.exit_code == 0, out.output
    doc = json.loads(out.output)
    assert [t["name"] for t in doc["tasks"]] == ["photo", "sketch"] and doc["split"]["kind"] == "domain-incremental"
    assert all(t["classes"] == ["a", "b"] for t in doc["tasks"])


# -- FSDP2 ------------------------------------------------------------------------------------------------------------

FSDP_WORKER = '''
import json, sys
from pathlib import Path
import torch
import peftc
from peftc.train import TrainOptions, train_task
from peftc.train.context import Hooks
from peftc.train.distributed import setup
from tests.tiny import Tiny

tmp, data = Path(sys.argv[1]), Path(sys.argv[2])
dist = setup("cpu")
trained, seen = {}, set()

def on_step(run, *_):
    weight = run.model.net.conv.weight
    seen.add((type(weight).__name__, tuple(getattr(weight, "to_local", lambda: weight)().shape)))

for sharding in ("ddp", "fsdp"):
    torch.manual_seed(0)
    model = peftc.compile("bitfit", Tiny(), num_classes=2)
    if dist.main:
        model.save(tmp / sharding)
    dist.barrier()
    options = TrainOptions(device="cpu", workers=0, quiet=True, image_size=16, sharding=sharding,
                           hooks=Hooks(on_step=on_step if sharding == "fsdp" else None),
                           overrides={"batch_size": 16, "lr": 0.05, "augment": "none", "epochs": 1})
    result = train_task(tmp / sharding, "t", data, options, model=model, dist=dist)
    trained[sharding] = {n: p.detach().clone() for n, p in result.model.named_trainable_parameters()}
if dist.main:
    diff = max(float((trained["ddp"][k] - trained["fsdp"][k]).abs().max()) for k in trained["ddp"])
    print(json.dumps({"diff": diff, "seen": sorted(seen), "keys": sorted(trained["fsdp"])}))
'''


def test_fsdp_on_two_cpu_processes_shards_frozen_weights_and_matches_ddp(tmp_path, colours):
    import os
    import subprocess
    import sys

    script = tmp_path / "worker.py"
    script.write_text(FSDP_WORKER)
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(root), os.environ.get("PYTHONPATH")]))}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(script),
           str(tmp_path), str(colours)]
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300, cwd=root)
    assert done.returncode == 0, done.stderr[-3000:]
    out = json.loads(done.stdout.strip().splitlines()[-1])
    assert out["seen"] == [["DTensor", [4, 3, 3, 3]]]  # conv.weight (8 x 3 x 3 x 3): half per process
    assert "conv.bias" in out["keys"] and "conv.weight" not in out["keys"]  # only trained tensors optimize
    assert out["diff"] < 1e-5  # the same steps as DDP: sharding frozen weights changes nothing numerically
    assert "t" in peftc.load(tmp_path / "fsdp", backbone=Tiny()).tasks


# -- CUDA (skipped without a GPU) -----------------------------------------------------------------------------------

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.mark.gpu
@cuda
def test_fp16_trains_with_a_grad_scaler_and_channels_last_on_cuda(tmp_path, colours):
    from peftc.train.distributed import resolve_device

    assert resolve_device("auto").type == "cuda"
    seen = set()

    def on_step(run, *_):
        weight = run.model.net.conv.weight
        seen.add((run.precision.scaler is not None, run.memory_format is torch.channels_last,
                  weight.is_contiguous(memory_format=torch.channels_last), run.model.net.conv.bias.dtype))

    result, _ = _run(tmp_path, colours, "fp16", epochs=3, device="auto", hooks=Hooks(on_step=on_step),
                     overrides={"precision": "fp16"})
    assert seen == {(True, True, True, torch.float32)}
    losses = [h["loss"] for h in result.summary["stages"][0]["history"]]
    assert losses[-1] < 0.7 * losses[0], losses


@pytest.mark.gpu
@cuda
def test_bf16_with_frozen_bf16_weights_trains_on_cuda(tmp_path, colours):
    result, before = _run(tmp_path, colours, "bf16cuda", epochs=3, device="cuda", overrides={"precision": "bf16"},
                          frozen_dtype="bf16")
    net = result.model.net
    assert torch.equal(net.conv.weight.cpu(), before["conv.weight"].bfloat16().float())
    assert result.summary["val_accuracy"] > 0.5
