"""The contract battery: every row of tests/contract_table.py runs the generic checks its expectations name.

The HF PEFT ``PeftCommonTester`` idea, for specs: what every method promises (identity at init for additive
methods, exact artifacts, task isolation, deterministic compiles, exact folding, ONNX parity) is tested once
here for every built-in spec on every test backbone, instead of once per method file. Compiled models are
shared: each row is compiled once per session and the tests that change a model work on a deep copy.

Golden fold files live in tests/golden/fold/ (one per row that folds) and are only rewritten with
``pytest tests/test_contract.py --update-golden``. ONNX parity runs for the table's ``onnx="ci"`` rows by
default; the others are marked ``slow`` (``pytest -m slow tests/test_contract.py`` runs them).
"""

from __future__ import annotations

import copy
import fnmatch
import gc
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import fx, nn

import peftc
from peftc.analysis.trace import primary_output
from peftc.export.fold import FoldResult, fold
from peftc.export.ort import OrtRunner
from peftc.runtime.model import Compiled

from . import cached
from .conftest import synthetic_task, train_steps
from .contract_table import GOLDEN_FOLD, Row, rows
from .test_fold import assert_close, perturb  # perturb: seeded, every trainable tensor off its init

pytestmark = pytest.mark.usefixtures("one_thread", "_caches")  # one intra-op thread: 2 shared cores


def params(check: str) -> list[Any]:
    """The table's rows for ``check``, as pytest params (ONNX rows the table calls slow are marked slow)."""
    return [pytest.param(row, id=row.id, marks=[pytest.mark.slow] if check == "onnx" and row.onnx == "slow" else [])
            for row in rows(check)]


# -- shared models --------------------------------------------------------------------------------------------
_FRESH: dict[str, Compiled] = {}


def fresh(row: Row) -> Compiled:
    """The row compiled once (seed 0) on its cached backbone; never modified (copy it first)."""
    if row.id not in _FRESH:
        _FRESH[row.id] = peftc.compile(row.spec, row.module(), **row.params)
    return _FRESH[row.id]


def state(model: Compiled) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.net.state_dict().items()}


def out(model: Compiled, x: torch.Tensor) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(x, **model.stream_examples(len(x)))  # second inputs (stream rules), if the spec adds any


def match(globs: tuple[str, ...], name: str) -> bool:
    return any(fnmatch.fnmatchcase(name, glob) for glob in globs)


@dataclass
class TwoTasks:
    """A row's model after: perturb task A (the default), add task B, train B a few steps, switch back to A."""

    model: Compiled
    a: str
    a_state: dict[str, torch.Tensor]
    a_out: torch.Tensor
    b_start: dict[str, torch.Tensor]
    b_state: dict[str, torch.Tensor]


_TWO: dict[str, TwoTasks] = {}


@pytest.fixture(scope="module")
def _caches():
    """The row caches live as long as this module's tests: the models go before the next test file runs."""
    yield
    for store in (_FRESH, _TWO, _PLAIN, _REFERENCE):
        store.clear()
    gc.collect()


def two_tasks(row: Row) -> TwoTasks:
    if row.id not in _TWO:
        model = copy.deepcopy(fresh(row))
        x = row.image()
        init_out = out(model, x)
        perturb(model)
        a = model.active_task
        a_out = out(model, x)
        if row.trains:
            assert not torch.equal(a_out, init_out), "perturbing the trainable tensors changed nothing"
        a_state = state(model)
        model.add_task("B").set_task("B")
        b_start = state(model)
        if row.trains:
            images, labels = synthetic_task(n=8, size=row.size)
            train_steps(model, images, labels, steps=2)
        b_state = state(model)
        model.set_task(a)
        _TWO[row.id] = TwoTasks(model, a, a_state, a_out, b_start, b_state)
    return _TWO[row.id]


# -- 1. identity at init --------------------------------------------------------------------------------------
_REFERENCE: dict[tuple[str, int], torch.Tensor] = {}


def reference(row: Row) -> tuple[torch.Tensor, torch.Tensor]:
    """(input, the untouched backbone's output) at the row's size; 224 shares tests/cached.py's reference."""
    if row.size == 224:
        return cached.image(), cached.reference_output(row.backbone)
    key = (row.backbone, row.size)
    if key not in _REFERENCE:
        with torch.no_grad():  # a mapping of outputs (HF's ModelOutput): the one peftc compiles for
            _REFERENCE[key] = primary_output(row.module().eval()(row.image()))
    return row.image(), _REFERENCE[key]


@pytest.mark.parametrize("row", params("identity"))
def test_identity_at_init(row: Row) -> None:
    if row.identity_to is None:  # not additive: the table says so, and the model must really differ
        x, ref = reference(row)
        assert not torch.allclose(out(fresh(row), x), ref, atol=row.tol), f"{row.id} equals its backbone at init"
        return
    model = fresh(row) if row.runs("roundtrip") else peftc.compile(row.spec, row.module(), **row.params)
    if row.identity_to == "backbone":
        x, ref = reference(row)
    else:
        x = row.image()
        ref = out(peftc.compile(row.identity_to, row.module()), x)
    diff = (out(model, x) - ref).abs().max().item()
    assert diff <= row.tol, f"{row.id} differs from {row.identity_to} at init by {diff:.3g}"
    assert model.report.added_params > 0 or model.report.trainable_params > 0


# -- 2. save -> load ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("row", params("roundtrip"))
def test_save_load_equal_outputs(row: Row, tmp_path: Path) -> None:
    model = copy.deepcopy(two_tasks(row).model)
    x = row.image()
    if row.trains:
        assert not torch.equal(out(model, x), out(fresh(row), x)), "the saved model is still at init"
    else:
        assert not any(True for _ in model.trainable_parameters())
    model.save(tmp_path / "a")
    again = peftc.load(tmp_path / "a", backbone=row.module())
    assert again.tasks == model.tasks and again.active_task == model.active_task
    for task in model.tasks:
        model.set_task(task)
        again.set_task(task)
        assert torch.equal(out(again, x), out(model, x)), f"task {task}: outputs differ after load"
        ours, theirs = state(model), state(again)
        assert ours.keys() == theirs.keys()
        differ = [k for k in ours if not torch.equal(ours[k], theirs[k]) and not match(row.packed, k)]
        assert not differ, f"task {task}: tensors differ after load: {differ[:5]}"


# -- 3. task isolation ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("row", params("isolation"))
def test_task_isolation_outputs(row: Row) -> None:
    """Training task B leaves task A's outputs as they were, unless the table says tensors are shared."""
    two = two_tasks(row)
    assert any(not torch.equal(two.b_start[k], v) for k, v in two.b_state.items()), "training B changed nothing"
    now = out(two.model, row.image())
    if row.shared:  # the claim that tasks share trained tensors is checked too
        assert not torch.equal(now, two.a_out), f"{row.id}: task A unchanged, but the table says tensors are shared"
    else:
        assert torch.equal(now, two.a_out), f"{row.id}: training task B changed task A's outputs"


@pytest.mark.parametrize("row", params("isolation"))
def test_task_isolation_tensors(row: Row) -> None:
    """Every tensor of task A is bit-identical after training task B, except the globs the table shares.

    Tensors the table lists as ``leaks`` (task state that does change: a product bug) make this an xfail that
    names them; once they stop changing the test fails until the table is corrected."""
    two = two_tasks(row)
    now = state(two.model)
    assert now.keys() == two.a_state.keys()
    changed = [k for k, v in now.items() if not torch.equal(v, two.a_state[k])]
    unexpected = [k for k in changed if not match(row.shared, k) and not match(row.leaks, k)]
    assert not unexpected, f"{row.id}: training task B changed task A's {unexpected[:6]} ({len(unexpected)})"
    if row.shared:
        assert changed, f"{row.id}: nothing of task A changed, but the table says {row.shared} are shared"
    leaked = [k for k in changed if match(row.leaks, k) and not match(row.shared, k)]
    if row.leaks:
        assert leaked, f"{row.id}: {row.leaks} no longer leak between tasks: remove them from the table's leaks"
        pytest.xfail(f"product bug: training task B changed task A's {len(leaked)} tensors {leaked[:3]}…")


# -- 3b. where a new task starts ------------------------------------------------------------------------------
@pytest.mark.parametrize("row", params("new_task"))
def test_new_task_starts_where_declared(row: Row) -> None:
    two = two_tasks(row)
    init = state(fresh(row))
    for name, value in two.b_start.items():
        if match(row.renews, name):
            assert not torch.equal(value, two.a_state[name]) and not torch.equal(value, init[name]), name
            continue
        if match(row.shared, name) or match(row.inherits, name):
            expected, what = two.a_state[name], "task A's (perturbed) value"
        else:
            expected, what = init[name], "the compile's init"
        assert torch.equal(value, expected), f"{row.id}: new task's {name} is not {what}"
    model = copy.deepcopy(fresh(row))
    if row.head == "task":
        model.add_task("C", num_classes=3).set_task("C")
        assert out(model, row.image()).shape == (2, 3)
    else:
        with pytest.raises(peftc.PeftcError, match="no per-task head"):
            model.add_task("C", num_classes=3)


# -- 4. byte-identical artifacts ------------------------------------------------------------------------------
def _files(directory: Path) -> dict[str, bytes]:
    return {f.name: f.read_bytes() for f in sorted(directory.iterdir())}


@pytest.mark.parametrize("row", params("bytes"))
def test_equal_compiles_save_byte_identical_artifacts(row: Row, tmp_path: Path) -> None:
    fresh(row).save(tmp_path / "a")
    torch.randn(7)  # the caller's RNG moves between compiles; the artifact must not
    rng = torch.get_rng_state()
    peftc.compile(row.spec, row.module(), **row.params).save(tmp_path / "b")
    assert torch.equal(torch.get_rng_state(), rng), "compile consumed the caller's RNG"
    first = _files(tmp_path / "a")
    assert set(first) == {"peftc.json", "delta.safetensors"}
    assert _files(tmp_path / "b") == first
    peftc.compile(row.spec, row.module(), seed=1, **row.params).save(tmp_path / "c")
    other = _files(tmp_path / "c")["delta.safetensors"]
    assert (other != first["delta.safetensors"]) == row.seeded, (
        f"{row.id}: seed=1 {'did not change' if row.seeded else 'changed'} the delta (table: seeded={row.seeded})")


# -- 5. fold ≈ eager ------------------------------------------------------------------------------------------
_PLAIN: dict[str, FoldResult] = {}


def plain(row: Row) -> FoldResult:
    """The plain backbone (everything frozen, nothing inserted), folded: what a fully folding method becomes."""
    key = f"{row.backbone}@{row.size}"
    if key not in _PLAIN:
        _PLAIN[key] = fold(peftc.compile({"peftc": 1, "name": "plain", "rules": [{"freeze": {}}]}, row.module()))
    return _PLAIN[key]


def _target(gm: fx.GraphModule, node: fx.Node) -> str:
    if node.op == "call_module":
        return f"{type(gm.get_submodule(str(node.target))).__name__} {node.target}"
    if node.op == "call_function":
        return getattr(node.target, "__name__", str(node.target))
    return str(node.target)


def layers(gm: fx.GraphModule) -> list[str]:
    """The layers a folded graph calls, in order; nn.Identity (what a folded task key becomes) costs nothing."""
    return [_target(gm, n) for n in gm.graph.nodes
            if n.op == "call_module" and type(gm.get_submodule(str(n.target))) is not nn.Identity]


def fold_payload(row: Row, result: FoldResult) -> dict[str, Any]:
    r = result.report
    gm = result.module
    return {
        "row": row.id, "spec": row.spec, "backbone": row.backbone, "params": dict(row.params), "size": row.size,
        "task": r.task, "counts": r.counts(), "params_before": r.params_before, "params_after": r.params_after,
        "buffers_before": r.buffers_before, "buffers_after": r.buffers_after, "remaining": r.remaining,
        "actions": [f"{a.kind}: {a.source} -> {a.target}" for a in r.actions],
        "graph": [f"{n.name}: {n.op} {_target(gm, n)}" for n in gm.graph.nodes],
    }


@pytest.mark.parametrize("row", params("fold"))
def test_fold_matches_eager(row: Row, update_golden: bool) -> None:
    model = copy.deepcopy(fresh(row))
    perturb(model)
    x = row.image()
    eager = out(model, x)
    if row.trains:
        assert not torch.equal(eager, out(fresh(row), x)), "perturbing the trainable tensors changed nothing"
    result = fold(model)
    with torch.no_grad():
        assert_close(result.module(x), eager)
    assert not any(p.requires_grad for p in result.module.parameters())
    base = plain(row)
    if row.fold == "partial":
        assert result.report.remaining, f"{row.id}: everything folded, but the table says blocks stay"
    else:
        assert result.report.remaining == {}, result.report.remaining
    if row.fold == "backbone":
        assert result.report.params_after == base.report.params_after
        assert layers(result.module) == layers(base.module)
        ours, theirs = result.module.state_dict(), base.module.state_dict()
        assert {k: tuple(v.shape) for k, v in ours.items()} == {k: tuple(v.shape) for k, v in theirs.items()}
    elif row.fold == "plain":
        assert result.report.params_after > base.report.params_after
        assert set(layers(base.module)) < set(layers(result.module))

    path = GOLDEN_FOLD / f"{row.golden_name}.json"
    actual = json.loads(json.dumps(fold_payload(row, result)))
    if update_golden:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(actual, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
        return
    assert path.is_file(), f"no golden fold for {row.id} ({path.name}); create it with " \
                           "`pytest tests/test_contract.py --update-golden` and review it"
    expected = json.loads(path.read_text(encoding="utf-8"))
    for key in expected.keys() | actual.keys():
        assert expected.get(key) == actual.get(key), (
            f"{row.id}: fold's {key} no longer matches {path.name}; if intended, regenerate with "
            "`pytest tests/test_contract.py --update-golden` and commit the new reference")


def test_golden_fold_files_have_a_row() -> None:
    wanted = {f"{r.golden_name}.json" for r in rows("fold")}
    stale = sorted(p.name for p in GOLDEN_FOLD.glob("*.json") if p.name not in wanted)
    assert not stale, f"golden fold files without a row in tests/contract_table.py: {stale}"


# -- 6. ONNX parity -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("row", params("onnx"))
def test_onnx_parity(row: Row, tmp_path: Path) -> None:
    """Task B (not the active one) exported at batch 2, checked by the exporter at 3 and here at 5."""
    model = copy.deepcopy(fresh(row))
    a = model.active_task
    model.add_task("B").set_task("B")
    perturb(model)
    model.set_task(a)
    path = tmp_path / "model.onnx"
    result = peftc.export_onnx(model, path, task="B", image_size=(row.size, row.size))
    assert result.task == "B" and result.parity is not None and result.parity.ok and result.parity.batch == 3
    x = cached.image(row.size, 5)
    got = OrtRunner(str(path), "cpu")(x)
    want = out(model.set_task("B"), x).numpy()
    assert np.abs(got - want).max() <= 1e-4 * max(1.0, np.abs(want).max())
    if row.trains and row.shared != ("*",):  # the export really is task B's
        assert not np.array_equal(want, out(model.set_task(a), x).numpy())
    if row.fold == "backbone":
        assert result.fold is not None and result.fold["remaining"] == {}
        assert result.fold["params_after"] == plain(row).report.params_after


def test_the_table_covers_every_builtin_spec() -> None:
    from peftc.language import builtin_specs

    assert {r.spec for r in rows("roundtrip")} == set(builtin_specs())
