"""The contract table: one row per (spec, backbone, params), with what the row is expected to do.

Every built-in spec (``peftc.language.builtin_specs()``) appears on each golden backbone, ``resnet18`` and
``timm:vit_tiny_patch16_224``: a pair the spec does not apply to is a row with ``applies=False`` and the start of
the error the compiler gives (its golden diff records that error). Further rows add variants (LoRA on all four
roles, 1-bit AdaptFormer), more backbones for identity at init (the canonicalisation path of torchvision's
``vit_b_16`` among them), and golden diffs on ``vit_b_16``.

The generic tests in ``tests/test_contract.py`` (and the golden diff in ``tests/test_diff.py``) read only this
table: an expectation is a field here, never a special case in a test. ``checks`` says which generic tests a
row runs (see :data:`ALL_CHECKS`).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from peftc.language import builtin_specs

from . import cached

RESNET18 = "resnet18"
VIT_TINY = "timm:vit_tiny_patch16_224"
DEIT_SMALL = "timm:deit_small_patch16_224"
VIT_B_16 = "vit_b_16"  # torchvision: nn.MultiheadAttention, canonicalised into qkv/proj Linears
DINOV2 = "timm:vit_small_patch14_dinov2"  # rows of these four are built tiny (Row.build)
CONVNEXT = "timm:convnext_atto"
SWIN = "timm:swin_tiny_patch4_window7_224"
BEIT = "timm:beit_base_patch16_224"
# HF transformers (hf: ids built from their config classes, tiny: 32x32 images, two blocks or stages of width 64/16)
HF_VIT = "hf:ViTForImageClassification"
HF_DINOV2 = "hf:Dinov2Model"  # headless: the compile adds a head after the pooled features
HF_SWIN = "hf:SwinForImageClassification"
HF_CLIP = "hf:CLIPVisionModel"  # headless
_HF_TRANSFORMER = (("hidden_size", 64), ("image_size", 32), ("num_attention_heads", 2), ("num_hidden_layers", 2),
                   ("patch_size", 8))
HF_BUILD: dict[str, tuple[tuple[str, Any], ...]] = {
    HF_VIT: (*_HF_TRANSFORMER, ("intermediate_size", 128), ("num_labels", 5)),
    HF_DINOV2: (*_HF_TRANSFORMER, ("mlp_ratio", 2)),
    HF_SWIN: (("depths", (1, 1)), ("embed_dim", 16), ("image_size", 32), ("num_heads", (1, 2)), ("num_labels", 5),
              ("patch_size", 4), ("window_size", 4)),
    HF_CLIP: (*_HF_TRANSFORMER, ("intermediate_size", 128)),
}
HF_CHECKS = frozenset({"identity", "roundtrip", "fold", "onnx"})

# Golden diffs: backbone -> the example image size of its diff (None: the backbone's own, 224 for a ViT).
GOLDEN_SIZES: dict[str, int | None] = {RESNET18: 64, VIT_TINY: None, VIT_B_16: None}
GOLDEN_DIFF = Path(__file__).parent / "golden" / "diff"
GOLDEN_FOLD = Path(__file__).parent / "golden" / "fold"

ALL_ROLES = ("qkv", "proj", "fc1", "fc2")
CONVS = ("*conv*.weight", "*downsample.0.weight")  # a torchvision ResNet's convolution weights

# identity   the compiled model at init computes what `identity_to` computes (additive methods)
# roundtrip  save -> load gives bit-equal outputs and tensors, for every task, after perturbing the trainables
# isolation  training task B leaves task A bit-identical, except the tensors the row declares shared
# new_task   a new task starts from the compile's init, except what the row says it inherits or renews
# bytes      equal compiles save byte-identical artifacts; another seed changes the delta iff the init is random
# fold       fold(model) ≈ eager after perturbing; leaves what the row says (`fold`); golden fold JSON
# onnx       export -> ONNX Runtime parity (rows with onnx="slow" are marked slow, deselected by default)
# golden     the golden diff (tests/test_diff.py)
ALL_CHECKS = frozenset({"identity", "roundtrip", "isolation", "new_task", "bytes", "fold", "onnx", "golden"})


@dataclass(frozen=True)
class Row:
    spec: str
    backbone: str
    params: Mapping[str, Any] = field(default_factory=dict)
    label: str = ""  # names a variant (params other than the spec's defaults): the row id and its golden files
    applies: bool = True
    error: str = ""  # applies=False: how the compiler's message starts
    size: int = 64  # image side the battery runs at; timm ViTs are built for it (img_size), CNNs take any
    identity_to: str | None = "backbone"  # equal at init to: the backbone, a named spec's compile, or nothing
    tol: float = 1e-5  # identity tolerance (max abs difference), as the per-method tests used
    trains: bool = True  # the spec trains some tensor
    head: Literal["task", "shared", "none"] = "task"  # a head per task, one for all tasks, or no head rule
    shared: tuple[str, ...] = ()  # globs (state_dict names without "net.") of tensors all tasks share
    inherits: tuple[str, ...] = ()  # globs of per-task tensors a new task copies from the active task ...
    renews: tuple[str, ...] = ()  # ... or gets new values for (neither copied nor the init); the rest start at init
    packed: tuple[str, ...] = ()  # globs of tensors the artifact stores quantised: only what the forward uses survives
    seeded: bool = True  # some inserted/replaced tensor starts random (from `seed`), so another seed differs
    fold: Literal["backbone", "plain", "partial"] = "backbone"  # what fold(model) leaves after training: the
    # plain backbone's layers and tensor shapes (no-op Identity modules aside), only plain layers but more of
    # them (a trained CLR kernel stays a depthwise conv), or some peftc blocks (non-linear ones, token merging)
    onnx: Literal["ci", "slow"] | None = "slow"
    checks: frozenset[str] = ALL_CHECKS
    leaks: tuple[str, ...] = ()  # globs of tensors the spec makes task state that still change with another
    # task's training: a product bug, reported by test_task_isolation_tensors as an xfail until it is fixed
    build: tuple[tuple[str, Any], ...] = ()  # builder arguments of a tiny configuration (the families' rows)

    @property
    def id(self) -> str:
        return f"{self.spec}{'[' + self.label + ']' if self.label else ''}@{self.backbone}"

    @property
    def golden_name(self) -> str:
        return f"{self.spec}{'-' + self.label if self.label else ''}@{self.backbone.replace(':', '_')}"

    def runs(self, check: str) -> bool:
        if check == "onnx":
            return self.applies and self.onnx is not None and check in self.checks
        if check == "golden":
            return check in self.checks
        return self.applies and check in self.checks

    def module(self) -> nn.Module:
        """The cached backbone module this row compiles on (never modified: compile works on a copy)."""
        if self.build:
            return cached.module(self.backbone, **dict(self.build))
        if self.backbone.startswith(("timm:vit_", "timm:deit_")) and self.size != 224:
            return cached.module(self.backbone, img_size=self.size)
        return cached.module(self.backbone)

    def image(self, batch: int = 2) -> torch.Tensor:
        return cached.image(self.size, batch)


def _tiny(backbone: str, **kwargs: Any) -> tuple[tuple[str, Any], ...]:
    """Builder arguments of a tiny ViT-like configuration (two blocks, width 32) plus ``kwargs``."""
    base: dict[str, Any] = {"depth": 2, "embed_dim": 32, "num_heads": 2, "num_classes": 5}
    if backbone == DINOV2:
        base["num_classes"] = 0
    return tuple(sorted({**(base if "depths" not in kwargs else {"num_classes": 5}), **kwargs}.items()))


def _na(spec: str, backbone: str, error: str) -> Row:
    return Row(spec, backbone, applies=False, error=error, checks=frozenset({"golden"}))


# BatchNorm's num_batches_tracked is not task state: the bank swaps weight/bias/running_mean/running_var per task,
# but training task B increments task A's counters (harmless at the default momentum=0.1; with momentum=None the
# counter is the running average's weight, so task A's statistics would be updated differently after B trained).
BN_COUNTER = ("*.num_batches_tracked",)

ROWS: list[Row] = [
    # -- resnet18 (64x64) -------------------------------------------------------------------------------------
    _na("adaptformer", RESNET18, "specs/adaptformer.yaml:30:12: rules[1].parallel.to.role: no node plays role"),
    Row("bitfit", RESNET18, tol=1e-6, seeded=False),
    Row("clr", RESNET18, tol=1e-6, seeded=False, fold="plain"),
    # the convs are shared and trained by every task; an old task's BN means are re-derived through them on
    # set_task (cross-convolution BN), its BN and input means continue the previous task's; the head is new.
    # num_batches_tracked is one counter for all tasks by design: it dates each task's statistics (measured_at)
    Row("confit", RESNET18, tol=1e-6, shared=(*CONVS, "*.running_mean", *BN_COUNTER), inherits=("*bn*",
        "*downsample.1.*", "*.input_mean.*"), seeded=False),
    _na("convpass", RESNET18, "specs/convpass.yaml:30:12: rules[1].parallel.to.role: no node plays role"),
    _na("fact", RESNET18, "specs/fact.yaml:29:12: rules[1].parallel.to.role: no node plays role"),
    # full fine-tuning (every tensor shared by all tasks) and a per-task head; its method is the online learner
    Row("generative_ocl", RESNET18, tol=1e-6, shared=("conv1.*", "bn1.*", "layer*"), seeded=False),
    Row("linear_probe", RESNET18, identity_to=None),  # the head is re-initialised
    _na("ln_tuning", RESNET18, "specs/ln_tuning.yaml:30:16: rules[1].replace.target.type: no node has type"),
    Row("lora", RESNET18, tol=1e-6, onnx="ci"),  # conv LoRA
    _na("memvp", RESNET18, "specs/memvp_vision.yaml:20:12: rules[1].parallel.to.role: no node plays role"),
    _na("memvp_vision", RESNET18, "specs/memvp_vision.yaml:20:12: rules[1].parallel.to.role: no node plays role"),
    Row("replacement", RESNET18, identity_to=None, head="shared", shared=("*",), seeded=False),
    _na("tocom", RESNET18, "specs/tome.yaml:26:5: rules[1].merge_tokens.target.role: no node plays role"),
    _na("tome", RESNET18, "specs/tome.yaml:26:5: rules[1].merge_tokens.target.role: no node plays role"),
    _na("vera", RESNET18, "specs/vera.yaml:26:12: rules[1].parallel.to.role: no node plays role"),
    # -- timm vit_tiny (built for 64x64: a 4x4 patch grid) -----------------------------------------------------
    Row("adaptformer", VIT_TINY, shared=("*.adapter.*",), fold="partial"),  # non-linear adapters stay
    Row("bitfit", VIT_TINY, seeded=False),
    Row("clr", VIT_TINY, seeded=False, fold="plain"),  # the patch-embedding conv is the only spatial conv
    _na("confit", VIT_TINY, "specs/confit.yaml:31:16: rules[1].insert.before.role: no node plays role"),
    Row("convpass", VIT_TINY, shared=("*.convpass.*",), fold="partial"),
    Row("fact", VIT_TINY, shared=("*.fact.*",)),  # U/V, cores shared by layers and by tasks
    Row("generative_ocl", VIT_TINY, shared=("cls_token", "pos_embed", "patch_embed.*", "blocks.*", "norm.*"),
        seeded=False),
    Row("linear_probe", VIT_TINY, identity_to=None),
    Row("ln_tuning", VIT_TINY, head="shared", shared=("head.*",), inherits=("*norm*",), renews=("norm.task_key.*",),
        seeded=False, onnx="ci"),  # a new task's key is the next row of a fixed orthogonal matrix
    Row("lora", VIT_TINY),
    # a second input, memory: the battery feeds Compiled.stream_examples (random features: images, so the official
    # init already writes Z into the FFN memory values; identity without images is tests/test_memvp.py's)
    Row("memvp", VIT_TINY, identity_to=None, head="none", checks=frozenset({"identity", "roundtrip", "golden"})),
    Row("memvp_vision", VIT_TINY, head="none", checks=frozenset({"identity", "roundtrip", "golden"})),
    Row("replacement", VIT_TINY, identity_to=None, head="shared", shared=("*",), seeded=False),
    Row("tocom", VIT_TINY, identity_to="tome", head="none", shared=("*",), fold="partial"),
    Row("tome", VIT_TINY, identity_to=None, trains=False, head="none", seeded=False, fold="partial",
        checks=ALL_CHECKS - {"isolation", "new_task"}),
    # the random projections come from the spec's own `seed` (PEFT's projection_prng_key), not the compile seed
    Row("vera", VIT_TINY, seeded=False),
    # -- variants ---------------------------------------------------------------------------------------------
    Row("lora", VIT_TINY, {"targets": list(ALL_ROLES)}, label="all", onnx="ci", checks=ALL_CHECKS - {"golden"}),
    Row("adaptformer", VIT_TINY, {"bits": 1}, label="1bit", identity_to=None, shared=("*.adapter.*",),
        packed=("*.adapter.*",), fold="partial", checks=ALL_CHECKS - {"golden"}),  # up starts near, not at, 0
    # -- identity at init on more backbones (the per-method tests' backbones) ------------------------------------
    *[Row("clr", b, tol=1e-6, checks=frozenset({"identity"}))
      for b in ("resnet50", "mobilenet_v3_small", "convnext_tiny", "timm:resnet18")],
    Row("lora", DEIT_SMALL, {"targets": list(ALL_ROLES)}, label="all", size=224, checks=frozenset({"identity"})),
    *[Row(s, b, size=224, checks=frozenset({"identity"})) for s in ("convpass", "adaptformer")
      for b in (DEIT_SMALL, VIT_B_16)],
    Row("fact", DEIT_SMALL, {"rank": 4}, label="r4", size=224, checks=frozenset({"identity"})),
    Row("fact", VIT_B_16, {"variant": "tk", "rank": 4}, label="tk4", size=224, checks=frozenset({"identity"})),
    # -- more families, tiny (docs/backbones.md has the full-size matrix) ----------------------------------------
    # headless (num_classes=0): a new Linear after the pooled features, per task; output differs from the features
    Row("lora", DINOV2, {"num_classes": 10}, label="headless", size=28, build=_tiny(DINOV2, img_size=28),
        checks=frozenset({"roundtrip", "isolation", "new_task", "bytes"})),
    # channels-first LayerNorm2d (stem, downsampling, pre-head norm) banked over dim 1; the key after the head norm
    Row("ln_tuning", CONVNEXT, size=32, build=(("depths", (1, 1, 1, 1)), ("dims", (8, 16, 32, 64)), ("num_classes", 5)),
        head="shared",
        seeded=False, checks=frozenset({"identity", "roundtrip", "fold", "onnx"})),
    # Swin: nn.Softmax attention, B×H×W×C grids, adapters per stage width
    Row("adaptformer", SWIN, size=32, fold="partial", checks=frozenset({"identity", "roundtrip", "fold", "onnx"}),
        build=_tiny(SWIN, img_size=32, window_size=4, depths=(1, 1), embed_dim=16, num_heads=(1, 2))),
    # BEiT: fused qkv read through F.linear with a cat(q, 0, v) bias, traced as qkv(x) + bias
    Row("fact", BEIT, size=32, checks=frozenset({"identity", "roundtrip", "fold", "onnx"}),
        build=_tiny(BEIT, img_size=32)),
    # -- HF transformers, traced shape-aware: one model per method family in CI's ONNX parity (tests/
    # test_hf_backbones.py runs every spec on all four for identity at init and a training step)
    Row("lora", HF_VIT, size=32, build=HF_BUILD[HF_VIT], onnx="ci", checks=HF_CHECKS),
    Row("bitfit", HF_VIT, size=32, build=HF_BUILD[HF_VIT], seeded=False, checks=HF_CHECKS - {"onnx"}),
    Row("fact", HF_SWIN, size=32, build=HF_BUILD[HF_SWIN], onnx="ci", checks=HF_CHECKS),
    Row("adaptformer", HF_DINOV2, {"num_classes": 5}, size=32, build=HF_BUILD[HF_DINOV2], fold="partial", onnx="ci",
        checks=HF_CHECKS - {"identity"}),  # headless: the new head differs; its features are checked there
    Row("ln_tuning", HF_CLIP, {"num_classes": 5}, size=32, build=HF_BUILD[HF_CLIP], head="shared", seeded=False,
        fold="plain", onnx="ci", checks=HF_CHECKS - {"identity"}),  # folds to the backbone plus its new head
    Row("tome", HF_CLIP, size=32, build=HF_BUILD[HF_CLIP], identity_to=None, trains=False, head="none",
        seeded=False, fold="partial", onnx="ci", checks=frozenset({"roundtrip", "onnx"})),
    # -- torchvision vit_b_16: golden diffs through the canonicalisation (identity: test_lora, test_ln_tuning) ----
    Row("lora", VIT_B_16, size=224, checks=frozenset({"golden"})),
    Row("ln_tuning", VIT_B_16, size=224, checks=frozenset({"golden"})),
]


def rows(check: str) -> list[Row]:
    return [r for r in ROWS if r.runs(check)]


def _validate() -> None:
    ids = [r.id for r in ROWS]
    assert len(ids) == len(set(ids)), "duplicate rows"
    specs = set(builtin_specs())
    assert {r.spec for r in ROWS} <= specs, "a row names a spec that is not built in"
    for backbone in (RESNET18, VIT_TINY):  # every built-in spec has a default-params row on each golden backbone
        missing = specs - {r.spec for r in ROWS if r.backbone == backbone and not r.label}
        assert not missing, f"no row for {sorted(missing)} on {backbone}"
    for r in ROWS:
        assert r.applies or r.error, r.id
        assert "golden" not in r.checks or r.backbone in GOLDEN_SIZES, r.id


_validate()
