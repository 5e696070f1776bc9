"""The spec language: loading, params, includes, and errors that point into the YAML."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

import peftc
from peftc.errors import SpecError
from peftc.language import builtin_specs, load_spec, parse_overrides


def write(tmp_path: Path, text: str, name: str = "spec.yaml") -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text).lstrip())
    return path


def error_of(source: object, **overrides: object) -> str:
    with pytest.raises(SpecError) as info:
        load_spec(source, overrides)  # type: ignore[arg-type]
    return str(info.value)


def test_builtin_clr_loads_with_defaults() -> None:
    spec = load_spec("clr")
    assert spec.name == "clr"
    assert spec.values == {"variant": "reduced", "kernel_size": 3, "num_classes": None}
    assert [r.label for r in spec.rules] == ["freeze", "clr", "batchnorm", "head"]
    assert "clr" in builtin_specs()


def test_when_selects_variant_rules() -> None:
    assert [r.label for r in load_spec("clr", {"variant": "full"}).rules] == [
        "freeze", "clr", "clr_1x1", "batchnorm", "head"]


def test_param_substitution_is_typed() -> None:
    spec = load_spec("clr", {"kernel_size": 5})
    insert = next(r for r in spec.rules if r.op == "insert")
    assert insert.args.args["kernel_size"] == 5


def test_parse_overrides_reads_yaml_values() -> None:
    assert parse_overrides(["a=3", "b=[1, 2]", "c=full", "d=1.5", "e=true"]) == {
        "a": 3, "b": [1, 2], "c": "full", "d": 1.5, "e": True}
    with pytest.raises(SpecError, match="name=value"):
        parse_overrides(["oops"])


def test_invalid_yaml_has_position(tmp_path: Path) -> None:
    path = write(tmp_path, """
        name: broken
        rules:
          - freeze: {
    """)
    msg = error_of(path)
    assert msg.startswith(f"{path}:") and "invalid YAML" in msg


def test_unknown_key_suggests_closest(tmp_path: Path) -> None:
    path = write(tmp_path, """
        name: typo
        rules:
          - freeze: {}
          - insert:
              after: {type: Conv2d}
              block: channel_conv
              args: {kernal_size: 3}
    """)
    msg = error_of(path)
    assert f"{path}:7:" in msg
    assert "rules[1].insert.args.kernal_size" in msg
    assert "unknown key 'kernal_size'" in msg and "did you mean 'kernel_size'" in msg


def test_unknown_top_level_key(tmp_path: Path) -> None:
    msg = error_of(write(tmp_path, "name: x\nrulez: []\n"))
    assert ":2:1: rulez: unknown key 'rulez'" in msg and "'rules'" in msg


def test_unknown_selector_key(tmp_path: Path) -> None:
    msg = error_of(write(tmp_path, "name: x\nrules:\n  - train: {typ: Conv2d}\n"))
    assert ":3:" in msg and "rules[0].train.typ" in msg and "did you mean 'type'" in msg


def test_unknown_primitive(tmp_path: Path) -> None:
    msg = error_of(write(tmp_path, "name: x\nrules:\n  - inset: {}\n"))
    assert ":3:5: rules[0].inset: unknown primitive 'inset'" in msg and "did you mean 'insert'" in msg


def test_unknown_block(tmp_path: Path) -> None:
    path = write(tmp_path, """
        name: x
        rules:
          - insert: {after: {type: Conv2d}, block: chanel_conv}
    """)
    msg = error_of(path)
    assert "rules[0].insert.block: unknown block 'chanel_conv'" in msg and "did you mean 'channel_conv'" in msg
    assert f"{path}:3:" in msg


def test_wrong_param_type_in_set() -> None:
    msg = error_of("clr", kernel_size="big")
    assert "--set" in msg and "param 'kernel_size' must be an int" in msg


def test_wrong_param_choice() -> None:
    msg = error_of("clr", variant="fulll")
    assert "must be one of" in msg and "did you mean 'full'" in msg


def test_unknown_param_override() -> None:
    msg = error_of("clr", kernel=3)
    assert "unknown param 'kernel'" in msg and "kernel_size" in msg


def test_wrong_arg_type_points_at_value(tmp_path: Path) -> None:
    path = write(tmp_path, """
        name: x
        rules:
          - insert:
              after: {type: Conv2d}
              block: channel_conv
              args: {kernel_size: three}
    """)
    msg = error_of(path)
    assert "rules[0].insert.args.kernel_size" in msg and "valid integer" in msg


def test_unknown_dollar_param(tmp_path: Path) -> None:
    path = write(tmp_path, """
        name: x
        params: {k: 3}
        rules:
          - insert: {after: {type: Conv2d}, block: channel_conv, args: {kernel_size: $kk}}
    """)
    msg = error_of(path)
    assert "unknown param $kk" in msg and "did you mean 'k'" in msg and f"{path}:4:" in msg


def test_bad_predicate_is_rejected_at_load(tmp_path: Path) -> None:
    path = write(tmp_path, """
        name: x
        rules:
          - train: {where: "__import__('os').system('true')"}
    """)
    assert "only calls to" in error_of(path)


def test_missing_file_and_unknown_builtin() -> None:
    assert "spec file not found: nope/x.yaml" in error_of("nope/x.yaml")
    assert "no built-in spec named 'crl'" in error_of("crl") and "did you mean 'clr'" in error_of("crl")


def test_include_merges_params_and_rules(tmp_path: Path) -> None:
    write(tmp_path, """
        name: base
        params: {k: {type: int, default: 3}}
        rules:
          - freeze: {}
          - insert:
              after: {type: Conv2d, where: "kernel_size != (1, 1)"}
              block: channel_conv
              args: {kernel_size: $k}
    """, "base.yaml")
    path = write(tmp_path, """
        name: child
        include: base.yaml
        params: {k: 5}
        rules:
          - head: {classes: 4}
    """)
    spec = load_spec(path)
    assert spec.values["k"] == 5
    assert [r.op for r in spec.rules] == ["freeze", "insert", "head"]
    assert spec.rules[1].args.args["kernel_size"] == 5


def test_include_errors_point_into_the_included_file(tmp_path: Path) -> None:
    base = write(tmp_path, "name: base\nrules:\n  - train: {tpye: Conv2d}\n", "base.yaml")
    path = write(tmp_path, "name: child\ninclude: base.yaml\nrules: []\n")
    msg = error_of(path)
    assert msg.startswith(f"{base}:3:") and "rules[0].train.tpye" in msg


def test_include_builtin_and_cycle(tmp_path: Path) -> None:
    spec = load_spec(write(tmp_path, "name: mine\ninclude: clr\nrules: []\n"))
    assert [r.label for r in spec.rules][:2] == ["freeze", "clr"]
    write(tmp_path, "name: a\ninclude: b.yaml\n", "a.yaml")
    write(tmp_path, "name: b\ninclude: a.yaml\n", "b.yaml")
    assert "include cycle" in error_of(tmp_path / "a.yaml")


def test_document_round_trip() -> None:
    spec = load_spec("clr", {"variant": "reduced_v2", "kernel_size": 5})
    again = load_spec(spec.to_document())
    assert again.values == spec.values
    assert [(r.op, r.label, r.args) for r in again.rules] == [(r.op, r.label, r.args) for r in spec.rules]


def test_selector_that_matches_nothing_points_at_rule(tmp_path: Path) -> None:
    path = write(tmp_path, """
        name: x
        rules:
          - insert: {after: {type: Conv3d}, block: channel_conv}
    """)
    with pytest.raises(SpecError) as info:
        peftc.compile(path, "resnet18")
    msg = str(info.value)
    assert f"{path}:3:" in msg and "rules[0].insert.after.type" in msg
    assert "no node has type 'Conv3d'" in msg and "did you mean 'Conv2d'" in msg


def test_optional_selector_may_match_nothing() -> None:
    spec = {"name": "x", "rules": [{"train": {"type": "Conv3d", "optional": True}}]}
    assert peftc.compile(spec, "resnet18").report.trainable_params > 0


def test_mapping_spec_may_include() -> None:
    spec = load_spec({"name": "mine", "include": "clr", "rules": [{"head": {"classes": 4}}]})
    assert [r.label for r in spec.rules] == ["freeze", "clr", "batchnorm", "head", "head#2"]
