"""Online class-incremental learning: the task-free stream, the replay memory, the generative classifier.

The demo stream is `peftc demo-data` at 16x16 (5 two-class digit tasks, every image: ~289 stream samples per
task), batch 10, memory 200, a small CNN from scratch, seed 0. One ER run and one generative run are shared by
the assertions (module fixture); the resume and CLI checks use smaller streams.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import ClassVar

import pytest
import torch
import yaml
from safetensors.torch import load_file
from typer.testing import CliRunner

import peftc
from peftc.cli import app
from peftc.methods.generative_ocl.ms_loss import multi_similarity_loss
from peftc.train.demo import demo_cnn
from peftc.train.learners import OnlineLearner, Replay, get_learner, head_path, register_learner
from peftc.train.memory import ReplayMemory
from peftc.train.online import OnlineOptions, train_stream
from peftc.train.stream import build_stream, read_stream

pytest.importorskip("sklearn")
pytestmark = pytest.mark.usefixtures("one_thread")

FULL = {"peftc": 1, "name": "full_online", "summary": "everything trains; one head",
        "rules": [{"label": "all", "train": {"buffers": True}}, {"label": "head", "head": {}}],
        "train": {"optimizer": "sgd", "lr": 0.1, "augment": "none"}}


@register_learner("test_recording_er")
class RecordingER(OnlineLearner):
    """ER, recording every call the runtime makes into the learner during training."""

    calls: ClassVar[list[tuple[str, tuple[str, ...]]]] = []
    labels: ClassVar[list[list[int]]] = []

    def observe(self, labels: torch.Tensor) -> None:
        type(self).calls.append(("observe", ("labels",)))
        type(self).labels.append(labels.tolist())
        super().observe(labels)

    def loss(self, images: torch.Tensor, labels: torch.Tensor, replay: Replay) -> torch.Tensor:
        type(self).calls.append(("loss", ("images", "labels", "replay" if replay is None else "replay_batch")))
        return super().loss(images, labels, replay)


@pytest.fixture(scope="module")
def digits(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from peftc.train.demo import make_demo_data

    root = tmp_path_factory.mktemp("ocl") / "digits"
    make_demo_data(root, size=16)
    return root


@pytest.fixture(scope="module")
def runs(digits: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """ER (softmax head) and the generative classifier on the same stream, memory, model and seed."""
    out = {}
    net = demo_cnn()
    base = tmp_path_factory.mktemp("runs")
    for name, spec, learner in (("er", FULL, "test_recording_er"), ("generative", "generative_ocl", None)):
        positions: list[int] = []
        overrides = {"online": {"learner": learner}} if learner else {}
        options = OnlineOptions(overrides=overrides, image_size=16, quiet=True,
                                on_step=lambda step, pos, loss, seen=positions: seen.extend(pos))
        model = peftc.compile(spec, net)
        record = train_stream(base / name, digits / "tasks.yaml", options, model=model)
        out[name] = {"record": record, "positions": positions, "model": model, "dir": base / name}
    out["net"] = net
    return out


def test_generative_beats_er_softmax_with_less_recency_bias(runs: dict) -> None:
    er = runs["er"]["record"]["classifiers"]["softmax"]
    gen = runs["generative"]["record"]["classifiers"]["ncm"]
    chance = 1 / 10
    assert er["average_accuracy"] > 4 * chance and gen["average_accuracy"] > 4 * chance
    assert gen["average_accuracy"] > er["average_accuracy"] + 0.05
    assert gen["final_recent_share"] < er["final_recent_share"]
    assert gen["forgetting"] < er["forgetting"]
    # the generative run also reports its proxy head's softmax, side by side
    assert set(runs["generative"]["record"]["classifiers"]) == {"ncm", "softmax"}


def test_one_pass_every_sample_once(runs: dict, digits: Path) -> None:
    stream = build_stream(read_stream(digits / "tasks.yaml"))
    for name in ("er", "generative"):
        positions = runs[name]["positions"]
        assert len(positions) == len(stream) == runs[name]["record"]["samples"]
        assert sorted(positions) == list(range(len(stream)))
        assert runs[name]["record"]["steps"] == -(-len(stream) // 10)
        assert len(runs[name]["record"]["classifiers"]["softmax"]["matrix"]) == 5  # one row per boundary


def test_the_learner_gets_images_and_labels_only(runs: dict, digits: Path) -> None:
    stream = build_stream(read_stream(digits / "tasks.yaml"))
    assert any(b % 10 for b in stream.boundaries)  # the stream's task ends fall inside batches
    assert {call for call, _ in RecordingER.calls} == {"observe", "loss"}
    task_of = {c: k for k, d in enumerate(stream.data) for c in range(stream.offsets[k],
                                                                      stream.offsets[k] + len(d.classes))}
    mixed = [batch for batch in RecordingER.labels if len({task_of[c] for c in batch}) > 1]
    assert len(mixed) >= 4  # batches that hold the end of one task and the start of the next
    flat = [c for batch in RecordingER.labels for c in batch]
    offsets = stream.offsets
    expected = [offsets[k] + stream.data[k].train.samples[i][1] for k, i in stream.order]
    assert flat == expected  # the stream's labels, in stream order, and nothing else


def _memory(run: dict) -> tuple[ReplayMemory, dict[str, torch.Tensor]]:
    saved = load_file(str(run["dir"] / "train" / "online_memory.safetensors"))
    memory = ReplayMemory(200)
    memory.load_state({k[7:]: v for k, v in saved.items() if k.startswith("memory/")})
    return memory, saved


def test_ncm_equals_a_direct_computation(runs: dict, digits: Path) -> None:
    run = runs["generative"]
    model = run["model"].eval()
    memory, saved = _memory(run)
    assert len(memory) == 200
    learner = get_learner("generative_ocl")(model, 10, {})
    learner.load_state({k[8:]: v for k, v in saved.items() if k.startswith("learner/")})
    learner.prepare(memory)
    feats: list[torch.Tensor] = []
    hook = model.net.get_submodule(head_path(model)).register_forward_pre_hook(lambda m, a: feats.append(a[0]))
    with torch.no_grad():
        model(memory.images)
        queries = memory.images[:50] + 0.1 * torch.randn_like(memory.images[:50])
        model(queries)
    hook.remove()
    mem_f, query_f = feats
    means = torch.zeros(10, mem_f.shape[1])
    for c in memory.labels.unique().tolist():
        rows = [mem_f[i] / mem_f[i].norm() for i in range(len(memory)) if memory.labels[i] == c]
        mean = torch.stack(rows).mean(0)
        means[c] = mean / mean.norm()
    present = torch.bincount(memory.labels, minlength=10) > 0
    assert torch.allclose(learner.means[present], means[present], atol=1e-6, rtol=0)
    expected = []
    for q in query_f:
        q = q / q.norm()
        distances = {c: float(((q - means[c]) ** 2).sum()) for c in range(10) if present[c]}
        expected.append(min(distances, key=distances.get))
    with torch.no_grad():
        assert learner.predict(queries)["ncm"].tolist() == expected


def _ms_reference(feats: torch.Tensor, labels: list[int], alpha: float, beta: float, lam: float,
                  eps: float) -> tuple[float, int, int]:
    """Wang et al. 2019, eq. 10-12, one anchor at a time; also how many pairs the mining dropped and kept."""
    n = len(labels)
    total = 0.0
    dropped = kept = 0
    for i in range(n):
        s = [float(feats[i] @ feats[k]) for k in range(n)]
        pos = [k for k in range(n) if k != i and labels[k] == labels[i]]
        neg = [k for k in range(n) if labels[k] != labels[i]]
        if not pos or not neg:
            continue  # nothing to mine against: the anchor adds 0
        kept_neg = [k for k in neg if s[k] + eps > min(s[j] for j in pos)]
        kept_pos = [j for j in pos if s[j] - eps < max(s[k] for k in neg)]
        kept += len(kept_neg) + len(kept_pos)
        dropped += len(neg) + len(pos) - len(kept_neg) - len(kept_pos)
        total += 1 / alpha * torch.log1p(torch.tensor(sum(torch.exp(torch.tensor(-alpha * (s[j] - lam))).item()
                                                           for j in kept_pos), dtype=torch.float64)).item()
        total += 1 / beta * torch.log1p(torch.tensor(sum(torch.exp(torch.tensor(beta * (s[k] - lam))).item()
                                                          for k in kept_neg), dtype=torch.float64)).item()
    return total / n, dropped, kept


@pytest.mark.parametrize("alpha,beta,lam,eps", [(2.0, 50.0, 1.0, 0.1), (2.0, 40.0, 0.5, 0.1), (1.0, 10.0, 0.3, 0.0)])
def test_multi_similarity_loss_matches_the_formula(alpha: float, beta: float, lam: float, eps: float) -> None:
    gen = torch.Generator().manual_seed(3)
    labels = [0, 0, 0, 1, 1, 2, 2, 2, 3]  # class 3 has no positive
    centres = torch.randn(4, 8, generator=gen, dtype=torch.float64)
    feats = centres[labels] + 0.8 * torch.randn(len(labels), 8, generator=gen, dtype=torch.float64)
    feats = feats / feats.norm(dim=1, keepdim=True)
    got = multi_similarity_loss(feats, torch.tensor(labels), alpha=alpha, beta=beta, lam=lam, margin=eps)
    want, dropped, kept = _ms_reference(feats, labels, alpha, beta, lam, eps)
    assert abs(float(got) - want) <= 1e-6 * max(1.0, abs(want))
    assert want > 0 and dropped > 0 and kept > 0  # the batch exercises the mining both ways


@pytest.mark.parametrize("policy", ["reservoir", "balanced"])
def test_memory_policies(policy: str) -> None:
    memory = ReplayMemory(20, policy, seed=0)
    labels = torch.tensor([0] * 60 + [1] * 30 + [2] * 10)
    for i in range(0, 100, 10):
        memory.add(torch.arange(i, i + 10, dtype=torch.float32)[:, None], labels[i: i + 10])
    assert len(memory) == 20 and memory.seen == 100
    counts = torch.bincount(memory.labels, minlength=3).tolist()
    assert sum(counts) == 20
    if policy == "balanced":  # CBRS keeps the minority class whole and evens out the others
        assert counts[2] >= 5 and max(counts) - min(counts) <= 5
    assert all(labels[int(x)] == y for x, y in zip(memory.images[:, 0], memory.labels))
    copy = ReplayMemory(20, policy)
    copy.load_state(memory.state())
    assert torch.equal(copy.images, memory.images) and copy.seen_per_class == memory.seen_per_class


@pytest.fixture(scope="module")
def small(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The demo tasks with 12 training images per class: a 120-sample stream."""
    from peftc.train.demo import make_demo_data

    root = tmp_path_factory.mktemp("small") / "digits"
    make_demo_data(root, size=16, per_class=12, val_per_class=4)
    return root / "tasks.yaml"


@pytest.mark.parametrize("spec,learner", [("linear_probe", "generative_ocl"), ("clr", "er_ace"), ("bitfit", "taer")])
def test_any_compiled_model_is_a_learner(small: Path, tmp_path: Path, spec: str, learner: str) -> None:
    model = peftc.compile(spec, demo_cnn())
    frozen = {n: p.detach().clone() for n, p in model.net.named_parameters() if not p.requires_grad}
    options = OnlineOptions(overrides={"online": {"learner": learner}}, memory=50, image_size=16, quiet=True)
    record = train_stream(tmp_path / "art", small, options, model=model)
    assert record["learner"] == learner and record["samples"] == 120
    assert len(record["classifiers"][get_learner(learner).classifiers[0]]["matrix"]) == 5
    after = dict(model.net.named_parameters())
    assert frozen and all(torch.equal(after[n], v) for n, v in frozen.items())  # what the spec freezes stays


def test_resume_reaches_the_uninterrupted_state(small: Path, tmp_path: Path) -> None:
    net = demo_cnn()

    def run(directory: Path, stop_at: int | None = None, resume: bool = False) -> dict:
        def stop(step: int, positions: range, loss: float) -> None:
            if step == stop_at:
                raise KeyboardInterrupt

        options = OnlineOptions(image_size=16, quiet=True, memory=50, checkpoint_every=3, resume=resume,
                                on_step=stop)
        return train_stream(directory, small, options,
                            model=peftc.load(directory, backbone=net) if resume else peftc.compile(
                                "generative_ocl", net))

    whole = run(tmp_path / "whole")
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path / "cut", stop_at=8)  # after the checkpoint of step 6 and the boundary at step 3
    assert (tmp_path / "cut" / "train" / "stream" / "checkpoint").is_dir()
    assert not (tmp_path / "cut" / "train" / "online.json").exists()
    resumed = run(tmp_path / "cut", resume=True)
    for key in ("classifiers", "steps", "samples"):
        assert resumed[key] == whole[key]
    a = load_file(str(tmp_path / "whole" / "delta.safetensors"))
    b = load_file(str(tmp_path / "cut" / "delta.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    ma = load_file(str(tmp_path / "whole" / "train" / "online_memory.safetensors"))
    mb = load_file(str(tmp_path / "cut" / "train" / "online_memory.safetensors"))
    assert ma.keys() == mb.keys() and all(torch.equal(ma[k], mb[k]) for k in ma)
    assert not (tmp_path / "cut" / "train" / "stream").exists()


# -- the CLI: a small stream on resnet18, eval side by side, bad input ------------------------------------------

@pytest.fixture(scope="module")
def cli_art(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    from peftc.train.demo import make_demo_data

    root = tmp_path_factory.mktemp("cli")
    make_demo_data(root / "digits", tasks=3, size=16, per_class=10, val_per_class=4)
    result = CliRunner().invoke(app, ["compile", "generative_ocl", "--backbone", "resnet18", "-o",
                                      str(root / "art")])
    assert result.exit_code == 0, result.output
    return root / "art", root / "digits"


def _stream_file(path: Path, digits: Path, **extra) -> Path:
    doc = {"root": str(digits), "tasks": [{"name": "task1", "data": "task1"}, {"name": "task2", "data": "task2"}],
           **extra}
    path.write_text(yaml.safe_dump(doc))
    return path


def test_cli_stream_and_eval_side_by_side(cli_art: tuple[Path, Path], tmp_path: Path) -> None:
    art, digits = cli_art
    work = tmp_path / "art"
    import shutil

    shutil.copytree(art, work)
    runner = CliRunner()
    result = runner.invoke(app, ["train", str(work), "--online", "--sequence", str(digits / "tasks.yaml"),
                                 "--image-size", "16", "--memory", "30", "--json"])
    assert result.exit_code == 0, result.output
    record = json.loads(result.stdout)
    assert record["memory"] == 30 and record["batch_size"] == 10 and record["samples"] == 60
    assert (work / "train" / "online.png").is_file()
    result = runner.invoke(app, ["eval", str(work), "--json"])
    assert result.exit_code == 0, result.output
    evaluated = json.loads(result.stdout)
    assert evaluated["classifiers"] == ["ncm", "softmax"]
    for c in ("ncm", "softmax"):  # the saved model and memory give the stream's final row again
        final = record["classifiers"][c]["matrix"][-1]
        assert [row[c] for row in evaluated["tasks"].values()] == pytest.approx(final)
    table = runner.invoke(app, ["eval", str(work)])
    assert "ncm" in table.output and "softmax" in table.output and "recent-class share" in table.output


@pytest.mark.parametrize("extra,message", [
    ({"tasks": [{"name": "task1", "data": "task1", "classes": ["zero", "seven"]}]}, "missing class folder"),
    ({"memory": 5000}, "is larger than the stream"),
    ({"batch_size": 0}, "batch_size"),
    ({"split": 2}, "split: and class_order: go with data:"),
])
def test_bad_input_one_message(cli_art: tuple[Path, Path], tmp_path: Path, extra: dict, message: str) -> None:
    art, digits = cli_art
    stream = _stream_file(tmp_path / "stream.yaml", digits, **extra)
    before = sorted(p.name for p in art.rglob("*"))
    result = CliRunner().invoke(app, ["train", str(art), "--stream", str(stream), "--image-size", "16"])
    assert result.exit_code == 1, result.output
    assert message in result.output and "Traceback" not in result.output
    assert sorted(p.name for p in art.rglob("*")) == before  # nothing written


def _tiny_learner(name: str, args: dict | None = None) -> tuple[OnlineLearner, torch.Tensor, torch.Tensor]:
    model = peftc.compile(FULL, demo_cnn()).train()
    learner = get_learner(name)(model, 10, args or {})
    gen = torch.Generator().manual_seed(0)
    learner.observe(torch.tensor([0, 1, 2, 3, 4, 5]))  # classes seen before
    return learner, torch.randn(6, 3, 16, 16, generator=gen), torch.randn(4, 3, 16, 16, generator=gen)


def test_taer_online_keeps_the_rows_of_absent_classes() -> None:
    learner, images, replayed = _tiny_learner("taer")
    labels, replay_labels = torch.tensor([4, 5, 4, 5, 4, 5]), torch.tensor([0, 1, 2, 3])
    learner.observe(labels)
    fc = learner.model.net.get_submodule(head_path(learner.model))
    before = fc.weight.detach().clone(), fc.bias.detach().clone()
    learner.loss(images, labels, (replayed, replay_labels)).backward()
    torch.optim.SGD(learner.model.trainable_parameters(), lr=0.5).step()
    changed = (fc.weight.detach() != before[0]).any(1)
    assert changed.tolist() == [c in (4, 5) for c in range(10)]
    assert ((fc.bias.detach() != before[1]) == changed).all()
    assert (learner.model.net.get_submodule("0").weight.grad != 0).any()  # the body learns from the replay too


def test_er_ace_loss_is_mammoths() -> None:
    import torch.nn.functional as F

    learner, images, replayed = _tiny_learner("er_ace")
    labels, replay_labels = torch.tensor([2, 3, 2, 3, 2, 3]), torch.tensor([0, 1, 4, 5])

    def mammoth(*unmasked: int) -> torch.Tensor:
        with torch.no_grad():
            logits = learner.model(images)
            keep = torch.zeros(10, dtype=torch.bool)
            keep[list(unmasked)] = True
            stream = F.cross_entropy(logits.masked_fill(~keep, torch.finfo(logits.dtype).min), labels)
            return stream + F.cross_entropy(learner.model(replayed), replay_labels)

    learner.observe(labels)
    with torch.no_grad():  # present classes, and from seen_so_far.max() = 5 on
        assert torch.allclose(learner.loss(images, labels, (replayed, replay_labels)), mammoth(2, 3, 5, 6, 7, 8, 9),
                              atol=1e-6)
        learner.observe(torch.tensor([9]))  # the last class seen: only the present classes stay
        assert torch.allclose(learner.loss(images, labels, (replayed, replay_labels)), mammoth(2, 3), atol=1e-6)


def test_a_folder_split_into_tasks_by_a_seeded_class_order(tmp_path: Path) -> None:
    from PIL import Image

    names = [f"c{i}" for i in range(6)]
    for name in names:
        (tmp_path / "data" / name).mkdir(parents=True)
        for i in range(5):
            Image.new("RGB", (8, 8), (40 * i, 0, 0)).save(tmp_path / "data" / name / f"{i}.png")
    orders = []
    for seed in (0, 1, 2):
        file = tmp_path / f"s{seed}.yaml"
        file.write_text(f"data: data\nsplit: 3\nseed: {seed}\n")
        stream = build_stream(read_stream(file))
        assert stream.tasks == ("task1", "task2", "task3") and sorted(stream.classes) == names
        assert [len(d.classes) for d in stream.data] == [2, 2, 2]
        assert len(stream) == 6 * 4 and stream.boundaries == [8, 16, 24]  # one image per class held out
        orders.append(stream.classes)
    assert len({tuple(o) for o in orders}) > 1  # the seed orders the classes
    (tmp_path / "sorted.yaml").write_text("data: data\nsplit: 2\nclass_order: sorted\n")
    assert build_stream(read_stream(tmp_path / "sorted.yaml")).classes == names
