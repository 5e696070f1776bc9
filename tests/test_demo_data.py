"""`peftc demo-data`: split digits from scikit-learn's bundled data, as folders of PNGs plus a tasks.yaml."""

from __future__ import annotations

import builtins
import json

import pytest
from PIL import Image
from typer.testing import CliRunner

from peftc.cli import app
from peftc.train.data import discover, read_sequence
from peftc.train.demo import DIGIT_NAMES, DemoDataError, make_demo_data

pytest.importorskip("sklearn")


def test_cli_writes_five_two_class_tasks(tmp_path):
    out = tmp_path / "demo"
    result = CliRunner().invoke(app, ["demo-data", str(out), "--per-class", "6", "--val-per-class", "3", "--json"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert [t["name"] for t in summary["tasks"]] == ["task1", "task2", "task3", "task4", "task5"]
    assert [t["classes"] for t in summary["tasks"]] == [list(DIGIT_NAMES[i:i + 2]) for i in range(0, 10, 2)]
    for t in summary["tasks"]:
        assert all(n == {"train": 6, "val": 3} for n in t["images"].values())
        data = discover(out / t["name"])  # readable as a train/ + val/ task folder
        assert data.layout == "split" and data.classes == tuple(sorted(t["classes"]))
        assert len(data.train) == 12 and len(data.val) == 6
    image = Image.open(next((out / "task3" / "train" / "four").iterdir()))
    assert image.size == (32, 32) and image.mode == "RGB"
    seq = read_sequence(out / "tasks.yaml")
    assert [t.name for t in seq.tasks] == ["task1", "task2", "task3", "task4", "task5"]
    assert seq.tasks[4].data == (out / "task5").resolve() and seq.tasks[4].classes == ["eight", "nine"]


def test_train_and_val_never_share_an_image_and_runs_repeat(tmp_path):
    make_demo_data(tmp_path / "a", tasks=2, size=16, per_class=5, val_per_class=4, seed=3)
    make_demo_data(tmp_path / "b", tasks=2, size=16, per_class=5, val_per_class=4, seed=3)
    for task in ("task1", "task2"):
        data = discover(tmp_path / "a" / task)
        assert not {p.name for p, _ in data.train.samples} & {p.name for p, _ in data.val.samples}
        again = discover(tmp_path / "b" / task)
        assert [p.name for p, _ in data.train.samples] == [p.name for p, _ in again.train.samples]
        assert [(p.parent.name, p.read_bytes()) for p, _ in data.val.samples] == \
            [(p.parent.name, p.read_bytes()) for p, _ in again.val.samples]
    assert Image.open(next((tmp_path / "a" / "task1" / "val" / "one").iterdir())).size == (16, 16)


def test_all_images_by_default_with_a_fifth_held_out(tmp_path):
    summary = make_demo_data(tmp_path / "d", tasks=1)
    counts = summary["tasks"][0]["images"]
    # scikit-learn's digits: 178 zeros and 182 ones; 20% of each class goes to val
    assert counts == {"zero": {"train": 143, "val": 35}, "one": {"train": 146, "val": 36}}


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"tasks": 6}, "1 to 5 two-class tasks"),
    ({"size": 4}, "at least 8"),
    ({"per_class": 0}, "--per-class must be at least 1"),
])
def test_bad_arguments(tmp_path, kwargs, message):
    with pytest.raises(DemoDataError, match=message):
        make_demo_data(tmp_path / "x", **kwargs)


def test_refuses_a_folder_that_is_not_demo_data(tmp_path):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    result = CliRunner().invoke(app, ["demo-data", str(tmp_path / "mine")])
    assert result.exit_code == 1
    assert "non-empty folder that is not demo data" in result.output
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"


def test_without_scikit_learn_the_message_says_what_to_install(tmp_path, monkeypatch):
    real_import = builtins.__import__

    def no_sklearn(name, *args, **kwargs):
        if name.startswith("sklearn"):
            raise ImportError("No module named 'sklearn'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_sklearn)
    with pytest.raises(DemoDataError, match=r"pip install 'peftc\[demo\]'"):
        make_demo_data(tmp_path / "d", tasks=1)
