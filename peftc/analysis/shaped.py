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
from torch.utils._pytree import tree_map

from peftc.analysis.paths import resolve

__all__ = ["ShapedTracing"]

_UNKNOWN = object()


class _ValueProxy(fx.Proxy):
    """A proxy whose Python questions (``len``, iteration, ``int``) are answered from its example value."""

    @property
    def value(self) -> Any:
        return self.tracer.values.get(self.node, _UNKNOWN)

    def __getattr__(self, k: str) -> Attribute:
        return _ValueAttribute(self, k)

    def __len__(self) -> int:
        value = self.value
        if value is _UNKNOWN:
            return super().__len__()
        return len(value)

    def __index__(self) -> int:
        return self.tracer.concrete(self, int)

    def __int__(self) -> int:
        return self.tracer.concrete(self, int)

    def __float__(self) -> float:
        return self.tracer.concrete(self, float)


class _ValueAttribute(Attribute, _ValueProxy):
    """``proxy.attr``: an Attribute (a method call is one node) that also answers from its value."""


class ShapedTracing(fx.Tracer):
    """Proxies that carry fake example values (see the module docstring), mixed into a tracer with a leaf policy.

    ``example`` is the input the values are computed for; ``eager`` names module paths kept as single nodes
    (run as they are) because they do not trace even so.
    """

    def __init__(self, *args: Any, example: torch.Tensor, eager: frozenset[str] = frozenset(), **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.mode = FakeTensorMode(allow_non_fake_inputs=True)
        self.example = self.mode.from_tensor(example)
        self.eager = eager
        self.values: dict[fx.Node, Any] = {}
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
            self.values[node] = self._evaluate(kind, target, node.args, node.kwargs)
        return node

    def _evaluate(self, kind: str, target: Any, args: Any, kwargs: Any) -> Any:
        """The node's value on the fake example; unknown when the operation fails on fake tensors."""

        def value(a: Any) -> Any:
            return self.values.get(a, _UNKNOWN) if isinstance(a, fx.Node) else a

        args, kwargs = tree_map(value, args), tree_map(value, kwargs)
        if any(v is _UNKNOWN for v in (*torch.utils._pytree.tree_leaves((args, kwargs)),)):
            return _UNKNOWN
        self._evaluating = True
        try:
            with self.mode:
                if kind == "placeholder":
                    return self.example
                if kind == "get_attr":
                    return resolve(self.root, target)
                if kind == "call_function":
                    return target(*args, **kwargs)
                if kind == "call_method":
                    return getattr(args[0], target)(*args[1:], **kwargs)
                if kind == "call_module":
                    return self.root.get_submodule(target)(*args, **kwargs)
        except Exception:
            return _UNKNOWN
        finally:
            self._evaluating = False
        return _UNKNOWN

    def concrete(self, proxy: fx.Proxy, kind: type) -> Any:
        """A Python number the code needs now (``range(n)``): the example's, when it is not tensor data."""
        value = self.values.get(proxy.node, _UNKNOWN)
        if isinstance(value, torch.Tensor) or value is _UNKNOWN:
            raise fx.proxy.TraceError(f"the code needs a Python {kind.__name__} computed from tensor data")
        return kind(value)

    def to_bool(self, obj: fx.Proxy) -> bool:
        value = self.values.get(obj.node, _UNKNOWN)
        if isinstance(value, torch.Tensor) or value is _UNKNOWN:
            return super().to_bool(obj)  # control flow on tensor data: the graph cannot depend on it
        return bool(value)

    def iter(self, obj: fx.Proxy) -> Iterator[Any]:
        value = self.values.get(obj.node, _UNKNOWN)
        if value is _UNKNOWN or isinstance(value, torch.Tensor):
            return super().iter(obj)
        return iter([obj[i] for i in range(len(value))])

    def keys(self, obj: fx.Proxy) -> Any:
        value = self.values.get(obj.node, _UNKNOWN)
        return list(value.keys()) if isinstance(value, dict) else super().keys(obj)

