"""A tiny, safe expression language for ``where:`` (selectors) and ``when:`` (rules).

Specs are data, never code: an expression is parsed with :mod:`ast`, checked against a whitelist of node types,
and then interpreted by walking the tree here. Nothing is passed to ``eval``/``exec``, there is no attribute
access (so no ``__class__`` escapes), and only a handful of pure functions can be called.

Supported: literals (numbers, strings, booleans, ``None``, tuples, lists), names, comparisons (``== != < <= > >=
in not in``, chained), ``and``/``or``/``not``, arithmetic (``+ - * / // %``, unary minus), indexing with ``[]``,
the conditional ``a if c else b``, and calls to ``len min max abs int float str bool``.

Expressions are bounded and total, because a spec may come from anyone: the source length, the nesting depth
and the size of every string, list or tuple a step builds are capped (``'a' * 10**9`` is refused before it
allocates), and any error while evaluating becomes a :class:`PredicateError` the caller turns into one message
with a location.
"""

from __future__ import annotations

import ast
import operator
from collections.abc import Callable, Mapping
from typing import Any

__all__ = ["MAX_DEPTH", "MAX_LENGTH", "MAX_SIZE", "Predicate", "PredicateError", "PredicateEvalError",
           "PredicateSyntaxError", "UnknownName"]

MAX_LENGTH = 1000  # characters of source
MAX_DEPTH = 32  # nesting of the expression tree
MAX_SIZE = 10_000  # elements of any string, list or tuple built while evaluating

_COMPARE: dict[type, Callable[[Any, Any], Any]] = {
    ast.Eq: operator.eq,
    ast.NotEq: operator.ne,
    ast.Lt: operator.lt,
    ast.LtE: operator.le,
    ast.Gt: operator.gt,
    ast.GtE: operator.ge,
    ast.In: lambda a, b: a in b,
    ast.NotIn: lambda a, b: a not in b,
}
_BINARY: dict[type, Callable[[Any, Any], Any]] = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.Div: operator.truediv,
    ast.FloorDiv: operator.floordiv,
    ast.Mod: operator.mod,
}
_FUNCTIONS: dict[str, Callable[..., Any]] = {
    "len": len,
    "min": min,
    "max": max,
    "abs": abs,
    "int": int,
    "float": float,
    "str": str,
    "bool": bool,
}


class PredicateError(ValueError):
    """Anything wrong with an expression; the message names the expression, the caller adds the place."""


class PredicateSyntaxError(PredicateError):
    """The expression is not valid Python, uses something outside the whitelist, or is too long or too deep."""


class PredicateEvalError(PredicateError):
    """Evaluating the expression failed (``1/0``, ``min([])``, ``'abc'[10]``) or would build too large a value."""


class UnknownName(LookupError):
    """A name in the expression is not defined for the object it is evaluated on."""

    def __init__(self, name: str):
        super().__init__(name)
        self.name = name


class Predicate:
    """A parsed, checked expression; call it with a mapping of names to values."""

    def __init__(self, source: str):
        self.source = source
        if len(source) > MAX_LENGTH:
            raise PredicateSyntaxError(f"expression is {len(source):,} characters long; at most {MAX_LENGTH:,}")
        try:
            tree = ast.parse(source.strip(), mode="eval")
        except SyntaxError as exc:
            raise PredicateSyntaxError(f"invalid expression {source!r}: {exc.msg}") from None
        except (MemoryError, RecursionError):
            raise PredicateSyntaxError(f"expression {source[:40]!r}… nests too deeply") from None
        if _depth(tree.body) > MAX_DEPTH:
            raise PredicateSyntaxError(f"expression {source[:40]!r} nests deeper than {MAX_DEPTH} levels")
        self._tree = tree.body
        self.names: frozenset[str] = frozenset(self._check(self._tree))

    def __repr__(self) -> str:
        return f"Predicate({self.source!r})"

    def __call__(self, env: Mapping[str, Any]) -> Any:
        """The value of the expression; :class:`UnknownName` or :class:`PredicateEvalError` if it has none."""
        try:
            return self._eval(self._tree, env)
        except (UnknownName, PredicateEvalError):
            raise
        except (ArithmeticError, LookupError, TypeError, ValueError, MemoryError, RecursionError) as exc:
            raise PredicateEvalError(f"cannot evaluate {self.source!r}: {type(exc).__name__}: {exc}") from None

    # -- checking -------------------------------------------------------------------------------------------
    def _check(self, node: ast.AST) -> set[str]:
        names: set[str] = set()
        if isinstance(node, ast.Constant):
            return names
        if isinstance(node, ast.Name):
            return {node.id}
        if isinstance(node, (ast.Tuple, ast.List)):
            for elt in node.elts:
                names |= self._check(elt)
            return names
        if isinstance(node, ast.Compare):
            for op in node.ops:
                if type(op) not in _COMPARE:
                    raise self._unsupported(op)
            for sub in [node.left, *node.comparators]:
                names |= self._check(sub)
            return names
        if isinstance(node, ast.BoolOp):
            for sub in node.values:
                names |= self._check(sub)
            return names
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.Not, ast.USub)):
            return self._check(node.operand)
        if isinstance(node, ast.BinOp) and type(node.op) in _BINARY:
            return self._check(node.left) | self._check(node.right)
        if isinstance(node, ast.Subscript):
            return self._check(node.value) | self._check(node.slice)
        if isinstance(node, ast.IfExp):
            return self._check(node.test) | self._check(node.body) | self._check(node.orelse)
        if isinstance(node, ast.Call):
            if not isinstance(node.func, ast.Name) or node.func.id not in _FUNCTIONS or node.keywords:
                raise PredicateSyntaxError(
                    f"in {self.source!r}: only calls to {', '.join(sorted(_FUNCTIONS))} are allowed"
                )
            for arg in node.args:
                names |= self._check(arg)
            return names
        raise self._unsupported(node)

    def _unsupported(self, node: ast.AST) -> PredicateSyntaxError:
        return PredicateSyntaxError(f"in {self.source!r}: {type(node).__name__} is not allowed in a predicate")

    # -- evaluation -----------------------------------------------------------------------------------------
    def _eval(self, node: ast.AST, env: Mapping[str, Any]) -> Any:
        if isinstance(node, ast.Constant):
            return node.value
        if isinstance(node, ast.Name):
            if node.id in env:
                return env[node.id]
            if node.id in ("True", "False", "None"):
                return {"True": True, "False": False, "None": None}[node.id]
            raise UnknownName(node.id)
        if isinstance(node, ast.Tuple):
            return tuple(self._eval(e, env) for e in node.elts)
        if isinstance(node, ast.List):
            return [self._eval(e, env) for e in node.elts]
        if isinstance(node, ast.Compare):
            left = self._eval(node.left, env)
            for op, comp in zip(node.ops, node.comparators):
                right = self._eval(comp, env)
                if not _COMPARE[type(op)](left, right):
                    return False
                left = right
            return True
        if isinstance(node, ast.BoolOp):
            if isinstance(node.op, ast.And):
                result: Any = True
                for sub in node.values:
                    result = self._eval(sub, env)
                    if not result:
                        return result
                return result
            result = False
            for sub in node.values:
                result = self._eval(sub, env)
                if result:
                    return result
            return result
        if isinstance(node, ast.UnaryOp):
            value = self._eval(node.operand, env)
            return (not value) if isinstance(node.op, ast.Not) else -value
        if isinstance(node, ast.BinOp):
            left, right = self._eval(node.left, env), self._eval(node.right, env)
            self._check_size(node.op, left, right)
            return _BINARY[type(node.op)](left, right)
        if isinstance(node, ast.Subscript):
            return self._eval(node.value, env)[self._eval(node.slice, env)]
        if isinstance(node, ast.IfExp):
            return self._eval(node.body if self._eval(node.test, env) else node.orelse, env)
        if isinstance(node, ast.Call):
            assert isinstance(node.func, ast.Name)
            return _FUNCTIONS[node.func.id](*(self._eval(a, env) for a in node.args))
        raise self._unsupported(node)  # unreachable: _check rejected it

    def _check_size(self, op: ast.operator, left: Any, right: Any) -> None:
        """Refuse ``+``/``*`` on sequences whose result would exceed :data:`MAX_SIZE`, before building it."""
        sized = (str, list, tuple)
        if isinstance(op, ast.Add) and isinstance(left, sized) and isinstance(right, sized):
            size = len(left) + len(right)
        elif isinstance(op, ast.Mult) and isinstance(left, sized) and isinstance(right, int):
            size = len(left) * right
        elif isinstance(op, ast.Mult) and isinstance(right, sized) and isinstance(left, int):
            size = len(right) * left
        else:
            return
        if size > MAX_SIZE:
            raise PredicateEvalError(f"in {self.source!r}: a value of {size:,} elements; at most {MAX_SIZE:,}")


def _depth(node: ast.AST) -> int:
    """The nesting depth of an expression tree, without recursion (the tree may be deep)."""
    deepest, stack = 0, [(node, 1)]
    while stack:
        current, depth = stack.pop()
        deepest = max(deepest, depth)
        if depth <= MAX_DEPTH:
            stack.extend((child, depth + 1) for child in ast.iter_child_nodes(current))
    return deepest
