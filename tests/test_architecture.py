"""The tree's rules, checked on the source: shared code names no method, and imports point one way.

Shared code (``passes/``, ``export/``, ``peftc/train/``, ``peftc/cli/``) reaches a method only through the
registries and the block contract, so its *code* — identifiers and string literals; docstrings and comments
may give examples — names no built-in method, block, block class or method-owned primitive. And no module of
the package imports, at module level or inside a function, a module that imports it back.
"""

from __future__ import annotations

import ast
import io
import re
import tokenize
from pathlib import Path

import networkx as nx
import pytest

import peftc.methods
from peftc.blocks.contract import Block
from peftc.blocks.registry import BLOCKS
from peftc.language.primitives import PRIMITIVES
from peftc.plugins import ensure_loaded

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = {"peftc": ROOT / "peftc", "peftc.passes": ROOT / "passes", "peftc.export": ROOT / "export"}
SHARED = [ROOT / "passes", ROOT / "export", ROOT / "peftc" / "train", ROOT / "peftc" / "cli"]


def _modules() -> dict[str, Path]:
    out = {}
    for package, folder in PACKAGES.items():
        for path in folder.rglob("*.py"):
            parts = list(path.relative_to(folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join([package, *parts])] = path
    return out


MODULES = _modules()


def _method_names() -> set[str]:
    """Every name a method owns: its room, its blocks, its block classes, its primitives."""
    ensure_loaded()
    rooms = {p.name for p in Path(peftc.methods.__file__).parent.iterdir() if (p / "__init__.py").is_file()}
    in_rooms = lambda obj: getattr(obj, "__module__", "").startswith("peftc.methods.")  # noqa: E731
    blocks = {name for name, block in BLOCKS.items() if in_rooms(block.factory)}
    primitives = {name for name, prim in PRIMITIVES.items() if in_rooms(prim.run)}
    classes: set[str] = set()
    pending = [Block]
    while pending:
        cls = pending.pop()
        pending.extend(cls.__subclasses__())
        if in_rooms(cls):
            classes.add(cls.__name__)
    return rooms | blocks | primitives | classes


def _code_only(source: str) -> str:
    """``source`` without comments and docstrings (what runs, not what explains)."""
    tree = ast.parse(source)
    docstrings = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and node.body:
            first = node.body[0]
            value = first.value if isinstance(first, ast.Expr) else None
            if isinstance(value, ast.Constant) and isinstance(value.value, str):
                docstrings.add((first.lineno, first.col_offset))
    kept = []
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.COMMENT or (tok.type == tokenize.STRING and tok.start in docstrings):
            continue
        kept.append(tok.string)
    return " ".join(kept)


def test_the_method_names_are_found() -> None:
    names = _method_names()
    assert {"lora", "ln_tuning", "ln_bank", "task_key", "tocom", "ChannelConv", "TiedLayer", "tie", "vera"} <= names


@pytest.mark.parametrize("folder", SHARED, ids=lambda p: str(p.relative_to(ROOT)))
def test_shared_code_names_no_method(folder: Path) -> None:
    names = "|".join(sorted(map(re.escape, _method_names())))
    pattern = re.compile(rf"(?<![A-Za-z0-9_])({names})(?![A-Za-z0-9_])")
    hits = []
    for path in sorted(folder.rglob("*.py")):
        for match in pattern.finditer(_code_only(path.read_text(encoding="utf-8"))):
            hits.append(f"{path.relative_to(ROOT)}: {match.group(0)!r}")
    assert not hits, "shared code names a method (give it a hook or a registry):\n" + "\n".join(hits)


def _imports(module: str, path: Path) -> set[str]:
    """Package modules ``module`` imports anywhere in its code (function level too; ``TYPE_CHECKING`` blocks,
    which never run, excepted)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    skip = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skip.update(id(n) for n in ast.walk(node))
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = set()
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*parts, base] if base else parts)
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)  # a submodule imported by name
    return {name for name in found if name in MODULES and name != module}


def test_no_import_cycles() -> None:
    graph = nx.DiGraph()
    for module, path in MODULES.items():
        graph.add_node(module)
        graph.add_edges_from((module, other) for other in _imports(module, path))
    cycles = [sorted(c) for c in nx.strongly_connected_components(graph) if len(c) > 1]
    assert not cycles, "import cycles (counting function-level imports):\n" + "\n".join(map(str, cycles))


def test_the_architecture_walkthrough_shows_the_shipped_vera() -> None:
    doc = (ROOT / "docs" / "architecture.md").read_text(encoding="utf-8")
    walk = doc[doc.index("## Adding a method"):]
    room = ROOT / "peftc" / "methods" / "vera"
    sources = {"python": "".join(p.read_text(encoding="utf-8") for p in sorted(room.glob("*.py"))),
               "yaml": (ROOT / "specs" / "vera.yaml").read_text(encoding="utf-8")}
    snippets = re.findall(r"```(python|yaml)\n(.*?)```", walk, re.S)
    assert len(snippets) >= 5
    for lang, snippet in snippets:
        for line in snippet.strip("\n").splitlines():
            assert line.rstrip() in sources[lang], f"walk-through line not in the shipped {lang}: {line!r}"


def test_import_peftc_and_the_cli_need_no_torch() -> None:
    """``import peftc`` is lazy and ``peftc --help`` builds its command tree without importing torch."""
    import subprocess
    import sys

    code = "import sys, peftc, peftc.cli; assert 'torch' not in sys.modules, [m for m in sys.modules if 'torch' in m]"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr


@pytest.mark.parametrize("args", [["--help"], ["specs"], ["specs", "--json"], ["compile", "--help"],
                                  ["train", "--help"], ["export", "--help"], ["validate", "memvp"],
                                  ["validate", "tome", "--set", "r=8"]])
def test_listing_and_help_commands_import_no_torch(args: list[str]) -> None:
    """What only reads the spec catalog or prints help runs the real command line without importing torch."""
    import subprocess
    import sys

    code = ("import sys; from peftc.cli import main; sys.argv = ['peftc', *sys.argv[1:]]\n"
            "try:\n    main()\nexcept SystemExit as exit:\n    assert not exit.code, exit.code\n"
            "assert 'torch' not in sys.modules, [m for m in sys.modules if m.startswith('torch')][:5]")
    done = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr[-2000:]


def test_every_builtin_spec_validates_without_torch() -> None:
    """Reading a spec checks every rule's and block's arguments against the declarations alone: no torch, and a
    bad block argument is still the located message."""
    import subprocess
    import sys

    code = ("import sys, peftc\nfrom peftc.language import builtin_specs\n"
            "from peftc.errors import SpecError\n"
            "for name in builtin_specs():\n    peftc.load_spec(name)\n"
            "doc = {'peftc': 1, 'name': 'x', 'rules': [{'parallel': {'to': {'role': 'qkv'}, 'block': 'lora',"
            " 'args': {'rank': 0}}}]}\n"
            "try:\n    peftc.load_spec(doc)\nexcept SpecError as exc:\n    assert 'rank' in str(exc), exc\n"
            "else:\n    raise AssertionError('rank 0 accepted')\n"
            "assert 'torch' not in sys.modules, [m for m in sys.modules if m.startswith('torch')][:5]")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr[-2000:]


def test_every_package_ships_in_the_wheel() -> None:
    """pyproject lists its packages explicitly (the package-dir mapping needs it): a new room must be listed."""
    import tomllib

    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["tool"]["setuptools"]["packages"])
    found = {".".join(p.parent.relative_to(ROOT).parts) for p in (ROOT / "peftc").rglob("__init__.py")}
    assert found <= listed, f"packages missing from pyproject's [tool.setuptools] packages: {sorted(found - listed)}"
