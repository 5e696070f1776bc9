"""Loading a spec: YAML → a validated, fully resolved :class:`~peftc.language.ir.MethodSpec`.

Loading runs four steps, each reporting errors at ``file:line:col`` plus the path inside the spec:

1. **read** – YAML is composed node by node so every key and item keeps its position;
2. **include** – ``include:`` specs are merged first (their params, then their rules), recursively;
3. **bind** – params get their defaults and ``--set`` overrides, typed and checked; ``$name`` is substituted
   wherever a whole value is ``$name`` and ``${name}`` inside strings; rules whose ``when:`` is false are dropped;
4. **validate** – the document by :mod:`peftc.language.schema`, each rule's arguments by its primitive's model
   (:mod:`peftc.language.primitives`), block names and block ``args`` against the block registry, predicates by
   the safe expression parser.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pydantic import ValidationError

import peftc.language.primitives as primitives
from peftc.blocks.registry import BLOCKS, declared_block
from peftc.errors import Location, SpecError, did_you_mean
from peftc.language.catalog import builtin_specs
from peftc.language.ir import MethodSpec, Path_, Rule, locate
from peftc.language.messages import from_validation, know_models
from peftc.language.predicate import Predicate, PredicateError, UnknownName
from peftc.language.reader import YamlDocument, read_yaml, read_yaml_file
from peftc.language.recipe import OnlineArgs, OptimizerArgs, Phase, ReplayArgs, SchedulerArgs, StageDecl, TrainSection
from peftc.language.schema import FORMAT_VERSION, PARTS, PairSection, ParamDecl, Selector, SpecDocument, TensorArgs

__all__ = ["load_spec", "parse_overrides"]

know_models((SpecDocument, ParamDecl, Selector, Phase, TensorArgs, TrainSection, OptimizerArgs, SchedulerArgs,
             ReplayArgs, StageDecl, OnlineArgs))


_Doc = YamlDocument


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


def _read_file(path: Path) -> _Doc:
    doc = read_yaml_file(path, SpecError, "spec")
    if doc.data is None:
        raise SpecError("the spec is empty", Location(str(path), 1, 1))
    if not isinstance(doc.data, dict):
        raise SpecError("a spec must be a mapping with at least 'name' and 'rules'", doc.positions[()])
    return doc


def _merge_includes(doc: _Doc, stack: tuple[str, ...] = ()) -> _Doc:
    """Return a document whose params and rules include those of every ``include:``, included first."""
    includes = doc.data.get("include")
    if includes is None:
        return doc
    refs = [includes] if isinstance(includes, str) else includes
    if not isinstance(refs, list) or not all(isinstance(r, str) for r in refs):
        raise SpecError("include must be a spec name or a list of them", locate(doc.positions, ("include",), doc.file))
    base = Path(doc.file).parent if doc.file else None
    params: dict[str, Any] = {}
    rules: list[Any] = []
    train: dict[str, Any] = {}  # included recipes, merged key by key (later includes and the spec win)
    train_positions: dict[Path_, Location] = {}
    positions: dict[Path_, Location] = {}
    schedule: tuple[Any, dict[Path_, Location]] | None = None  # the last included schedule, with positions
    for i, ref in enumerate(refs):
        where = locate(doc.positions, ("include", i) if isinstance(includes, list) else ("include",), doc.file)
        path = _find_spec_file(ref, base, where)
        key = str(path.resolve())
        if key in stack:
            raise SpecError(f"include cycle: {' -> '.join([*stack, key])}", where)
        inc = _merge_includes(_read_file(path), (*stack, key))
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
            value = read_yaml(raw, None, SpecError).data if raw.strip() else ""
        except SpecError:
            value = raw  # not YAML: the text itself
        out[name.strip()] = value
    return out


def _declare(doc: _Doc) -> dict[str, ParamDecl]:
    raw = doc.data.get("params") or {}
    if not isinstance(raw, dict):
        raise SpecError("params must be a mapping of name → declaration", locate(doc.positions, ("params",), doc.file))
    decls = {}
    for name, body in raw.items():
        if not isinstance(body, dict):  # shorthand `rank: 8`: type from the value
            body = {"type": _type_of(body), "default": body}
        try:
            decls[name] = ParamDecl.model_validate(body)
        except ValidationError as exc:
            raise from_validation(exc, ("params", name), doc.positions, doc.file, body) from None
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
            where = "--set" if given else locate(doc.positions, ("params", name), doc.file)
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
                locate(doc.positions, path, doc.file),
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


def _validate_rule(
    raw: Any, index: int, doc: _Doc, values: Mapping[str, Any]
) -> tuple[str, Any, str | None, str | None] | None:
    """Validate one rule; returns (op, args, label, part), or None when its ``when:`` is false."""
    path: Path_ = ("rules", index)
    where = locate(doc.positions, path, doc.file)
    if not isinstance(raw, dict):
        raise SpecError(f"a rule must be a mapping like '{{insert: {{...}}}}', got {raw!r}", where)
    ops = [k for k in raw if k not in ("when", "label", "part")]
    known = primitives.primitive_names()
    if len(ops) != 1 or ops[0] not in known:
        bad = next((k for k in ops if k not in known), None)
        if bad is not None:
            raise primitives.PRIMITIVES.unknown(bad, locate(doc.positions, (*path, bad), doc.file))
        raise SpecError(f"a rule names exactly one primitive ({', '.join(known)}), got {ops or 'none'}", where)
    op = ops[0]
    when = raw.get("when")
    if when is not None and not _evaluate_when(when, values, locate(doc.positions, (*path, "when"), doc.file)):
        return None
    label = raw.get("label")
    if label is not None and not isinstance(label, str):
        raise SpecError("label must be a string", locate(doc.positions, (*path, "label"), doc.file))
    part = raw.get("part")
    if part is not None and part not in PARTS:
        raise SpecError(f"part names a part of a vision-language pair ({', '.join(PARTS)}), got {part!r}",
                        locate(doc.positions, (*path, "part"), doc.file))
    body = raw[op] if raw[op] is not None else {}
    try:
        model = primitives.declared_primitive(op).args
        know_models((model,))
        args = model.model_validate(body)
    except ValidationError as exc:
        raise from_validation(exc, (*path, op), doc.positions, doc.file, body) from None
    _check_block(args, (*path, op), doc)
    return op, args, label, part


def _validate_schedule(raw: list[Any], doc: _Doc) -> tuple[Phase, ...]:
    """Validate ``schedule:`` phases: the first starts at 0, each later one starts after the one before."""
    phases: list[Phase] = []
    for i, body in enumerate(raw):
        where = locate(doc.positions, ("schedule", i), doc.file)
        if not isinstance(body, dict):
            raise SpecError(f"a phase must be a mapping like '{{from: 0.2, train: all}}', got {body!r}", where)
        try:
            phase = Phase.model_validate(body)
        except ValidationError as exc:
            raise from_validation(exc, ("schedule", i), doc.positions, doc.file, body) from None
        at = locate(doc.positions, ("schedule", i, "from"), doc.file)
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
        raise from_validation(exc, ("train",), doc.positions, doc.file, raw) from None


def _validate_pair(raw: dict[str, Any] | None, doc: _Doc) -> PairSection | None:
    if raw is None:
        return None
    try:
        return PairSection.model_validate(raw)
    except ValidationError as exc:
        raise from_validation(exc, ("pair",), doc.positions, doc.file, raw) from None


def _evaluate_when(expr: Any, values: Mapping[str, Any], where: Location) -> bool:
    if isinstance(expr, bool):
        return expr
    if not isinstance(expr, str):
        raise SpecError("when must be an expression over params, like \"variant == 'full'\"", where)
    try:
        return bool(Predicate(expr)(values))
    except PredicateError as exc:
        raise SpecError(str(exc), where) from None
    except UnknownName as exc:
        raise SpecError(f"unknown param {exc.name!r} in when" + did_you_mean(exc.name, values), where) from None


def _check_block(args: Any, path: Path_, doc: _Doc) -> None:
    block_name = getattr(args, "block", None)
    if block_name is None:
        return
    try:
        block = declared_block(block_name)
    except KeyError:
        raise BLOCKS.unknown(block_name, locate(doc.positions, (*path, "block"), doc.file)) from None
    try:
        parsed = block.args.model_validate(args.args)
    except ValidationError as exc:
        know_models((block.args,))
        raise from_validation(exc, (*path, "args"), doc.positions, doc.file, args.args) from None
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
        raise from_validation(exc, (), doc.positions, doc.file, doc.data) from None
    if top.peftc != FORMAT_VERSION:
        raise SpecError(
            f"spec format version {top.peftc} is not supported (this peftc reads version {FORMAT_VERSION})",
            locate(doc.positions, ("peftc",), doc.file),
        )
    decls = _declare(doc)
    values = _bind(decls, dict(overrides or {}), doc)
    raw_rules = _substitute(top.rules, values, ("rules",), doc)
    validated = []
    for i, raw in enumerate(raw_rules):
        rule = _validate_rule(raw, i, doc, values)
        if rule is not None:
            validated.append((i, *rule))
    labels = _labels([(op, args, label) for _, op, args, label, _ in validated])
    rules = tuple(
        Rule(op, args, label, ("rules", i, op), part)
        for (i, op, args, _, part), label in zip(validated, labels)
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
        pair=_validate_pair(_substitute(top.pair, values, ("pair",), doc), doc),
    )
