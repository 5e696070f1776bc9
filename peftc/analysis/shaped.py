"""The shape-aware tracer: torch.fx with proxies that know the value they stand for, on fake tensors.

Plain fx fails on code that asks a proxy a Python question: ``len(x.shape)``, ``(*x.shape[:-1], -1, d)``,
``if channels != self.channels``, ``range(n)`` — everyday code in HF transformers and other libraries. Here
every node also gets a value computed by running its operation on fake tensors (no compute, no memory) for an
example input, so those questions get concrete answers: what is not a tensor (a size, a flag) is specialised to
the example's sizes, while the tensor operations — including reading ``x.shape[0]`` for a reshape — stay in the
graph, so the batch dimension stays dynamic. Asking the *value* of a tensor (``if x.sum() > 0``) still fails:
the graph cannot depend on data.
"""

from __future__ import annotations

import inspect
from collections.abc import Iterator
from typing import Any

import torch
from torch import fx
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.fx.proxy import Attribute
from torch.utils._pytree import tree_leaves, tree_map

from peftc.analysis.paths import resolve

__all__ = ["ShapedTracing"]

_UNKNOWN = object()
BATCHES = (2, 3)  # the example is traced at two batch sizes: an answer that differs between them depends on the batch


class _ValueProxy(fx.Proxy):
    """A proxy whose Python questions (``len``, iteration, ``int``) are answered from its example values."""

    def __getattr__(self, k: str) -> Attribute:
        return _ValueAttribute(self, k)

    def __len__(self) -> int:
        return self.tracer.concrete(self, len)

    def __index__(self) -> int:
        return self.tracer.concrete(self, int)

    def __int__(self) -> int:
        return self.tracer.concrete(self, int)

    def __float__(self) -> float:
        return self.tracer.concrete(self, float)


class _ValueAttribute(Attribute, _ValueProxy):
    """``proxy.attr``: an Attribute (a method call is one node) that also answers from its values."""


class ShapedTracing(fx.Tracer):
    """Proxies that carry fake example values (see the module docstring), mixed into a tracer with a leaf policy.

    ``examples`` are input batches of the sizes in :data:`BATCHES`: every node gets its value for each, so a
    Python answer that depends on the batch size is caught rather than fixed. ``eager`` names module paths kept
    as single nodes (run as they are) because they do not trace even so.
    """

    def __init__(self, *args: Any, examples: tuple[torch.Tensor, ...], eager: frozenset[str] = frozenset(),
                 **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.mode = FakeTensorMode(allow_non_fake_inputs=True)
        self.examples = tuple(self.mode.from_tensor(x) for x in examples)
        self.eager = eager
        self.values: dict[fx.Node, tuple[Any, ...]] = {}
        self._evaluating = False  # running an operation on fake values: record nothing

    def trace(self, root: Any, concrete_args: Any = None) -> fx.Graph:
        """Trace ``root``, then put back every module attribute its code set while being traced (HF Swin stores
        the window size it computed from the input): tracing leaves no proxy behind in the model."""
        modules = list(root.modules()) if isinstance(root, torch.nn.Module) else []
        before = [dict(vars(m)) for m in modules]
        try:
            return super().trace(root, concrete_args)
        finally:
            for module, attrs in zip(modules, before):
                for key in [k for k in vars(module) if k not in attrs]:
                    delattr(module, key)
                for key, value in attrs.items():
                    if vars(module).get(key, attrs) is not value:
                        vars(module)[key] = value

    def call_module(self, m: torch.nn.Module, forward: Any, args: Any, kwargs: Any) -> Any:
        if self._evaluating:
            return forward(*args, **kwargs)
        return super().call_module(m, forward, args, kwargs)

    def getattr(self, attr: str, attr_val: Any, parameter_proxy_cache: dict[str, Any]) -> Any:
        if self._evaluating:
            return attr_val
        return super().getattr(attr, attr_val, parameter_proxy_cache)

    def is_leaf_module(self, m: torch.nn.Module, module_qualified_name: str) -> bool:
        return module_qualified_name in self.eager or super().is_leaf_module(m, module_qualified_name)

    def proxy(self, node: fx.Node) -> fx.Proxy:
        return _ValueProxy(node, self)

    def create_args_for_root(self, root_fn: Any, is_module: bool, concrete_args: Any = None) -> tuple[Any, list]:
        """One input (the image batch); every other argument keeps its default, ``**kwargs`` stay empty."""
        params = list(inspect.signature(inspect.unwrap(root_fn)).parameters)
        name = params[1] if is_module and len(params) > 1 else "x"
        return root_fn, [self.root, self.create_proxy("placeholder", name, (), {})]

    def create_node(self, kind: str, target: Any, args: Any, kwargs: Any, *rest: Any, **more: Any) -> fx.Node:
        node = super().create_node(kind, target, args, kwargs, *rest, **more)
        if kind != "output":
            self.values[node] = tuple(self._evaluate(i, kind, target, node.args, node.kwargs)
                                      for i in range(len(BATCHES)))
        return node

    def _evaluate(self, i: int, kind: str, target: Any, args: Any, kwargs: Any) -> Any:
        """The node's value on the ``i``-th fake example; unknown when the operation fails on fake tensors."""

        def value(a: Any) -> Any:
            return self.values.get(a, (_UNKNOWN,) * len(BATCHES))[i] if isinstance(a, fx.Node) else a

        args, kwargs = tree_map(value, args), tree_map(value, kwargs)
        if any(v is _UNKNOWN for v in tree_leaves((args, kwargs))):
            return _UNKNOWN
        self._evaluating = True
        try:
            with self.mode:
                if kind == "placeholder":
                    return self.examples[i]
                if kind == "get_attr":
                    return resolve(self.root, target)
                if kind == "call_function":
                    return target(*args, **kwargs)
                if kind == "call_method":
                    return getattr(args[0], target)(*args[1:], **kwargs)
                return self.root.get_submodule(target)(*args, **kwargs)  # call_module
        except Exception:
            return _UNKNOWN
        finally:
            self._evaluating = False

    def answer(self, proxy: fx.Proxy, question: Any) -> Any:
        """``question(value)`` — ``len``, ``bool``, ``int`` — asked of the proxy's example values; ``_UNKNOWN`` when
        a value could not be computed. A TraceError when the value is tensor data or the answer depends on the
        batch size: a graph cannot hold either as a constant."""
        values = self.values.get(proxy.node, (_UNKNOWN,))
        if any(v is _UNKNOWN for v in values):
            return _UNKNOWN
        if any(isinstance(v, torch.Tensor) for v in values):
            raise fx.proxy.TraceError("the code branches on tensor data (a Python value computed from the input)")
        answers = [question(v) for v in values]
        if any(a != answers[0] for a in answers[1:]):
            got, batches = " or ".join(map(str, answers)), " or ".join(map(str, BATCHES))
            raise fx.proxy.TraceError(f"the code specialises on the batch size ({question.__name__}() is {got} for "
                                      f"batches of {batches})")
        return answers[0]

    def concrete(self, proxy: fx.Proxy, question: Any) -> Any:
        """A Python answer the code needs now (``len(x.shape)``, ``range(n)``), from the example's values."""
        answer = self.answer(proxy, question)
        if answer is _UNKNOWN:
            raise fx.proxy.TraceError(f"the code needs {question.__name__}() of a value peftc could not compute")
        return answer

    def to_bool(self, obj: fx.Proxy) -> bool:
        answer = self.answer(obj, bool)
        return super().to_bool(obj) if answer is _UNKNOWN else answer

    def iter(self, obj: fx.Proxy) -> Iterator[Any]:
        length = self.answer(obj, len)
        if length is _UNKNOWN:
            return super().iter(obj)
        return iter([obj[i] for i in range(length)])

    def keys(self, obj: fx.Proxy) -> Any:
        keys = self.answer(obj, _keys)
        return super().keys(obj) if keys in (_UNKNOWN, None) else keys


def _keys(value: Any) -> list[Any] | None:
    return list(value.keys()) if isinstance(value, dict) else None

