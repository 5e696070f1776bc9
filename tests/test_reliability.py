"""What a hostile or careless user types, writes or kills: one located message, never a traceback, a lost
artifact or a silent wrong result (the README's "Guarantees")."""

from __future__ import annotations

import copy
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

import peftc
import peftc.storage.atomic as atomic
from peftc.cli import app
from peftc.errors import ArtifactError, PeftcError, SpecError
from peftc.language import builtin_specs, load_spec
from peftc.language.predicate import Predicate, PredicateError
from peftc.language.reader import MAX_BYTES, read_yaml_file
from peftc.storage.artifact import read_manifest
from peftc.train.data import SequenceError, read_sequence

ROOT = Path(__file__).resolve().parents[1]
runner = CliRunner()
FAST = settings(max_examples=20, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)


def cli(*args: str) -> tuple[int, str]:
    result = runner.invoke(app, [str(a) for a in args])
    return result.exit_code, result.output


@pytest.fixture(scope="module")
def artifact(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """CLR on resnet18 with two tasks, saved once for the module (tests copy it before changing it)."""
    model = peftc.compile("clr", "resnet18")
    model.add_task("b", num_classes=3)
    path = tmp_path_factory.mktemp("art") / "clr"
    model.save(path)
    return path


def _copy(artifact: Path, to: Path) -> Path:
    import shutil

    return Path(shutil.copytree(artifact, to))


def _dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", ""])
    child.wait()
    return child.pid


# -- 1. predicates are bounded and total ------------------------------------------------------------------------

HOSTILE = ["1/0 == 1", "min([]) > 0", "'abc'[10] == 'a'", 'int(float("inf")) > 0', "len('a' * 1000000000) > 0",
           "-" * 10_000 + "1", "+".join(["1"] * 100_000), "not " * 40 + "True", "int('9' * 5000) > 0",
           "[1, 2] * 100000 == []", "x.__class__", "__import__('os')"]


@pytest.mark.parametrize("expr", HOSTILE, ids=range(len(HOSTILE)))
def test_hostile_when_is_one_located_message(expr: str, tmp_path: Path) -> None:
    spec = tmp_path / "s.yaml"
    spec.write_text(yaml.safe_dump({"peftc": 1, "name": "s", "rules": [{"freeze": {}, "when": expr}]}))
    with pytest.raises(SpecError) as info:
        load_spec(spec)
    assert f"{spec}:" in str(info.value) and "rules[0].when" in str(info.value)


def test_where_that_fails_on_every_node_says_why() -> None:
    where = "{type: Conv2d, where: 'int(float(\"inf\")) > 0'}"
    code, out = cli("inspect", "resnet18", "--image-size", "32", "--filter", where)
    assert code == 1 and "OverflowError" in out and "Traceback" not in out, out
    with pytest.raises(PredicateError, match="at most 10,000"):
        Predicate("len(name * 100000) > 0")({"name": "conv"})


# -- 2. every YAML reader is bounded ----------------------------------------------------------------------------

LAUGHS = "peftc: 1\nname: x\nrules: []\n" + "a0: &a0 [x, x, x, x, x, x, x, x, x]\n" + "".join(
    f"a{i}: &a{i} [*a{i - 1}, *a{i - 1}, *a{i - 1}, *a{i - 1}, *a{i - 1}, *a{i - 1}, *a{i - 1}, *a{i - 1}, *a{i - 1}]\n"
    for i in range(1, 9))
BAD_YAML = {
    "billion laughs": (LAUGHS.encode(), "expands to more than"),
    "self alias": (b"peftc: 1\nname: x\nrules: []\nnotes: &a [*a]\n", "refers to a collection that contains it"),
    "latin-1": ("peftc: 1\nname: caf\xe9\nrules: []\n".encode("latin-1"), "is not UTF-8 text (byte 0xe9)"),
    "deep": (b"peftc: 1\nname: x\nrules: " + b"[" * 5000 + b"]" * 5000 + b"\n", "nests deeper than"),
    "huge": (b"peftc: 1\nname: x\nrules:\n" + b"  - freeze: {}\n" * (MAX_BYTES // 15), "larger than"),
}


@pytest.mark.parametrize("case", list(BAD_YAML))
def test_hostile_yaml_is_one_message_for_specs_and_task_files(case: str, tmp_path: Path) -> None:
    data, message = BAD_YAML[case]
    path = tmp_path / "x.yaml"
    path.write_bytes(data)
    with pytest.raises(SpecError, match=re.escape(message)) as spec_err:
        load_spec(path)
    with pytest.raises(SequenceError, match=re.escape(message)) as seq_err:
        read_sequence(path)
    assert str(path) in str(spec_err.value) and str(path) in str(seq_err.value)


# -- the property: mutated specs, manifests and task files validate or fail with one located message -----------

SCALARS = st.one_of(st.none(), st.booleans(), st.integers(min_value=-(10**30), max_value=10**30),
                    st.floats(allow_nan=True), st.text(max_size=30), st.sampled_from(HOSTILE),
                    st.sampled_from(["$rank", "${nope}", "re:(", "layer[", "*", "fn:", "::0", "1::", "Conv2d"]))
VALUES = st.recursive(SCALARS, lambda inner: st.one_of(st.lists(inner, max_size=3),
                                                      st.dictionaries(st.text(max_size=8), inner, max_size=3)),
                      max_leaves=8)


def _paths(data: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    out = [prefix]
    if isinstance(data, dict):
        for key, value in data.items():
            out += _paths(value, (*prefix, key))
    elif isinstance(data, list):
        for i, value in enumerate(data):
            out += _paths(value, (*prefix, i))
    return out


@st.composite
def mutated(draw: st.DrawFn, original: Any) -> Any:
    """``original`` with 1–3 mutations: a value replaced, a key removed, an unknown key added."""
    data = copy.deepcopy(original)
    for _ in range(draw(st.integers(1, 3))):
        path = draw(st.sampled_from(_paths(data)))
        if not path:
            continue
        *head, last = path
        parent = data
        for part in head:
            parent = parent[part]
        action = draw(st.sampled_from(["replace", "remove", "add"]))
        if action == "replace":
            parent[last] = draw(VALUES)
        elif action == "remove":
            del parent[last]
        elif isinstance(parent, dict):
            parent[draw(st.text(min_size=1, max_size=8))] = draw(VALUES)
    return data


def _spec_data() -> dict[str, Any]:
    return {name: read_yaml_file(path, SpecError).data for name, path in sorted(builtin_specs().items())}


SPECS = _spec_data()


@FAST
@given(st.sampled_from(sorted(SPECS)).flatmap(lambda name: mutated(SPECS[name])), st.booleans())
def test_mutated_builtin_specs_load_or_fail_with_a_location(tmp_path_factory, doc: Any, alias: bool) -> None:
    path = tmp_path_factory.mktemp("spec") / "mutant.yaml"
    if alias and isinstance(doc, dict) and isinstance(doc.get("rules"), list) and doc["rules"]:
        doc["rules"].append(doc["rules"][0])  # one object twice: the dump writes an anchor and an alias
    path.write_text(yaml.safe_dump(doc, allow_unicode=True, sort_keys=False), encoding="utf-8")
    try:
        spec = load_spec(path)
    except PeftcError as exc:
        assert str(path) in str(exc) or "--set" in str(exc), str(exc)
        return
    assert spec.name and isinstance(spec.rules, tuple)


@FAST
@given(st.data())
def test_mutated_manifests_are_read_or_refused_with_a_location(artifact: Path, tmp_path_factory, data) -> None:
    manifest = json.loads((artifact / "peftc.json").read_text())
    target = tmp_path_factory.mktemp("man")
    (target / "peftc.json").write_text(json.dumps(data.draw(mutated(manifest)), default=str))
    try:
        read = read_manifest(target)
    except ArtifactError as exc:
        assert str(target / "peftc.json") in str(exc), str(exc)
        return
    assert {t["name"] for t in read["tasks"]} >= {read["active_task"]}


@FAST
@given(st.data())
def test_mutated_task_files_are_read_or_refused_with_a_location(tmp_path_factory, data) -> None:
    original = {"root": ".", "epochs": 2, "tasks": [{"name": "a", "data": "a", "classes": ["x", "y"]},
                                                     {"name": "b", "data": "b", "epochs": 1}]}
    path = tmp_path_factory.mktemp("seq") / "tasks.yaml"
    path.write_text(yaml.safe_dump(data.draw(mutated(original)), allow_unicode=True))
    try:
        seq = read_sequence(path)
    except SequenceError as exc:
        assert str(path) in str(exc), str(exc)
        return
    assert seq.tasks


# -- 3. a manifest is checked before use ------------------------------------------------------------------------

MANIFESTS = {
    "no backbone": (lambda m: m.pop("backbone"), "backbone: missing required key"),
    "huge seed": (lambda m: m["backbone"].update(seed=10**30), "backbone.seed"),
    "active task null": (lambda m: m.update(active_task=None), "active_task"),
    "active task unknown": (lambda m: m.update(active_task="zzz"), "is not one of the tasks"),
    "huge classes": (lambda m: m["tasks"][0].update(classes=10**12), "tasks[0].classes"),
    "delta elsewhere": (lambda m: m["delta"].update(file="../../etc/passwd"), "delta.file"),
    "tasks repeat": (lambda m: m["tasks"].append(dict(m["tasks"][0])), "tasks repeat a name"),
    "hash not hex": (lambda m: m["backbone"].update(hash="zz"), "backbone.hash"),
}


@pytest.mark.parametrize("case", list(MANIFESTS))
def test_malformed_manifest_is_one_message_through_every_command(case: str, artifact: Path, tmp_path: Path) -> None:
    path = _copy(artifact, tmp_path / "art")
    manifest = json.loads((path / "peftc.json").read_text())
    change, message = MANIFESTS[case]
    change(manifest)
    (path / "peftc.json").write_text(json.dumps(manifest))
    with pytest.raises(ArtifactError, match=re.escape(message)):
        peftc.load(path)
    for args in (["export", path, "--onnx", tmp_path / "x.onnx"], ["diff", "--artifacts", path, artifact],
                 ["eval", path]):
        code, out = cli(*args)
        assert code == 1 and "peftc.json" in out and "Traceback" not in out, (args, out)


@pytest.mark.parametrize(("text", "message"), [("[]", "expected a JSON object"), ("[" * 100_000, "nests deeper"),
                                               ("{\"format\": 1", "not valid JSON"), ("\xff", "not valid JSON")])
def test_manifest_that_is_not_one(text: str, message: str, tmp_path: Path) -> None:
    (tmp_path / "peftc.json").write_bytes(text.encode("latin-1"))
    with pytest.raises(ArtifactError, match=message):
        read_manifest(tmp_path)


def test_delta_of_a_task_the_manifest_does_not_list_is_refused(artifact: Path, tmp_path: Path) -> None:
    path = _copy(artifact, tmp_path / "art")
    manifest = json.loads((path / "peftc.json").read_text())
    manifest["tasks"] = [t for t in manifest["tasks"] if t["name"] != "b"]
    (path / "peftc.json").write_text(json.dumps(manifest))
    with pytest.raises(ArtifactError, match="belongs to task 'b', which peftc.json does not list"):
        peftc.load(path)


# -- 4. atomic means atomic -------------------------------------------------------------------------------------


def _active(path: Path) -> str:
    return json.loads((path / "peftc.json").read_text())["active_task"]


@pytest.fixture
def two_versions(artifact: Path, tmp_path: Path) -> tuple[Path, Any]:
    """An artifact on disk (active task 'default') and the same model with active task 'b' to save over it."""
    path = _copy(artifact, tmp_path / "art")
    newer = peftc.load(path).set_task("b")
    return path, newer


def test_ctrl_c_between_the_two_renames_leaves_the_old_artifact(two_versions, monkeypatch) -> None:
    path, newer = two_versions
    monkeypatch.setattr(atomic, "_exchange", lambda a, b: False)  # the fallback: two renames
    real = Path.rename

    def rename(self: Path, target: Any) -> Any:
        if ".partial-" in self.name:  # the second rename: Ctrl-C arrives just before it
            raise KeyboardInterrupt
        return real(self, target)

    monkeypatch.setattr(Path, "rename", rename)
    with pytest.raises(KeyboardInterrupt) as info:
        newer.save(path)
    assert not isinstance(info.value, atomic.InterruptedAfterWrite)  # nothing was written: says so
    monkeypatch.undo()
    assert _active(path) == "default" and peftc.load(path).active_task == "default"
    assert sorted(p.name for p in path.parent.iterdir()) == ["art"]


def test_kill_between_the_two_renames_is_repaired_on_the_next_open(two_versions) -> None:
    path, _ = two_versions
    aside = path.parent / f".art.old-{_dead_pid()}-0000abcd"  # what a kill -9 in the gap leaves: no artifact
    path.rename(aside)
    assert peftc.load(path).active_task == "default" and not aside.exists()


def test_ctrl_c_during_the_swap_is_held_and_the_cli_says_the_save_happened(two_versions, monkeypatch) -> None:
    path, newer = two_versions
    real = atomic._exchange

    def exchange(a: Path, b: Path) -> bool:
        os.kill(os.getpid(), signal.SIGINT)  # held back until the swap is complete
        return real(a, b)

    monkeypatch.setattr(atomic, "_exchange", exchange)
    with pytest.raises(atomic.InterruptedAfterWrite, match="was written before the interrupt"):
        newer.save(path)
    assert _active(path) == "b" and sorted(p.name for p in path.parent.iterdir()) == ["art"]
    code, out = cli("compile", "clr", "-b", "resnet18", "-o", path)
    assert code == 130 and "was written before the interrupt" in out and _active(path) == "default"


def test_swap_exchanges_in_one_step_and_sweeps_dead_writers_staging(two_versions) -> None:
    path, newer = two_versions
    dead = _dead_pid()
    stale = [path.parent / f".art.partial-{dead}-00000001", path / "train" / f".ckpt.partial-{dead}-00000002"]
    for folder in stale:
        folder.mkdir(parents=True)
    live = path.parent / f".art.partial-{os.getppid()}-00000003"  # another process, still writing
    live.mkdir()
    inode = path.stat().st_ino
    newer.save(path)
    assert _active(path) == "b" and path.stat().st_ino != inode
    assert not stale[0].exists() and live.exists()
    assert not (path / "train" / stale[1].name).exists()  # a dead checkpoint's staging is not carried along
    (live / "mark").write_text("live")
    if atomic._exchange(live, path):  # Linux renameat2: one step, no window at all
        assert (path / "mark").is_file() and (live / "peftc.json").is_file()
    else:  # a file system without it: nothing moved (the two-rename fallback is tested above)
        assert (live / "mark").is_file() and (path / "peftc.json").is_file()


def test_other_writers_are_atomic(tmp_path: Path, monkeypatch) -> None:
    out = tmp_path / "d.json"
    out.write_text("previous")

    def full(fd: int) -> None:  # the disk fills while the new file is flushed
        raise OSError(28, "No space left on device")

    from peftc.cli.diff import _write  # what `peftc diff -o` writes with

    with monkeypatch.context() as patch:
        patch.setattr(atomic.os, "fsync", full)
        with pytest.raises(PeftcError, match="No space left on device"):
            _write(out, "new")
    assert out.read_text() == "previous"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d.json"]
    demo = tmp_path / "demo"
    demo.mkdir()
    (demo / "tasks.yaml").write_text("mine")
    code, text = cli("demo-data", demo)
    assert code == 1 and "already holds a tasks.yaml" in text and (demo / "tasks.yaml").read_text() == "mine"


# -- 5. errors of the environment are messages ------------------------------------------------------------------


def test_full_disk_on_compile_is_a_message(tmp_path: Path, monkeypatch) -> None:
    from safetensors import SafetensorError

    def full(*args: Any, **kwargs: Any) -> None:
        raise SafetensorError("Error while serializing: IoError(No space left on device (os error 28))")

    monkeypatch.setattr("safetensors.torch.save_file", full)
    code, out = cli("compile", "clr", "-b", "resnet18", "-o", tmp_path / "out")
    assert code == 1 and "No space left on device" in out and "Traceback" not in out
    assert list(tmp_path.iterdir()) == []


def test_ctrl_c_while_importing_exits_130_in_one_line() -> None:
    script = ("import builtins\nreal = builtins.__import__\n"
              "def imp(name, *a, **k):\n    if name.startswith('peftc.cli'):\n        raise KeyboardInterrupt\n"
              "    return real(name, *a, **k)\nbuiltins.__import__ = imp\n"
              "from peftc.launch import main\nmain()\n")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert done.returncode == 130 and done.stderr == "interrupted\n"


def test_ctrl_c_inside_an_import_that_swallows_it_still_exits_130(tmp_path: Path) -> None:
    """Some libraries catch KeyboardInterrupt while importing and leave a broken module; peftc exits instead."""
    (tmp_path / "slow_library.py").write_text("import os, signal, time\nos.kill(os.getpid(), signal.SIGINT)\n"
                                              "time.sleep(5)\n")
    script = (f"import sys\nsys.path.insert(0, {str(tmp_path)!r})\nfrom peftc.launch import install_interrupt_handler\n"
              "install_interrupt_handler()\ntry:\n    import slow_library\nexcept BaseException:\n    pass\n"
              "print('carried on with a half-imported library')\n")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert done.returncode == 130 and done.stderr == "interrupted\n" and done.stdout == ""


@pytest.mark.parametrize(("args", "option"), [
    (["run", "x", "--batch", "1000000000"], "--batch"), (["run", "x", "--threads", "-1"], "--threads"),
    (["inspect", "resnet18", "--image-size", "100000"], "--image-size"), (["backbones", "--limit", "-1"], "--limit"),
    (["compile", "clr", "-b", "resnet18", "--seed", "-5"], "--seed")])
def test_numeric_options_are_range_checked(args: list[str], option: str) -> None:
    code, out = cli(*args)
    assert code == 2 and option in out and "Traceback" not in out


def test_out_of_memory_names_the_size_options(monkeypatch) -> None:
    def exhausted(*args: Any, **kwargs: Any) -> None:
        raise RuntimeError("[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: can't allocate memory")

    monkeypatch.setattr("peftc.tools.inspect.inspect_nodes", exhausted)
    code, out = cli("inspect", "resnet18", "--image-size", "4096", "--filter", "type: Conv2d")
    assert code == 1 and "out of memory with --image-size 4096" in out


# -- 7. exports stay inside their folder ------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["../../../x", "a/b", "..", ".hidden", 'q"uote', "x" * 200, ""])
def test_triton_name_stays_one_folder(name: str, artifact: Path, tmp_path: Path) -> None:
    from peftc.export.errors import ExportError
    from peftc.export.triton import triton_config, write_repository

    with pytest.raises(ExportError, match="Triton model name"):
        write_repository(tmp_path / "m.onnx", tmp_path / "repo", name, "")
    with pytest.raises(ExportError, match="Triton model name"):
        triton_config(name, input_size=(3, 8, 8), classes=2, all_tasks=False)
    code, out = cli("export", artifact, "--triton", tmp_path / "repo", "--name", name)
    assert code == 1 and "Triton model name" in out and not (tmp_path / "repo").exists()


def test_export_reports_the_opset_it_wrote(tmp_path: Path, monkeypatch) -> None:
    import onnx
    from onnx import TensorProto, helper

    import peftc.export.onnx as onnx_export
    from peftc.export.source import Deployable

    class Program:  # what the exporter hands back: it writes opset 18 whatever was asked
        def save(self, path: str, external_data: bool) -> None:
            x = helper.make_tensor_value_info("image", TensorProto.FLOAT, ["batch", 3])
            y = helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 3])
            graph = helper.make_graph([helper.make_node("Identity", ["image"], ["logits"])], "g", [x], [y])
            onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), path)

    monkeypatch.setattr(onnx_export, "_export", lambda deployable, opset: Program())
    monkeypatch.setattr(onnx_export, "_annotate", lambda program, deployable: None)
    module = torch_identity()
    deployable = Deployable(module, (3,), "default", ["default"], [3], module, None, "tiny", "tiny")
    result = onnx_export.write_onnx(deployable, tmp_path / "m.onnx", opset=1, check=False)
    assert result.opset == 18 and "opset 1 was asked for; the exporter wrote opset 18" in result.notes


def torch_identity() -> Any:
    from torch import nn

    return nn.Identity()


# -- 8. documented commands work as written ---------------------------------------------------------------------


def test_a_str_param_takes_what_the_user_typed() -> None:
    from peftc.language import parse_overrides

    spec = load_spec(ROOT / "docs" / "tutorial" / "stage_clr.yaml", parse_overrides(["pointwise=true", "stages=234"]))
    assert spec.values["stages"] == "234"


def test_ctrl_c_on_the_benchmark_runner_stops_the_running_suite() -> None:
    from benchmarks.__main__ import stop_group

    child = subprocess.Popen([sys.executable, "-c", "import subprocess, sys, time\n"
                              "p = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'])\n"
                              "print(p.pid, flush=True)\ntime.sleep(60)"],
                             start_new_session=True, stdout=subprocess.PIPE, text=True)
    grandchild = Path(f"/proc/{int(child.stdout.readline())}/stat")  # a process the suite started
    stop_group(child)
    assert child.poll() is not None
    for _ in range(100):
        if not grandchild.exists() or grandchild.read_text().split(") ")[1][0] in "ZX":  # gone, or dead unreaped
            return
        time.sleep(0.05)
    pytest.fail("a process the suite started is still running")
