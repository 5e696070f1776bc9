"""Every shell and Python block of README.md and docs/*.md works as written, or says in the page why it is not run.

What happens to a block (honestly, per block):

- **bash**: each ``peftc …`` line (also after ``torchrun … -m peftc``) is parsed by the real CLI — the command,
  every option, its type and range — without running it; ``python -m MODULE`` needs the module and every flag
  the line passes; ``pip install '.[x]'`` needs the extra; ``pytest --opt`` needs the option.
- **python**: compiled; its imports run; a name it uses must be bound earlier on the page, imported, a builtin,
  or declared by the page as the reader's own (``<!-- doc-test: names a, b -->``); a name imported from a
  package and then called must not be a module.
- ``<!-- doc-test: run -->`` before a block also **executes** it as written, in this process, in a scratch
  folder: every command of a bash block (``peftc`` ones only) must exit 0; a page's marked Python blocks run in
  one namespace.
- ``<!-- doc-test: excerpt REASON -->`` / ``<!-- doc-test: skip REASON -->`` exempt a block; the reason is required.
"""

from __future__ import annotations

import ast
import builtins
import importlib
import importlib.util
import re
import shlex
import textwrap
import types
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
_BLOCK = re.compile(r"(?:<!-- doc-test: (?P<marker>[^>]*?) -->\n)?```(?P<lang>bash|python)\n(?P<body>.*?)```", re.S)


@dataclass
class Block:
    page: Path
    line: int
    lang: str
    body: str
    marker: str

    @property
    def where(self) -> str:
        return f"{self.page.relative_to(ROOT)}:{self.line}"

    @property
    def exempt(self) -> str | None:
        kind, _, reason = self.marker.partition(" ")
        kind = kind.rstrip(":")
        if kind in ("excerpt", "skip"):
            assert reason.strip(), f"{self.where}: a doc-test {kind} marker needs a reason"
            return f"{kind}: {reason.strip()}"
        return None

    @property
    def declared(self) -> set[str]:
        kind, _, rest = self.marker.partition(" ")
        return {n.strip() for n in rest.split("—")[0].split(",") if n.strip()} if kind == "names" else set()


def blocks() -> list[Block]:
    out = []
    for page in PAGES:
        text = page.read_text(encoding="utf-8")
        for m in _BLOCK.finditer(text):
            line = text.count("\n", 0, m.start("body"))
            out.append(Block(page, line, m.group("lang"), m.group("body"), (m.group("marker") or "").strip()))
    return out


BLOCKS = blocks()


def test_the_pages_have_blocks() -> None:
    assert sum(b.lang == "bash" for b in BLOCKS) >= 15 and sum(b.lang == "python" for b in BLOCKS) >= 8


# -- bash -------------------------------------------------------------------------------------------------------


def _commands(body: str) -> list[list[str]]:
    out = []
    for raw in body.splitlines():
        words = shlex.split(raw, comments=True)
        command: list[str] = []
        for word in [*words, "&&"]:
            if word == "&&":
                if command:
                    out.append(command)
                command = []
            else:
                command.append(word)
    return out


def _check_peftc(args: list[str]) -> None:
    from typer.main import get_command

    from peftc.cli import app

    group = get_command(app)
    ctx = group.make_context("peftc", list(args))
    name, command, rest = group.resolve_command(ctx, [*ctx._protected_args, *ctx.args])
    command.make_context(name, rest, parent=ctx)  # parses and converts every option; runs nothing


def _check_command(words: list[str], where: str) -> None:
    tool, args = words[0], words[1:]
    if tool == "peftc":
        try:
            _check_peftc(args)
        except Exception as exc:  # the CLI's usage errors (typer vendors click's exception types)
            message = exc.format_message() if hasattr(exc, "format_message") else str(exc)
            pytest.fail(f"{where}: `{shlex.join(words)}` is refused by the CLI: {message}")
    elif tool == "torchrun":
        assert "-m" in args, f"{where}: torchrun without -m"
        module = args[args.index("-m") + 1]
        assert module == "peftc", f"{where}: torchrun runs {module}"
        _check_command(["peftc", *args[args.index("-m") + 2:]], where)
    elif tool == "python":
        assert args[:1] == ["-m"], f"{where}: {shlex.join(words)}"
        module = args[1]
        spec = importlib.util.find_spec(module if module != "benchmarks" else "benchmarks.__main__")
        assert spec is not None and spec.origin, f"{where}: no module {module}"
        source = Path(spec.origin).read_text(encoding="utf-8")
        for flag in (a for a in args[2:] if a.startswith("--")):
            assert f'"{flag}"' in source, f"{where}: python -m {module} takes no {flag}"
    elif tool == "pip":
        extras = re.findall(r"\.\[([\w,]+)\]", " ".join(args))
        pyproject = (ROOT / "pyproject.toml").read_text()
        for extra in (e for group in extras for e in group.split(",")):
            assert re.search(rf"^{extra} = \[", pyproject, re.M), f"{where}: no extra [{extra}] in pyproject.toml"
    elif tool == "pytest":
        conftest = (ROOT / "tests" / "conftest.py").read_text()
        for flag in (a for a in args if a.startswith("--") and a != "-q"):
            assert f'"{flag}"' in conftest, f"{where}: pytest has no {flag} option here"
        for path in (a for a in args if a.startswith("tests/")):
            assert (ROOT / path).is_file(), f"{where}: {path} does not exist"
    elif tool == "git":
        pass
    else:
        pytest.fail(f"{where}: the doc test does not know how to check `{tool}`; teach it or mark the block")


@pytest.fixture
def scratch(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty folder to run documented commands in; ``specs/`` is there, as in a checkout."""
    (tmp_path / "specs").symlink_to(ROOT / "specs")
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_marked_shell_blocks_run_as_written(scratch: Path) -> None:
    from typer.testing import CliRunner

    from peftc.cli import app

    marked = [b for b in BLOCKS if b.lang == "bash" and b.marker == "run"]
    assert marked, "no shell block is marked to run"
    for block in marked:
        for words in _commands(block.body):
            assert words[0] == "peftc", f"{block.where}: only peftc commands run here, not {words[0]}"
            result = CliRunner().invoke(app, words[1:])
            assert result.exit_code == 0, f"{block.where}: `{shlex.join(words)}` failed:\n{result.output[-2000:]}"


@pytest.mark.parametrize("block", [b for b in BLOCKS if b.lang == "bash"], ids=lambda b: b.where)
def test_shell_block(block: Block) -> None:
    if block.exempt:
        pytest.skip(block.exempt)
    for words in _commands(block.body):
        words = [w for w in words if not re.fullmatch(r"[A-Z_]+=\S*", w)]  # leading VAR=value
        _check_command(words, block.where)


# -- python -----------------------------------------------------------------------------------------------------


def _bound(tree: ast.AST) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Name) and isinstance(node.ctx, (ast.Store, ast.Del)):
            names.add(node.id)
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, ast.alias):
            names.add((node.asname or node.name).split(".")[0])
        elif isinstance(node, ast.arg):
            names.add(node.arg)
    return names


def _check_python(block: Block, known: set[str]) -> set[str]:
    """Check one block given the names bound before it on the page; returns the names bound after it."""
    try:
        tree = ast.parse(textwrap.dedent(block.body))
    except SyntaxError as exc:
        pytest.fail(f"{block.where}: not valid Python: {exc}")
    imported: dict[str, object] = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                importlib.import_module(alias.name)
        elif isinstance(node, ast.ImportFrom):
            module = importlib.import_module(node.module or "")
            for alias in node.names:
                assert hasattr(module, alias.name), f"{block.where}: {node.module} has no {alias.name}"
                imported[alias.asname or alias.name] = getattr(module, alias.name)
    called = {n.func.id for n in ast.walk(tree) if isinstance(n, ast.Call) and isinstance(n.func, ast.Name)}
    for name in called & set(imported):
        assert not isinstance(imported[name], types.ModuleType), (
            f"{block.where}: `{name}` is imported as the module {imported[name].__name__}, then called")
    bound = known | _bound(tree) | block.declared
    used = {n.id for n in ast.walk(tree) if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Load)}
    missing = sorted(used - bound - set(dir(builtins)))
    assert not missing, f"{block.where}: uses {', '.join(missing)} without defining or importing it"
    return bound


@pytest.mark.parametrize("page", [p for p in PAGES if any(b.page == p and b.lang == "python" for b in BLOCKS)],
                         ids=lambda p: p.name)
def test_python_blocks(page: Path) -> None:
    known: set[str] = set()
    for block in (b for b in BLOCKS if b.page == page and b.lang == "python" and not b.exempt):
        known = _check_python(block, known)


def test_marked_python_blocks_run_as_written(scratch: Path) -> None:
    """The Python blocks marked ``run`` execute as written, each page's in one namespace."""
    pages: dict[Path, list[str]] = {}
    for block in BLOCKS:
        if block.lang == "python" and block.marker == "run":
            pages.setdefault(block.page, []).append(textwrap.dedent(block.body))
    assert pages, "no Python block is marked to run"
    for page, codes in pages.items():
        exec(compile("\n".join(codes), str(page), "exec"), {"__name__": "__doc_block__"})
