"""The spec language: YAML method specs → a validated, fully resolved :class:`MethodSpec` (the compiler's IR).

Loading runs four steps, each reporting errors at ``file:line:col`` plus the path inside the spec:

1. **read** – YAML is composed node by node so every key and item keeps its position;
2. **include** – ``include:`` specs are merged first (their params, then their rules), recursively;
3. **bind** – params get their defaults and ``--set`` overrides, typed and checked; ``$name`` is substituted
   wherever a whole value is ``$name`` and ``${name}`` inside strings; rules whose ``when:`` is false are dropped;
4. **validate** – the document and each rule's arguments are validated by the pydantic models below, block
   names and block ``args`` against the block registry, predicates by the safe expression parser.

The primitive argument models here *are* the language; :mod:`peftc.passes` implements them.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Discriminator, Field, Tag, ValidationError, model_validator

from .blocks import get_block
from .errors import Location, SpecError, did_you_mean
from .predicate import Predicate, PredicateSyntaxError, UnknownName

__all__ = [
    "PRIMITIVES",
    "MethodSpec",
    "ParamDecl",
    "Rule",
    "Selector",
    "builtin_specs",
    "load_spec",
    "parse_overrides",
]

FORMAT_VERSION = 1
Path_ = tuple[str | int, ...]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)


# ---------------------------------------------------------------------------------------------------------------
# The schema
# ---------------------------------------------------------------------------------------------------------------

StrOrList = str | list[str] | None
TaskState = Literal["shared", "new", "inherit"]


class Selector(_Strict):
    """Which graph nodes a rule applies to. All given keys must hold; a list inside one key means any of."""

    name: StrOrList = None
    type: StrOrList = None
    role: StrOrList = None
    where: str | None = None
    blocks: str | list[int] | None = None
    exclude: Selector | None = None
    optional: bool = False

    @model_validator(mode="after")
    def _check(self) -> Selector:
        if self.where is not None:
            try:
                Predicate(self.where)
            except PredicateSyntaxError as exc:
                raise ValueError(str(exc)) from None
        if isinstance(self.blocks, str) and not re.fullmatch(r"-?\d*(:-?\d*){0,2}", self.blocks.strip()):
            raise ValueError(f"blocks must be a slice like '1::2' or a list of indices, got {self.blocks!r}")
        return self

    def describe(self) -> str:
        """A short human summary: ``type=Conv2d where kernel_size != (1, 1)``."""
        parts = [f"{key}={value}" for key, value in (("type", self.type), ("name", self.name),
                                                     ("role", self.role)) if value]
        if self.blocks is not None:
            parts.append(f"blocks={self.blocks}")
        if self.where:
            parts.append(f"where {self.where}")
        return " ".join(parts) or "all"


class _Tensors(Selector):
    """Selector keys inline plus which of the selected nodes' tensors are affected."""

    params: str | list[str] = "*"


class FreezeArgs(_Tensors):
    """Stop gradients (and running-stat updates) for the selected nodes' tensors; no selector = everything."""

    buffers: bool = True


class TrainArgs(_Tensors):
    """Make the selected nodes' parameters trainable; ``buffers: true`` also lets running stats update."""

    buffers: bool = False
    task_state: TaskState = "shared"


class _BlockRule(_Strict):
    block: str
    args: dict[str, Any] = Field(default_factory=dict)
    name: str | None = None
    task_state: TaskState = "shared"
    trainable: bool = True

    @model_validator(mode="after")
    def _check_name(self) -> _BlockRule:
        if self.name is not None and not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", self.name):
            raise ValueError(f"name must be an identifier (it becomes a module name), got {self.name!r}")
        return self


class InsertArgs(_BlockRule):
    """Put ``block`` on the data path right after (or before) each selected node."""

    after: Selector | None = None
    before: Selector | None = None

    @model_validator(mode="after")
    def _one_side(self) -> InsertArgs:
        if (self.after is None) == (self.before is None):
            raise ValueError("give exactly one of 'after' or 'before'")
        return self


class ParallelArgs(_BlockRule):
    """A scaled bypass: ``to(x) + scale * block(src)``, ``src`` = the input or output of ``from`` (default: ``to``)."""

    to: Selector
    from_: Selector | None = Field(default=None, alias="from")
    read: Literal["input", "output"] = "input"
    scale: float = 1.0


class ReplaceArgs(_BlockRule):
    """Put ``block``, built from the original module, in place of each selected node."""

    target: Selector


class HeadArgs(_Strict):
    """A classification head in place of the backbone's (role ``head`` unless ``target`` says otherwise)."""

    target: Selector = Field(default_factory=lambda: Selector(role="head"))
    classes: int | None = Field(default=None, ge=1)
    bias: bool = True
    init: Literal["backbone", "default", "zeros"] = "backbone"
    task_state: TaskState = "new"
    trainable: bool = True


class TieArgs(_Strict):
    """Whole repeated blocks stop owning parameters: each layer computes with ``a·θ_prev + b·θ_next``.

    ``target`` limits which blocks may be tied (a block is a candidate when a selected node lies in it;
    default: every repeated block). Within each run of identical blocks (same parameter names and shapes)
    positions ``offset, offset + every, …`` are tied. ``edge`` says what a chosen block with only one
    same-shape neighbour does (``reflect``: both terms read it; ``skip``; ``error``); none is always an error.
    """

    target: Selector = Field(default_factory=Selector)
    every: int = Field(default=2, ge=1)
    offset: int = Field(default=1, ge=0)
    edge: Literal["reflect", "skip", "error"] = "reflect"
    init: tuple[float, float] = (0.5, 0.5)
    task_state: TaskState = "shared"
    trainable: bool = True


class MergeTokensArgs(_Strict):
    """Token merging (ToMe): merge ``r`` tokens in each selected block, between its attention and its MLP.

    ``r`` is one int (``inflection`` makes it a linear schedule from ``int(r(1 - inflection))`` to ``2r`` minus
    that) or a list with one value per selected block. ``protect`` counts the leading tokens that are never
    merged (default: the learned tokens the embedding puts first, e.g. cls and DeiT's distillation token).
    """

    target: Selector = Field(default_factory=lambda: Selector(role="attn_residual"))
    r: int | list[int] = 0
    inflection: float = 0.0
    prop_attn: bool = True
    protect: int | None = Field(default=None, ge=0)
    name: str = "tome"

    @model_validator(mode="after")
    def _check(self) -> MergeTokensArgs:
        values = self.r if isinstance(self.r, list) else [self.r]
        if any(v < 0 for v in values):
            raise ValueError(f"r must be >= 0, got {self.r!r}")
        if isinstance(self.r, list) and self.inflection:
            raise ValueError("inflection applies to a single r, not to a per-layer list")
        if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", self.name):
            raise ValueError(f"name must be an identifier (it becomes a module name), got {self.name!r}")
        return self


PRIMITIVES: dict[str, type[_Strict]] = {
    "freeze": FreezeArgs,
    "train": TrainArgs,
    "insert": InsertArgs,
    "parallel": ParallelArgs,
    "replace": ReplaceArgs,
    "head": HeadArgs,
    "tie": TieArgs,
    "merge_tokens": MergeTokensArgs,
}


class Phase(_Strict):
    """One phase of a ``schedule:``: from fraction ``from`` of training on, only ``train`` learns.

    ``train`` is ``all`` (everything the rules train) or a list of selectors (with ``params`` patterns). A
    schedule only narrows what the rules made trainable; it never unfreezes what they froze.
    """

    from_: float = Field(alias="from", ge=0.0, lt=1.0)
    train: Annotated[
        Annotated[Literal["all"], Tag("all")] | Annotated[list[_Tensors], Tag("selectors")],
        Discriminator(lambda v: "all" if isinstance(v, str) else "selectors"),
    ]
    label: str | None = None


class OptimizerArgs(_Strict):
    """``train.optimizer``: the torch optimizer and its own arguments (``lr`` and ``weight_decay`` sit apart).

    ``betas``/``eps`` belong to adam and adamw, ``momentum``/``nesterov``/``dampening`` to sgd; giving one to the
    other optimizer is an error, not a silently ignored key. The shorthand ``optimizer: adamw`` names one.
    """

    name: Literal["adam", "adamw", "sgd"] = "adam"
    betas: tuple[float, float] | None = None
    eps: float | None = Field(default=None, gt=0)
    momentum: float | None = Field(default=None, ge=0)
    nesterov: bool | None = None
    dampening: float | None = Field(default=None, ge=0)

    @model_validator(mode="before")
    @classmethod
    def _shorthand(cls, value: Any) -> Any:
        return {"name": value} if isinstance(value, str) else value

    @model_validator(mode="after")
    def _fits(self) -> OptimizerArgs:
        own = {"adam": ("betas", "eps"), "adamw": ("betas", "eps"), "sgd": ("momentum", "nesterov", "dampening")}
        for key in ("betas", "eps", "momentum", "nesterov", "dampening"):
            if getattr(self, key) is not None and key not in own[self.name]:
                raise ValueError(f"{key!r} is not an argument of {self.name} (its arguments: "
                                 f"{', '.join(own[self.name])})")
        return self


class SchedulerArgs(_Strict):
    """``train.scheduler``: how the learning rate moves over the epochs (stepped every batch).

    ``constant``; ``step`` (× ``gamma`` every ``step_size`` epochs, torch's StepLR); ``cosine`` (to ``min_lr``
    × lr at the end). ``warmup_epochs`` ramps linearly from ``warmup_from`` × lr first; the step or cosine
    schedule then runs over the epochs after the warm-up. The shorthand ``scheduler: cosine`` names one.
    """

    name: Literal["constant", "step", "cosine"] = "constant"
    step_size: int | None = Field(default=None, ge=1)
    gamma: float = Field(default=0.1, gt=0)
    min_lr: float = Field(default=0.0, ge=0)
    warmup_epochs: float = Field(default=0.0, ge=0)
    warmup_from: float = Field(default=0.0, ge=0, le=1)

    @model_validator(mode="before")
    @classmethod
    def _shorthand(cls, value: Any) -> Any:
        return {"name": value} if isinstance(value, str) else value

    @model_validator(mode="after")
    def _fits(self) -> SchedulerArgs:
        if self.name == "step" and self.step_size is None:
            raise ValueError("a step schedule needs step_size (epochs between decays)")
        if self.name != "step" and self.step_size is not None:
            raise ValueError(f"step_size belongs to the step schedule, not {self.name}")
        return self


class ReplayArgs(_Strict):
    """``train.replay``: the episodic memory of ``head: taer`` (task-aware experience replay).

    ``memory`` samples in all, shared equally by the classes seen so far; ``batch_size`` replayed samples per
    step (default: the training batch size); ``balance: task`` weighs the loss so that every seen task counts
    equally, ``none`` averages over samples, a number weighs the replay term against the current one.
    """

    memory: int = Field(default=2000, ge=1)
    batch_size: int | None = Field(default=None, ge=1)
    balance: Literal["task", "none"] | float = "task"


class StageDecl(_Strict):
    """One stage of a method's per-task training procedure (``train.stages``), run in order for every task.

    ``stage`` names a registered stage (``fit``, ``task_keys``, ``rectify_head``, ``distill``, …; see
    :mod:`peftc.train.stages`); ``epochs``, ``lr``, ``optimizer``, ``scheduler``, ``weight_decay`` override the
    recipe for this stage only, and ``args`` go to the stage itself.
    """

    stage: str
    label: str | None = None
    epochs: int | None = Field(default=None, ge=0)
    lr: float | None = Field(default=None, gt=0)
    optimizer: OptimizerArgs | None = None
    scheduler: SchedulerArgs | None = None
    weight_decay: float | None = Field(default=None, ge=0)
    args: dict[str, Any] = Field(default_factory=dict)


class TrainSection(_Strict):
    """``train:``: the method's published training recipe; ``peftc train`` follows it, its flags override it.

    ``lr`` is the learning rate at ``lr_batch`` samples per step when ``lr_batch`` is given (the linear scaling
    rule: the effective lr is ``lr × batch_size / lr_batch``), else at any batch size. ``early_stop`` is the
    patience in epochs on validation accuracy (the best epoch is kept). ``stages`` empty = one ``fit`` stage.
    """

    optimizer: OptimizerArgs = Field(default_factory=OptimizerArgs)
    lr: float = Field(default=1e-3, gt=0)
    lr_batch: int | None = Field(default=None, ge=1)
    batch_size: int = Field(default=32, ge=1)
    epochs: int = Field(default=10, ge=1)
    weight_decay: float = Field(default=0.0, ge=0)
    label_smoothing: float = Field(default=0.0, ge=0, lt=1)
    scheduler: SchedulerArgs = Field(default_factory=SchedulerArgs)
    early_stop: int | None = Field(default=None, ge=1)
    grad_clip: float | None = Field(default=None, gt=0)
    augment: Literal["standard", "light", "none"] = "standard"
    head: Literal["task", "taer"] = "task"
    replay: ReplayArgs = Field(default_factory=ReplayArgs)
    stages: list[StageDecl] = Field(default_factory=list)

    def effective_lr(self, batch_size: int | None = None) -> float:
        """The learning rate for ``batch_size`` (default: the recipe's) under the scaling rule."""
        batch = batch_size or self.batch_size
        return self.lr * batch / self.lr_batch if self.lr_batch else self.lr


class ParamDecl(_Strict):
    """A typed, overridable spec parameter."""

    type: Literal["int", "float", "bool", "str", "list"] = "str"
    default: Any = None
    choices: list[Any] | None = None
    min: float | None = None
    max: float | None = None
    doc: str = ""

    def coerce(self, value: Any, what: str) -> Any:
        """Check ``value`` against the declared type, range and choices; returns the typed value."""
        if value is None:
            if self.default is None:
                return None
            raise ValueError(f"{what} must be set (type {self.type}), got null")
        ok = {
            "int": isinstance(value, int) and not isinstance(value, bool),
            "float": isinstance(value, (int, float)) and not isinstance(value, bool),
            "bool": isinstance(value, bool),
            "str": isinstance(value, str),
            "list": isinstance(value, (list, tuple)),
        }[self.type]
        if not ok:
            article = "an" if self.type == "int" else "a"
            raise ValueError(f"{what} must be {article} {self.type}, got {type(value).__name__} {value!r}")
        if self.type == "float":
            value = float(value)
        if self.type == "list":
            value = list(value)
        if self.choices is not None and value not in self.choices:
            raise ValueError(
                f"{what} must be one of {', '.join(map(repr, self.choices))}, got {value!r}"
                + did_you_mean(str(value), map(str, self.choices))
            )
        if self.min is not None and value < self.min:
            raise ValueError(f"{what} must be >= {self.min}, got {value!r}")
        if self.max is not None and value > self.max:
            raise ValueError(f"{what} must be <= {self.max}, got {value!r}")
        return value


class SpecDocument(_Strict):
    """The top level of a spec file."""

    peftc: int = FORMAT_VERSION
    name: str
    summary: str = ""
    references: list[str] = Field(default_factory=list)
    notes: str = ""
    include: str | list[str] | None = None
    params: dict[str, ParamDecl] = Field(default_factory=dict)
    rules: list[dict[str, Any]] = Field(default_factory=list)
    train: dict[str, Any] | None = None  # validated after params are bound (TrainSection)
    schedule: list[Any] = Field(default_factory=list)


# ---------------------------------------------------------------------------------------------------------------
# The IR
# ---------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Rule:
    """One applied primitive, its validated arguments and where it was written."""

    op: str
    args: Any  # the primitive's args model (FreezeArgs, InsertArgs, ...)
    label: str
    path: Path_  # ("rules", i, op) in the merged spec; MethodSpec.locate turns it into a file position

    def to_document(self) -> dict[str, Any]:
        body = self.args.model_dump(mode="json", by_alias=True, exclude_defaults=True)
        return {self.op: body, "label": self.label}


@dataclass(frozen=True)
class MethodSpec:
    """A resolved spec: params bound, includes merged, inactive rules dropped, everything validated."""

    name: str
    summary: str
    references: tuple[str, ...]
    notes: str
    params: Mapping[str, ParamDecl]
    values: Mapping[str, Any]
    rules: tuple[Rule, ...]
    file: str | None = None
    positions: Mapping[Path_, Location] = field(default_factory=dict, repr=False, compare=False)
    train: TrainSection | None = None  # the training recipe (peftc.train); None = the trainer's defaults
    schedule: tuple[Phase, ...] = ()  # training phases (peftc.schedule applies them); empty = no schedule

    def locate(self, path: Path_) -> Location:
        """The source location of ``path`` inside this spec (longest known prefix)."""
        return _locate(self.positions, path, self.file)

    def to_document(self) -> dict[str, Any]:
        """A self-contained document that loads back to an equal spec (what artifacts store)."""
        params = {
            name: {**decl.model_dump(mode="json", exclude_defaults=True), "default": self.values[name]}
            for name, decl in self.params.items()
        }
        doc = {
            "peftc": FORMAT_VERSION,
            "name": self.name,
            "summary": self.summary,
            "references": list(self.references),
            "notes": self.notes,
            "params": params,
            "rules": [rule.to_document() for rule in self.rules],
            **({"train": self.train.model_dump(mode="json", exclude_defaults=True)} if self.train else {}),
        }
        if self.schedule:
            doc["schedule"] = [
                p.model_dump(mode="json", by_alias=True, exclude_defaults=True) for p in self.schedule
            ]
        return doc


# ---------------------------------------------------------------------------------------------------------------
# Step 1: read YAML with positions
# ---------------------------------------------------------------------------------------------------------------


@dataclass
class _Doc:
    data: Any
    positions: dict[Path_, Location]
    file: str | None


def _read_yaml(text: str, file: str | None) -> _Doc:
    loader = yaml.SafeLoader(text)
    try:
        root = loader.get_single_node()
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = Location(file, mark.line + 1, mark.column + 1) if mark else Location(file)
        problem = getattr(exc, "problem", None) or str(exc)
        raise SpecError(f"invalid YAML: {problem}", where) from None
    finally:
        loader.dispose()
    if root is None:
        raise SpecError("the spec is empty", Location(file, 1, 1))
    constructor = yaml.constructor.SafeConstructor()
    positions: dict[Path_, Location] = {}

    def at(node: yaml.Node, path: Path_) -> Location:
        return Location(file, node.start_mark.line + 1, node.start_mark.column + 1, path)

    def build(node: yaml.Node, path: Path_) -> Any:
        if isinstance(node, yaml.MappingNode):
            constructor.flatten_mapping(node)
            out: dict[str, Any] = {}
            for key_node, value_node in node.value:
                key = constructor.construct_object(key_node, deep=True)
                if not isinstance(key, str):
                    raise SpecError(f"keys must be strings, got {key!r}", at(key_node, path))
                if key in out:
                    raise SpecError(f"duplicate key {key!r}", at(key_node, (*path, key)))
                positions[(*path, key)] = at(key_node, (*path, key))
                out[key] = build(value_node, (*path, key))
            return out
        if isinstance(node, yaml.SequenceNode):
            items = []
            for i, item in enumerate(node.value):
                positions[(*path, i)] = at(item, (*path, i))
                items.append(build(item, (*path, i)))
            return items
        try:
            return constructor.construct_object(node, deep=True)
        except yaml.YAMLError as exc:
            raise SpecError(f"invalid value: {exc}", at(node, path)) from None

    positions[()] = at(root, ())
    data = build(root, ())
    if not isinstance(data, dict):
        raise SpecError("a spec must be a mapping with at least 'name' and 'rules'", positions[()])
    return _Doc(data, positions, file)


def _locate(positions: Mapping[Path_, Location], path: Path_, file: str | None) -> Location:
    for cut in range(len(path), -1, -1):
        hit = positions.get(tuple(path[:cut]))
        if hit is not None:
            return Location(hit.file, hit.line, hit.col, (*hit.path, *path[cut:]))
    return Location(file, None, None, tuple(path))


# ---------------------------------------------------------------------------------------------------------------
# Step 2: includes
# ---------------------------------------------------------------------------------------------------------------


def builtin_specs() -> dict[str, Path]:
    """Built-in spec name → file (the YAML files shipped in ``peftc.specs``)."""
    root = resources.files("peftc.specs")
    return {entry.name[:-5]: Path(str(entry)) for entry in root.iterdir() if entry.name.endswith(".yaml")}


def _find_spec_file(ref: str, base: Path | None, where: Location) -> Path:
    candidates = []
    if base is not None:
        candidates.append(base / ref)
    candidates.append(Path(ref))
    for cand in candidates:
        if cand.is_file():
            return cand
    builtins = builtin_specs()
    name = Path(ref).name.removesuffix(".yaml")
    if name in builtins and not Path(ref).parent.parts:
        return builtins[name]
    raise SpecError(f"no spec file or built-in spec named {ref!r}" + did_you_mean(name, builtins), where)


def _read_file(path: Path, where: Location | None = None) -> _Doc:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise SpecError(f"cannot read spec {str(path)!r}: {exc.strerror or exc}", where) from None
    return _read_yaml(text, str(path))


def _merge_includes(doc: _Doc, stack: tuple[str, ...] = ()) -> _Doc:
    """Return a document whose params and rules include those of every ``include:``, included first."""
    includes = doc.data.get("include")
    if includes is None:
        return doc
    refs = [includes] if isinstance(includes, str) else includes
    if not isinstance(refs, list) or not all(isinstance(r, str) for r in refs):
        raise SpecError("include must be a spec name or a list of them", _locate(doc.positions, ("include",), doc.file))
    base = Path(doc.file).parent if doc.file else None
    params: dict[str, Any] = {}
    rules: list[Any] = []
    train: dict[str, Any] = {}  # included recipes, merged key by key (later includes and the spec win)
    train_positions: dict[Path_, Location] = {}
    positions: dict[Path_, Location] = {}
    schedule: tuple[Any, dict[Path_, Location]] | None = None  # the last included schedule, with positions
    for i, ref in enumerate(refs):
        where = _locate(doc.positions, ("include", i) if isinstance(includes, list) else ("include",), doc.file)
        path = _find_spec_file(ref, base, where)
        key = str(path.resolve())
        if key in stack:
            raise SpecError(f"include cycle: {' -> '.join([*stack, key])}", where)
        inc = _merge_includes(_read_file(path, where), (*stack, key))
        inc_params = inc.data.get("params") or {}
        inc_rules = inc.data.get("rules") or []
        if isinstance(inc.data.get("train"), dict):
            train.update(inc.data["train"])
            train_positions.update({k: v for k, v in inc.positions.items() if k[:1] == ("train",)})
        for name, decl in inc_params.items():
            params[name] = decl
            _move(inc.positions, ("params", name), positions, ("params", name))
        for j, rule in enumerate(inc_rules):
            _move(inc.positions, ("rules", j), positions, ("rules", len(rules)))
            rules.append(rule)
        if inc.data.get("schedule"):
            moved = {k: v for k, v in inc.positions.items() if k[:1] == ("schedule",)}
            schedule = inc.data["schedule"], moved
    own_params = doc.data.get("params") or {}
    own_rules = doc.data.get("rules") or []
    if not isinstance(own_params, dict) or not isinstance(own_rules, list):
        return doc  # the schema check reports the wrong shape with its position
    for name, decl in own_params.items():
        if name in params and not isinstance(decl, dict) and isinstance(params[name], dict):
            params[name] = {**params[name], "default": decl}  # `name: value` re-defaults an included param
        else:
            params[name] = decl
        _move(doc.positions, ("params", name), positions, ("params", name))
    offset = len(rules)
    for j, rule in enumerate(own_rules):
        _move(doc.positions, ("rules", j), positions, ("rules", offset + j))
        rules.append(rule)
    data = {k: v for k, v in doc.data.items() if k != "include"}
    data["params"], data["rules"] = params, rules
    if train and isinstance(data.get("train", {}), dict):
        data["train"] = {**train, **(data.get("train") or {})}
        positions.update(train_positions)
    if schedule is not None and "schedule" not in data:  # a spec's own schedule replaces an included one
        data["schedule"] = schedule[0]
        positions.update(schedule[1])
    for path, loc in doc.positions.items():
        if path and path[0] not in ("params", "rules", "include"):
            positions[path] = loc
    root = doc.positions.get((), Location(doc.file))  # documents given as mappings have no positions
    for top in ("params", "rules"):
        positions.setdefault((top,), doc.positions.get((top,), root))
    positions[()] = root
    return _Doc(data, positions, doc.file)


def _move(src: Mapping[Path_, Location], old: Path_, dst: dict[Path_, Location], new: Path_) -> None:
    n = len(old)
    for path, loc in src.items():
        if path[:n] == old:
            dst[new + path[n:]] = loc


# ---------------------------------------------------------------------------------------------------------------
# Step 3: bind params
# ---------------------------------------------------------------------------------------------------------------

_REF = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")
_WHOLE_REF = re.compile(r"\$([A-Za-z_][A-Za-z0-9_]*)")


def parse_overrides(items: list[str] | None) -> dict[str, Any]:
    """``["rank=8", "targets=[qkv, fc1]"]`` → ``{"rank": 8, "targets": ["qkv", "fc1"]}`` (values read as YAML)."""
    out: dict[str, Any] = {}
    for item in items or []:
        name, sep, raw = item.partition("=")
        if not sep or not name.strip():
            raise SpecError(f"--set expects name=value, got {item!r}")
        try:
            out[name.strip()] = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError:
            out[name.strip()] = raw
    return out


def _declare(doc: _Doc) -> dict[str, ParamDecl]:
    raw = doc.data.get("params") or {}
    if not isinstance(raw, dict):
        raise SpecError("params must be a mapping of name → declaration", _locate(doc.positions, ("params",), doc.file))
    decls = {}
    for name, body in raw.items():
        if not isinstance(body, dict):  # shorthand `rank: 8`: type from the value
            body = {"type": _type_of(body), "default": body}
        try:
            decls[name] = ParamDecl.model_validate(body)
        except ValidationError as exc:
            raise _from_validation(exc, ("params", name), doc.positions, doc.file, body) from None
    return decls


def _type_of(value: Any) -> str:
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, int):
        return "int"
    if isinstance(value, float):
        return "float"
    if isinstance(value, (list, tuple)):
        return "list"
    return "str"


def _bind(decls: dict[str, ParamDecl], overrides: Mapping[str, Any], doc: _Doc) -> dict[str, Any]:
    values = {}
    for name in overrides:
        if name not in decls:
            raise SpecError(f"unknown param {name!r}" + did_you_mean(name, decls) + _known(decls), "--set")
    for name, decl in decls.items():
        given = name in overrides
        value = overrides[name] if given else decl.default
        try:
            values[name] = decl.coerce(value, f"param {name!r}")
        except ValueError as exc:
            where = "--set" if given else _locate(doc.positions, ("params", name), doc.file)
            raise SpecError(str(exc), where) from None
    return values


def _known(decls: Mapping[str, Any]) -> str:
    return f"; this spec's params: {', '.join(sorted(decls))}" if decls else "; this spec declares no params"


def _substitute(value: Any, values: Mapping[str, Any], path: Path_, doc: _Doc) -> Any:
    if isinstance(value, dict):
        return {k: _substitute(v, values, (*path, k), doc) for k, v in value.items()}
    if isinstance(value, list):
        return [_substitute(v, values, (*path, i), doc) for i, v in enumerate(value)]
    if not isinstance(value, str) or "$" not in value:
        return value

    def lookup(name: str) -> Any:
        if name not in values:
            raise SpecError(
                f"unknown param ${name}" + did_you_mean(name, values) + _known(values),
                _locate(doc.positions, path, doc.file),
            )
        return values[name]

    whole = _WHOLE_REF.fullmatch(value)
    if whole:
        return lookup(whole.group(1))
    escaped = value.replace("$$", "\0")
    return _REF.sub(lambda m: str(lookup(m.group(1))), escaped).replace("\0", "$")


# ---------------------------------------------------------------------------------------------------------------
# Step 4: validate
# ---------------------------------------------------------------------------------------------------------------


def _from_validation(
    exc: ValidationError, prefix: Path_, positions: Mapping[Path_, Location], file: str | None, data: Any
) -> SpecError:
    """Turn pydantic errors into one SpecError whose lines each carry file:line:col and the spec path."""
    lines = []
    for err in exc.errors()[:5]:
        loc = _data_path(data, err["loc"])
        where = _locate(positions, (*prefix, *loc), file)
        kind = err["type"]
        if kind == "extra_forbidden":
            key = str(loc[-1]) if loc else "?"
            model = _model_at(exc.title, loc)
            valid = _field_names(model) if model else []
            msg = f"unknown key {key!r}" + did_you_mean(key, valid)
            if valid and not did_you_mean(key, valid):
                msg += f"; valid keys: {', '.join(valid)}"
        elif kind == "missing":
            msg = "missing required key"
        else:
            msg = err["msg"].removeprefix("Value error, ")
            if "input" in err and kind not in ("value_error", "assertion_error"):
                msg += f", got {err['input']!r}"
            if kind == "literal_error" and isinstance(err.get("input"), str):
                choices = re.findall(r"'([^']*)'", err["msg"])
                msg += did_you_mean(err["input"], choices)
        lines.append(f"{where}: {msg}")
    if len(exc.errors()) > 5:
        lines.append(f"... and {len(exc.errors()) - 5} more errors")
    return SpecError("\n".join(lines))


def _data_path(data: Any, loc: tuple[Any, ...]) -> Path_:
    """Keep only the parts of a pydantic loc that index real data (drop union-branch tags like 'str')."""
    out: list[str | int] = []
    node = data
    for part in loc:
        if (isinstance(node, dict) and part in node) or (
            isinstance(node, list) and isinstance(part, int) and part < len(node)
        ):
            out.append(part)
            node = node[part]
        elif isinstance(node, dict) and isinstance(part, str) and part not in _UNION_TAGS:
            out.append(part)  # an unknown or missing key
            node = None
    return tuple(out)


_UNION_TAGS = {"str", "list[str]", "int", "list[int]", "Selector", "function-after", "none"}
_MODELS_BY_TITLE: dict[str, type[BaseModel]] = {}


def _model_at(title: str, loc: Path_) -> type[BaseModel] | None:
    """The pydantic model that owns the last key of ``loc`` (to list its valid keys)."""
    model = _MODELS_BY_TITLE.get(title)
    for part in loc[:-1]:
        if model is None or not isinstance(part, str):
            continue
        field_info = model.model_fields.get(part) or next(
            (f for f in model.model_fields.values() if f.alias == part), None
        )
        if field_info is None:
            return None
        model = _nested_model(field_info.annotation)
    return model


def _nested_model(annotation: Any) -> type[BaseModel] | None:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in getattr(annotation, "__args__", ()) or ():
        found = _nested_model(arg)
        if found is not None:
            return found
    return None


def _field_names(model: type[BaseModel]) -> list[str]:
    return [info.alias or name for name, info in model.model_fields.items()]


for _model in (*PRIMITIVES.values(), SpecDocument, ParamDecl, Selector, Phase, _Tensors):
    _MODELS_BY_TITLE[_model.__name__] = _model


for _model in (TrainSection, OptimizerArgs, SchedulerArgs, ReplayArgs, StageDecl):
    _MODELS_BY_TITLE[_model.__name__] = _model


def _validate_rule(raw: Any, index: int, doc: _Doc, values: Mapping[str, Any]) -> tuple[str, Any, str | None] | None:
    """Validate one rule; returns (op, args, label), or None when its ``when:`` is false."""
    path: Path_ = ("rules", index)
    where = _locate(doc.positions, path, doc.file)
    if not isinstance(raw, dict):
        raise SpecError(f"a rule must be a mapping like '{{insert: {{...}}}}', got {raw!r}", where)
    ops = [k for k in raw if k not in ("when", "label")]
    if len(ops) != 1 or ops[0] not in PRIMITIVES:
        bad = next((k for k in ops if k not in PRIMITIVES), None)
        if bad is not None:
            msg = f"unknown primitive {bad!r}" + did_you_mean(bad, PRIMITIVES)
            where = _locate(doc.positions, (*path, bad), doc.file)
            raise SpecError(msg + f"; primitives: {', '.join(PRIMITIVES)}", where)
        raise SpecError(f"a rule names exactly one primitive ({', '.join(PRIMITIVES)}), got {ops or 'none'}", where)
    op = ops[0]
    when = raw.get("when")
    if when is not None and not _evaluate_when(when, values, _locate(doc.positions, (*path, "when"), doc.file)):
        return None
    label = raw.get("label")
    if label is not None and not isinstance(label, str):
        raise SpecError("label must be a string", _locate(doc.positions, (*path, "label"), doc.file))
    body = raw[op] if raw[op] is not None else {}
    try:
        args = PRIMITIVES[op].model_validate(body)
    except ValidationError as exc:
        raise _from_validation(exc, (*path, op), doc.positions, doc.file, body) from None
    _check_block(args, (*path, op), doc)
    return op, args, label


def _validate_schedule(raw: list[Any], doc: _Doc) -> tuple[Phase, ...]:
    """Validate ``schedule:`` phases: the first starts at 0, each later one starts after the one before."""
    phases: list[Phase] = []
    for i, body in enumerate(raw):
        where = _locate(doc.positions, ("schedule", i), doc.file)
        if not isinstance(body, dict):
            raise SpecError(f"a phase must be a mapping like '{{from: 0.2, train: all}}', got {body!r}", where)
        try:
            phase = Phase.model_validate(body)
        except ValidationError as exc:
            raise _from_validation(exc, ("schedule", i), doc.positions, doc.file, body) from None
        at = _locate(doc.positions, ("schedule", i, "from"), doc.file)
        if i == 0 and phase.from_ != 0.0:
            raise SpecError(f"the first phase must start at 0 (where training starts), got {phase.from_}", at)
        if phases and phase.from_ <= phases[-1].from_:
            raise SpecError(f"phases must start in increasing order: {phase.from_} is not after "
                            f"{phases[-1].from_}", at)
        phases.append(phase)
    return tuple(phases)


def _validate_train(raw: dict[str, Any] | None, doc: _Doc) -> TrainSection | None:
    """Validate the ``train:`` recipe (after ``$param`` substitution, so ``lr: $lr`` works)."""
    if raw is None:
        return None
    try:
        return TrainSection.model_validate(raw)
    except ValidationError as exc:
        raise _from_validation(exc, ("train",), doc.positions, doc.file, raw) from None


def _evaluate_when(expr: Any, values: Mapping[str, Any], where: Location) -> bool:
    if isinstance(expr, bool):
        return expr
    if not isinstance(expr, str):
        raise SpecError("when must be an expression over params, like \"variant == 'full'\"", where)
    try:
        return bool(Predicate(expr)(values))
    except PredicateSyntaxError as exc:
        raise SpecError(str(exc), where) from None
    except UnknownName as exc:
        raise SpecError(f"unknown param {exc.name!r} in when" + did_you_mean(exc.name, values), where) from None


def _check_block(args: Any, path: Path_, doc: _Doc) -> None:
    block_name = getattr(args, "block", None)
    if block_name is None:
        return
    try:
        block = get_block(block_name)
    except KeyError:
        from .blocks import block_names

        raise SpecError(
            f"unknown block {block_name!r}" + did_you_mean(block_name, block_names())
            + f"; blocks: {', '.join(block_names())}",
            _locate(doc.positions, (*path, "block"), doc.file),
        ) from None
    try:
        parsed = block.args.model_validate(args.args)
    except ValidationError as exc:
        _MODELS_BY_TITLE.setdefault(block.args.__name__, block.args)
        raise _from_validation(exc, (*path, "args"), doc.positions, doc.file, args.args) from None
    object.__setattr__(args, "args", parsed.model_dump())


def _labels(rules: list[tuple[str, Any, str | None]]) -> list[str]:
    """Default labels: ``insert:channel_conv``, ``train:BatchNorm2d``, ``head``; repeats get ``#2``, ``#3``."""
    labels, seen = [], {}
    for op, args, label in rules:
        if label is None:
            if hasattr(args, "block"):
                label = f"{op}:{args.block}"
            elif isinstance(args, Selector):
                sel = args.type or args.role or args.name
                label = f"{op}:{sel if isinstance(sel, str) else ','.join(sel)}" if sel else op
            else:
                label = op
        seen[label] = seen.get(label, 0) + 1
        labels.append(label if seen[label] == 1 else f"{label}#{seen[label]}")
    return labels


def _document_from(source: str | Path | Mapping[str, Any] | MethodSpec) -> _Doc:
    if isinstance(source, Mapping):
        return _Doc(dict(source), {}, None)
    text = str(source)
    path = Path(text)
    if path.suffix in (".yaml", ".yml") or path.is_file() or "/" in text:
        if not path.is_file():
            raise SpecError(f"spec file not found: {text}" + did_you_mean(path.stem, builtin_specs()))
        return _read_file(path)
    builtins = builtin_specs()
    if text not in builtins:
        raise SpecError(
            f"no built-in spec named {text!r}" + did_you_mean(text, builtins)
            + f"; built-ins: {', '.join(sorted(builtins))}"
        )
    return _read_file(builtins[text])


def load_spec(
    source: str | Path | Mapping[str, Any] | MethodSpec, overrides: Mapping[str, Any] | None = None
) -> MethodSpec:
    """Load a spec from a file path, a built-in name, a document mapping, or re-bind a MethodSpec's params."""
    if isinstance(source, MethodSpec):
        if not overrides:
            return source
        doc = _Doc(source.to_document(), dict(source.positions), source.file)
    else:
        doc = _document_from(source)
    doc = _merge_includes(doc)
    try:
        top = SpecDocument.model_validate(
            {**doc.data, "params": {k: {} for k in doc.data.get("params") or {}}}
            if isinstance(doc.data.get("params"), dict) else doc.data
        )
    except ValidationError as exc:
        raise _from_validation(exc, (), doc.positions, doc.file, doc.data) from None
    if top.peftc != FORMAT_VERSION:
        raise SpecError(
            f"spec format version {top.peftc} is not supported (this peftc reads version {FORMAT_VERSION})",
            _locate(doc.positions, ("peftc",), doc.file),
        )
    decls = _declare(doc)
    values = _bind(decls, dict(overrides or {}), doc)
    raw_rules = _substitute(top.rules, values, ("rules",), doc)
    validated = []
    for i, raw in enumerate(raw_rules):
        rule = _validate_rule(raw, i, doc, values)
        if rule is not None:
            validated.append((i, *rule))
    labels = _labels([(op, args, label) for _, op, args, label in validated])
    rules = tuple(
        Rule(op, args, label, ("rules", i, op))
        for (i, op, args, _), label in zip(validated, labels)
    )
    return MethodSpec(
        name=top.name,
        summary=top.summary,
        references=tuple(top.references),
        notes=top.notes,
        params=decls,
        values=values,
        rules=rules,
        file=doc.file,
        positions=doc.positions,
        train=_validate_train(_substitute(top.train, values, ("train",), doc), doc),
        schedule=_validate_schedule(_substitute(top.schedule, values, ("schedule",), doc), doc),
    )


def iter_builtin_summaries() -> Iterator[tuple[str, str]]:
    """(name, one-line summary) of every built-in spec, without validating them."""
    for name, path in sorted(builtin_specs().items()):
        try:
            data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        except (OSError, yaml.YAMLError):
            data = {}
        yield name, str(data.get("summary", "")).strip().splitlines()[0] if data.get("summary") else ""
