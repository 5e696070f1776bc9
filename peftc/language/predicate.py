"""A tiny, safe expression language for ``where:`` (selectors) and ``when:`` (rules).

Specs are data, never code: an expression is parsed with :mod:`ast`, checked against a whitelist of node types,
and then interpreted by walking the tree here. Nothing is passed to ``eval``/``exec``, there is no attribute
access (so no ``__class__`` escapes), and only a handful of pure functions can be called.

Supported: literals (numbers, strings, booleans, ``None``, tuples, lists), names, comparisons (``== != < <= > >=
in not in``, chained), ``and``/``or``/``not``, arithmetic (``+ - * / // %``, unary minus), indexing with ``[]``,
the conditional ``a if c else b``, and calls to ``len min max abs int float str bool``.
"""

from __future__ import annotations

import ast
import operator
from collections.abc import Callable, Mapping
from typing import Any

__all__ = ["Predicate", "PredicateSyntaxError", "UnknownName"]

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


class PredicateSyntaxError(ValueError):
    """The expression is not valid Python or uses something outside the whitelist."""


class UnknownName(LookupError):
    """A name in the expression is not defined for the object it is evaluated on."""

    def __init__(self, name: str):
        super().__init__(name)
        self.name = name


class Predicate:
    """A parsed, checked expression; call it with a mapping of names to values."""

    def __init__(self, source: str):
        self.source = source
        try:
            tree = ast.parse(source.strip(), mode="eval")
        except SyntaxError as exc:
            raise PredicateSyntaxError(f"invalid expression {source!r}: {exc.msg}") from None
        self._tree = tree.body
        self.names: frozenset[str] = frozenset(self._check(self._tree))

    def __repr__(self) -> str:
        return f"Predicate({self.source!r})"

    def __call__(self, env: Mapping[str, Any]) -> Any:
        return self._eval(self._tree, env)

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
            return _BINARY[type(node.op)](self._eval(node.left, env), self._eval(node.right, env))
        if isinstance(node, ast.Subscript):
            return self._eval(node.value, env)[self._eval(node.slice, env)]
        if isinstance(node, ast.IfExp):
            return self._eval(node.body if self._eval(node.test, env) else node.orelse, env)
        if isinstance(node, ast.Call):
            assert isinstance(node.func, ast.Name)
            return _FUNCTIONS[node.func.id](*(self._eval(a, env) for a in node.args))
        raise self._unsupported(node)  # unreachable: _check rejected it
