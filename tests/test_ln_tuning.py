"""LayerNorm tuning with task keys: METHODS-card counts, identity at init, per-sample routing, the three stages."""

from __future__ import annotations

import importlib.util

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import peftc
from peftc.methods.ln_tuning.blocks import TaskLayerNorm
from peftc.methods.ln_tuning.key import TaskKey
from peftc.methods.ln_tuning.select import mask_logits, task_selector

from .cached import module as cached
from .conftest import synthetic_task

HAS_PEFT = importlib.util.find_spec("peft") is not None


def _tiny(**params: object) -> peftc.runtime.model.Compiled:
    return peftc.compile("ln_tuning", cached("timm:vit_tiny_patch16_224", 32), **params)


def test_vit_b_16_counts() -> None:
    model = peftc.compile("ln_tuning", cached("timm:vit_base_patch16_224"))
    rules = {r.label: r for r in model.report.rules}
    assert rules["ln"].nodes == 25 and rules["ln"].task_params == 38_400
    assert rules["key"].task_params == 768
    assert model.report.task_state_without_head == 39_168
    model.add_task("t1")
    per_task = model.bank.task_tensors("t1")
    assert sum(t.numel() for t in per_task.values()) == 39_168  # the head is shared, not per task


@pytest.mark.parametrize(("backbone", "batch"), [
    ("vit_b_16", 1),
    ("timm:vit_tiny_patch16_224", 2),
    ("timm:deit_small_patch16_224", 1),
])
def test_identity_at_init(backbone: str, batch: int) -> None:
    model = peftc.compile("ln_tuning", cached(backbone))
    assert sum(isinstance(m, TaskLayerNorm) for m in model.modules()) == 25
    assert sum(isinstance(m, TaskKey) for m in model.modules()) == 1
    reference = cached(backbone)
    x = torch.randn(batch, 3, 224, 224)
    with torch.no_grad():
        assert (model(x) - reference(x)).abs().max().item() <= 1e-5
        model.add_task("next")
        assert (task_selector(model)(x) - reference(x)).abs().max().item() <= 1e-5


@pytest.mark.skipif(not HAS_PEFT, reason="HF PEFT is not installed")
def test_ln_count_equals_hf_peft_ln_tuning() -> None:
    import peft
    import timm

    vit = timm.create_model("vit_tiny_patch16_224")
    config = peft.LNTuningConfig(target_modules=r"blocks\.\d+\.norm[12]|norm")
    theirs, _ = peft.get_peft_model(vit, config).get_nb_trainable_parameters()
    rules = {r.label: r for r in peftc.compile("ln_tuning", cached("timm:vit_tiny_patch16_224")).report.rules}
    assert rules["ln"].task_params == theirs == 9_600


def test_new_task_inherits_rows_and_gets_an_orthogonal_key() -> None:
    model = _tiny()
    model.add_task("a").set_task("a")
    norm = model.net.get_submodule("blocks.3.norm2")
    with torch.no_grad():
        norm.weight.add_(1.0)
    model.add_task("b").set_task("b")
    assert torch.equal(norm.weight, model.bank.task_tensors("a")["blocks.3.norm2.weight"])
    assert norm.weight is not model.bank.task_tensors("a")["blocks.3.norm2.weight"]
    model.add_task("c")
    sel = task_selector(model)
    assert sel.candidates == ["a", "b", "c"]
    keys = sel.keys()
    assert torch.allclose(keys @ keys.T, torch.eye(3), atol=1e-5)


def _distinct_tasks(model: peftc.runtime.model.Compiled, names: list[str]) -> None:
    """Give every task its own random LN rows, so routing mistakes show in the outputs."""
    gen = torch.Generator().manual_seed(1)
    for name in names:
        model.add_task(name).set_task(name)
        with torch.no_grad():
            for m in model.modules():
                if isinstance(m, TaskLayerNorm):
                    m.weight.copy_(1 + 0.5 * torch.randn(m.weight.shape, generator=gen))
                    m.bias.copy_(0.5 * torch.randn(m.bias.shape, generator=gen))


def test_per_sample_selection_routes_each_sample_to_its_task() -> None:
    model = _tiny()
    names = ["a", "b", "c"]
    _distinct_tasks(model, names)
    sel = task_selector(model)
    x = torch.randn(6, 3, 32, 32)
    queries = sel.query(x)
    owner = [2, 0, 1, 1, 2, 0]  # sample i belongs to task names[owner[i]]
    # keys set to known directions: task t's key is the query of its first sample
    for t, name in enumerate(names):
        model.set_task(name)
        with torch.no_grad():
            sel.key_parameters()[0].copy_(queries[owner.index(t)])
    model.set_task("b")
    sims = sel.similarities(x)
    for i, t in enumerate(owner):  # the known directions really separate the samples
        if i == owner.index(t):
            assert sims[i].argmax().item() == t
    x_routed = x[[owner.index(t) for t in range(3)] * 2]  # each task's anchor sample, twice: a mixed batch
    expected_tasks = [0, 1, 2, 0, 1, 2]
    assert sel.predict(x_routed).tolist() == expected_tasks
    assert sel.predict_names(x_routed) == ["a", "b", "c", "a", "b", "c"]
    with torch.no_grad():
        routed = sel(x_routed)
        for i, t in enumerate(expected_tasks):
            model.set_task(names[t])
            alone = model(x_routed[i : i + 1])
            assert (routed[i] - alone[0]).abs().max().item() <= 1e-5
        model.set_task("b")
        assert torch.allclose(sel(x_routed, "b"), model(x_routed), atol=1e-6)
        given = sel(x_routed, ["c", "c", "a", "b", "a", "c"])
        model.set_task("c")
        assert torch.allclose(given[0], model(x_routed[:1])[0], atol=1e-5)


def test_query_is_the_frozen_pretrained_cls_token() -> None:
    model = _tiny()
    reference = cached("timm:vit_tiny_patch16_224", 32)
    _distinct_tasks(model, ["a"])  # trained rows must not change the query
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        expected = reference.forward_features(x)[:, 0]
    assert torch.allclose(task_selector(model).query(x), expected, atol=1e-5)


def test_three_training_stages_and_zero_forgetting() -> None:
    model = _tiny(num_classes=6)
    sel = task_selector(model)
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    images, labels = synthetic_task(classes=6, n=12, size=32)
    model.add_task("a").set_task("a")
    # (a) keys
    opt = torch.optim.Adam(sel.key_parameters(), lr=0.05)
    key_losses = []
    for _ in range(5):
        opt.zero_grad()
        loss = sel.key_loss(images)
        loss.backward()
        opt.step()
        key_losses.append(loss.item())
    assert key_losses[-1] < key_losses[0]
    # (b) LN rows + head with the true task, logits masked to the task's classes
    classes = [0, 1, 2]
    mine = labels < 3
    opt = torch.optim.Adam([*sel.ln_parameters(), *sel.head_parameters()], lr=1e-2)
    model.train()
    row_losses = []
    for _ in range(5):
        opt.zero_grad()
        loss = F.cross_entropy(mask_logits(model(images[mine]), classes), labels[mine])
        loss.backward()
        opt.step()
        row_losses.append(loss.item())
    model.eval()
    assert row_losses[-1] < row_losses[0]
    rows_a = {k: v.clone() for k, v in model.bank.task_tensors("a").items()}
    # next task; its rows start from a's
    model.add_task("b").set_task("b")
    assert all(torch.equal(model.bank.task_tensors("b")[k], v) for k, v in rows_a.items() if "norm" in k
               and "task_key" not in k)
    # (c) the shared head on features made with the predicted task
    opt = torch.optim.Adam(sel.head_parameters(), lr=1e-2)
    head_losses = []
    for _ in range(5):
        opt.zero_grad()
        with torch.no_grad():
            feats = sel.features(images)
        loss = F.cross_entropy(sel.classify(feats), labels)
        loss.backward()
        opt.step()
        head_losses.append(loss.item())
    assert head_losses[-1] < head_losses[0]
    assert all(torch.equal(model.bank.task_tensors("a")[k], v) for k, v in rows_a.items())  # task a untouched
    for name, p in model.named_parameters():
        if name in frozen:
            assert torch.equal(p, frozen[name]), name


def test_artifact_round_trip_keeps_keys_and_rows(tmp_path: object) -> None:
    model = _tiny()
    _distinct_tasks(model, ["a", "b"])
    sel = task_selector(model)
    with torch.no_grad():
        sel.key_parameters()[0].mul_(-1)  # b's key, changed from its init
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        before = sel(x)
    model.save(tmp_path / "ln")
    again = peftc.load(tmp_path / "ln", backbone=cached("timm:vit_tiny_patch16_224", 32))
    sel2 = task_selector(again)
    assert torch.equal(sel2.keys(), sel.keys().detach())
    with torch.no_grad():
        assert torch.allclose(sel2(x), before, atol=1e-6)


# -- blocks and the fold protocol ------------------------------------------------------------------------


def test_folded_layernorm_equals_the_bank_row() -> None:
    base = nn.LayerNorm(16, eps=1e-6)
    with torch.no_grad():
        base.weight.normal_()
        base.bias.normal_()
    bank = TaskLayerNorm.from_layernorm(base)
    x = torch.randn(2, 5, 16)
    assert torch.allclose(bank(x), base(x), atol=1e-6)
    with torch.no_grad():
        bank.weight.mul_(2)
    folded = bank.folded()
    assert type(folded) is nn.LayerNorm and folded.eps == 1e-6
    assert torch.allclose(folded(x), bank(x), atol=1e-6)
    rows_w, rows_b = torch.randn(2, 16), torch.randn(2, 16)
    with bank.routed(rows_w, rows_b):
        routed = bank(x)
    plain = F.layer_norm(x, (16,), None, None, 1e-6)
    assert torch.allclose(routed, plain * rows_w[:, None] + rows_b[:, None], atol=1e-6)
    assert isinstance(TaskKey(16).folded(), nn.Identity)


def test_errors() -> None:
    with pytest.raises(peftc.PeftcError, match="ln_bank blocks"):
        task_selector(peftc.compile("lora", cached("timm:vit_tiny_patch16_224", 32)))
    model = _tiny(keys=False)
    with pytest.raises(peftc.PeftcError, match="no task keys"):
        task_selector(model).predict(torch.randn(1, 3, 32, 32))
    with pytest.raises(peftc.PeftcError, match="unknown task 'zz'"):
        task_selector(model)(torch.randn(1, 3, 32, 32), "zz")
    class Doubled(nn.LayerNorm):  # a LayerNorm subclass computing something else
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return 2 * super().forward(x)

    odd = nn.Sequential(nn.Flatten(), nn.Linear(3 * 32 * 32, 8), Doubled(8), nn.Linear(8, 2))
    with pytest.raises(peftc.PeftcError, match="normalises differently"):
        peftc.compile("ln_tuning", odd, keys=False)


# -- channels-first norms ---------------------------------------------------------------------------------------


def test_convnext_channels_first_norms_are_banked() -> None:
    """ConvNeXt's LayerNorm2d (stem, downsampling, pre-head) becomes a bank over dim 1; the key follows the
    pre-head norm; identity at init, and the fold gives back the LayerNorm2d with the task's row."""
    import timm

    torch.manual_seed(0)
    backbone = timm.create_model("convnext_atto", depths=(1, 1, 1, 1), dims=(8, 16, 32, 64), num_classes=5).eval()
    model = peftc.compile("ln_tuning", backbone)
    x = torch.randn(2, 3, 32, 32)
    assert (model(x) - backbone(x)).abs().max() < 1e-5
    stem = model.net.get_submodule("stem.1")
    assert isinstance(stem, TaskLayerNorm) and stem.layout == "channels_first"
    assert isinstance(model.net.get_submodule("head.norm.task_key"), TaskKey)
    with torch.no_grad():
        stem.weight.mul_(2)
    folded = stem.folded()
    y = torch.randn(2, 8, 4, 4)
    assert type(folded) is type(backbone.stem[1]) and torch.allclose(folded(y), stem(y), atol=1e-6)


@pytest.mark.parametrize("groups", [1, 2])
def test_group_norm_bank_routes_per_sample(groups: int) -> None:
    torch.manual_seed(0)
    backbone = nn.Sequential(nn.Conv2d(3, 8, 3), nn.GroupNorm(groups, 8), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                             nn.Flatten(), nn.Linear(8, 3)).eval()
    with torch.no_grad():
        backbone[1].weight.normal_()
    model = peftc.compile("ln_tuning", backbone, keys=False)
    x = torch.randn(2, 3, 8, 8)
    assert torch.allclose(model(x), backbone(x), atol=1e-6)
    bank = model.net.get_submodule("1")
    assert bank.layout == "group" and bank.groups == groups
    rows_w, rows_b = torch.randn(2, 8), torch.randn(2, 8)
    h = torch.randn(2, 8, 4, 4)
    with bank.routed(rows_w, rows_b):
        routed = bank(h)
    each = [F.group_norm(h[i:i + 1], groups, rows_w[i], rows_b[i], bank.eps) for i in range(2)]
    assert torch.allclose(routed, torch.cat(each), atol=1e-6)
