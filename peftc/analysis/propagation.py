"""Propagation: running a traced graph on an example batch to learn what every node makes.

Two uses, two costs. The compiler only needs output *shapes* (blocks built from example shapes):
:func:`propagate_shapes` runs on the meta device, swapping every tensor for a meta one (a ViT-B forward at 224²
costs a third of a second of real compute on a small CPU, the meta run only the interpreter's bookkeeping), and
runs for real only when an op has no meta kernel. The graph tools (diff, inspect, the HTML view) also want
FLOPs: :func:`propagate` interprets the graph on a deterministic batch and records each node's shape and FLOPs.
FLOPs are measured, not guessed: every node runs under :class:`torch.utils.flop_counter.FlopCounterMode`, which
counts the multiply-accumulates of convolutions, matrix products and attention kernels as 2 FLOPs each
(element-wise ops, norms and activations count 0, as in fvcore and PyTorch's own counter); CPU attention kernels
the counter does not know (``scaled_dot_product_attention``, the fused ``nn.MultiheadAttention`` path) get the
standard closed form.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Union

import torch
import torch.nn.functional as F
from torch import fx, nn
from torch.fx.passes.shape_prop import ShapeProp

from peftc.analysis.trace import example_input, image_input_size, node_name
from peftc.errors import PeftcError

__all__ = ["NodeStats", "Shape", "ShapeError", "example_inputs", "format_shape", "input_shape", "propagate",
           "propagate_shapes"]

# A node's output: a tensor shape, a list of them (tuple outputs such as ``unbind``), or None (no tensor).
Shape = Union[tuple[int, ...], list["Shape"], None]


@dataclass(frozen=True)
class NodeStats:
    """What running one node on the example batch showed."""

    shape: Shape
    dtype: str | None
    flops: int

    @property
    def is_tensor(self) -> bool:
        """True when the node produces tensors (not a Python int, a shape tuple, None …)."""
        return self.shape is not None


class ShapeError(PeftcError):
    """The example batch does not fit the graph (usually: the wrong ``--image-size``)."""


def input_shape(
    input_size: tuple[int, int, int], image_size: int | tuple[int, int] | None = None, batch: int = 1
) -> tuple[int, int, int, int]:
    """``(batch, C, H, W)`` for a backbone's ``input_size``, with ``image_size`` overriding ``H, W``."""
    return (batch, *image_input_size(input_size, image_size))


def _shape_of(value: Any) -> Shape:
    if isinstance(value, torch.Tensor):
        return tuple(int(d) for d in value.shape)
    if isinstance(value, (tuple, list)) and value and any(isinstance(v, torch.Tensor) for v in value):
        return [_shape_of(v) for v in value]
    return None


def _dtype_of(value: Any) -> str | None:
    if isinstance(value, torch.Tensor):
        return str(value.dtype).removeprefix("torch.")
    if isinstance(value, (tuple, list)):
        return next((d for d in map(_dtype_of, value) if d), None)
    return None


def _attention_flops(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> int:
    """``softmax(q kᵀ) v``: 2·N·M·D for the scores plus 2·N·M·Dv for the weighted sum, per batch and head."""
    batch = math.prod(q.shape[:-2])
    n, d = q.shape[-2], q.shape[-1]
    m, dv = k.shape[-2], v.shape[-1]
    return 2 * batch * n * m * (d + dv)


def _mha_flops(module: nn.MultiheadAttention, query: torch.Tensor, key: torch.Tensor) -> int:
    """Projections plus attention for ``nn.MultiheadAttention`` (its fused CPU path goes uncounted)."""
    e = module.embed_dim
    if query.dim() == 2:
        query, key = (
            query.unsqueeze(1 if not module.batch_first else 0),
            key.unsqueeze(1 if not module.batch_first else 0),
        )
    if module.batch_first:
        b, n, m = query.shape[0], query.shape[1], key.shape[1]
    else:
        n, b, m = query.shape[0], query.shape[1], key.shape[0]
    kdim, vdim = module.kdim, module.vdim
    projections = 2 * b * (n * e * e + m * kdim * e + m * vdim * e + n * e * e)
    return projections + 2 * b * n * m * 2 * e


class _Propagator(fx.Interpreter):
    """Runs the graph node by node, recording shapes and counted FLOPs (node.meta is left untouched)."""

    def __init__(self, gm: fx.GraphModule):
        super().__init__(gm)
        self.stats: dict[fx.Node, NodeStats] = {}

    def run_node(self, n: fx.Node) -> Any:
        from torch.utils.flop_counter import FlopCounterMode  # imported on first use: `import peftc` stays light

        with FlopCounterMode(display=False) as counter:
            result = super().run_node(n)
        flops = int(counter.get_total_flops())
        if flops == 0:
            flops = self._fallback_flops(n)
        self.stats[n] = NodeStats(_shape_of(result), _dtype_of(result), flops)
        return result

    def _fallback_flops(self, n: fx.Node) -> int:
        if n.op == "call_function" and n.target is F.scaled_dot_product_attention:
            q, k, v = (self.env[a] if isinstance(a, fx.Node) else a for a in n.args[:3])
            if all(isinstance(t, torch.Tensor) for t in (q, k, v)):
                return _attention_flops(q, k, v)
        if n.op == "call_module":
            module = self.module.get_submodule(str(n.target))
            if isinstance(module, nn.MultiheadAttention) and len(n.args) >= 2:
                query, key = (self.env[a] if isinstance(a, fx.Node) else a for a in n.args[:2])
                if isinstance(query, torch.Tensor) and isinstance(key, torch.Tensor):
                    return _mha_flops(module, query, key)
        return 0


def propagate(gm: fx.GraphModule, shape: tuple[int, ...]) -> dict[fx.Node, NodeStats]:
    """Run ``gm`` once on a deterministic example batch of ``shape``; per-node shapes and FLOPs.

    The graph runs in its current mode under ``no_grad`` (compiled models and built backbones are in
    eval mode, so no running statistic moves). A batch that does not fit raises :class:`ShapeError`
    naming the node.
    """
    param = next(gm.parameters(), None)
    x = example_input(tuple(shape[1:]), batch=shape[0], device=param.device if param is not None else "cpu")
    if param is not None and param.is_floating_point():
        x = x.to(param.dtype)
    prop = _Propagator(gm)
    try:
        with torch.no_grad():
            prop.run(*example_inputs(gm, x))
    except Exception as exc:
        failed = next((n for n in gm.graph.nodes if n not in prop.stats and n.op != "placeholder"), None)
        where = f" at {node_name(failed)!r}" if failed is not None else ""
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise ShapeError(
            f"shape propagation with an input of {format_shape(tuple(shape))} failed{where}: {first}; "
            "pass an image size this backbone accepts (--image-size)"
        ) from None
    for node in gm.graph.nodes:  # placeholders without a value (fixed optional args) and the like
        prop.stats.setdefault(node, NodeStats(None, None, 0))
    return prop.stats


class _Unkeyable(Exception):
    """A value that cannot be part of a memo key (or rebuilt from one)."""


_PLAIN = (int, float, bool, str, type(None), torch.dtype, torch.device, torch.memory_format, torch.layout,
          type(Ellipsis))


def _key(value: Any) -> Any:
    """What a torch op's output shape can depend on: a tensor's metadata, plain values (with their type: 1, 1.0
    and True hash alike), containers of those. Anything else raises :class:`_Unkeyable`."""
    if isinstance(value, torch.Tensor):
        return ("T", tuple(value.shape), value.stride(), value.dtype, value.device)
    if isinstance(value, _PLAIN):
        return (type(value), value)
    if isinstance(value, (tuple, list)):
        return (type(value), tuple(_key(v) for v in value))
    if isinstance(value, dict):
        return (dict, tuple((k, _key(v)) for k, v in value.items()))
    if isinstance(value, slice):
        return (slice, _key(value.start), _key(value.stop), _key(value.step))
    raise _Unkeyable


def _blank(value: Any) -> Any:
    """An output as metadata: tensors become ``(shape, stride, dtype)``, immutable plain values stay."""
    if isinstance(value, torch.Tensor):
        return ("T", tuple(value.shape), value.stride(), value.dtype)
    if isinstance(value, _PLAIN) or (isinstance(value, tuple) and type(value) in (tuple, torch.Size)
                                     and all(isinstance(v, _PLAIN) for v in value)):
        return ("V", value)
    if type(value) in (tuple, list):
        return (type(value), [_blank(v) for v in value])
    raise _Unkeyable


def _fill(blank: Any) -> Any:
    """A fresh meta value from :func:`_blank`'s record."""
    if blank[0] == "T":
        return torch.empty_strided(blank[1], blank[2], dtype=blank[3], device="meta")
    if blank[0] == "V":
        return blank[1]
    return blank[0](_fill(b) for b in blank[1])


_MUTATING_OPERATORS = frozenset({"setitem", "delitem", "iadd", "iand", "iconcat", "ifloordiv", "ilshift", "imatmul",
                                  "imod", "imul", "ior", "ipow", "irshift", "isub", "itruediv", "ixor"})


def _pure(kind: str, target: Any) -> bool:
    """Ops whose output metadata is a function of their inputs' metadata and that change nothing else: torch's
    own functions, tensor methods and Python's operators (``operator.getitem``, ``getattr``). Not user functions a
    trace kept whole (they may hold state), nor anything in place (``x.unsqueeze_(0)`` reshapes its input, which
    later nodes read; ``operator.setitem`` fills a container): skipping those would leave their inputs stale."""
    name = target if isinstance(target, str) else getattr(target, "__name__", "")
    if (name.endswith("_") and not name.endswith("__")) or name in _MUTATING_OPERATORS:
        return False
    if kind == "call_method":
        return True
    module = getattr(target, "__module__", None) or ""
    return module in ("_operator", "operator", "builtins") or module.split(".")[0] == "torch"


class _MemoShapeProp(ShapeProp):
    """ShapeProp over meta tensors that runs each distinct op (target and input metadata) once.

    A ViT's identical blocks repeat the same ops on the same shapes, and on the meta device nearly all of the cost
    is PyTorch's meta kernels written in Python (element-wise type promotion, layer_norm, addmm): ViT-B's shape
    propagation did ~80 ms of them for 12 copies of one block's work. Leaf modules are memoised by their whole
    own state (:func:`_layer_key`); user functions a trace kept whole are always run (they may hold state)."""

    def __init__(self, gm: fx.GraphModule):
        super().__init__(gm)
        self._memo: dict[Any, Any] = {}

    def _memoised(self, kind: str, target: Any, args: Any, kwargs: Any, run: Any) -> Any:
        if kind != "call_module" and not _pure(kind, target):
            return run(target, args, kwargs)
        try:
            key = (kind, target, _key(args), _key(kwargs))
            hit = self._memo.get(key)
        except (_Unkeyable, TypeError):  # TypeError: an unhashable target or plain value
            return run(target, args, kwargs)
        if hit is not None:
            return _fill(hit)
        out = run(target, args, kwargs)
        with contextlib.suppress(_Unkeyable):  # an output of another kind is simply not remembered
            self._memo[key] = _blank(out)
        return out

    def call_function(self, target: Any, args: Any, kwargs: Any) -> Any:
        return self._memoised("call_function", target, args, kwargs, super().call_function)

    def call_method(self, target: Any, args: Any, kwargs: Any) -> Any:
        return self._memoised("call_method", target, args, kwargs, super().call_method)

    def call_module(self, target: Any, args: Any, kwargs: Any) -> Any:
        try:
            layer = _layer_key(self.fetch_attr(target))
        except _Unkeyable:
            return super().call_module(target, args, kwargs)
        return self._memoised("call_module", layer, args, kwargs, lambda _, a, k: super(
            _MemoShapeProp, self).call_module(target, a, k))


_BOOKKEEPING = frozenset(vars(nn.Module()))  # what nn.Module.__init__ sets: hooks, the tensor dicts, ``training``


def _layer_key(module: nn.Module) -> Any:
    """A leaf module as everything its forward can read of itself: class, mode, every attribute of its own
    (``eps``, ``normalized_shape``, timm's ``_fast_norm`` …), its tensors' metadata. A module with children or
    hooks, or an attribute that is not a plain value or a tensor, is not keyed."""
    if module._modules or module._forward_hooks or module._forward_pre_hooks:
        raise _Unkeyable
    attributes = tuple((k, _key(v)) for k, v in sorted(vars(module).items()) if k not in _BOOKKEEPING)
    tensors = tuple((k, _key(t)) for k, t in (*module._parameters.items(), *module._buffers.items()))
    return (type(module), module.training, attributes, tensors)


class _Propagation(nn.Module):
    """Runs shape propagation as its forward, so ``functional_call`` can swap every tensor of ``gm`` for a
    meta tensor of the same shape for its duration: the shapes come out without computing anything."""

    def __init__(self, gm: fx.GraphModule):
        super().__init__()
        self.gm = gm

    def forward(self, *inputs: torch.Tensor) -> None:
        _MemoShapeProp(self.gm).propagate(*inputs)


def example_inputs(gm: fx.GraphModule, x: torch.Tensor, known: Mapping[str, Any] | None = None) -> tuple[Any, ...]:
    """``x``, then each further input's example in ``known`` (by name), else its default — or, for an input a rule
    added (a second stream), a seeded random example of the shape in its ``meta['peftc_example']`` (without the
    batch), in ``x``'s dtype."""
    gen = torch.Generator().manual_seed(0)
    known = known or {}
    rest = [n for n in gm.graph.nodes if n.op == "placeholder"][1:]
    return (x, *(known[n.target] if n.target in known else
                 torch.randn(x.shape[0], *n.meta["peftc_example"], generator=gen).to(x.device, x.dtype)
                 if "peftc_example" in n.meta else (n.args[0] if n.args else None) for n in rest))


def _to_meta(value: Any) -> Any:
    if isinstance(value, (tuple, list)):
        return type(value)(_to_meta(v) for v in value)
    return value.to("meta") if isinstance(value, torch.Tensor) else value


def propagate_shapes(gm: fx.GraphModule, x: torch.Tensor, known: Mapping[str, Any] | None = None) -> None:
    """Record every node's output shape (``node.meta["tensor_meta"]``) for the example input ``x`` (and the
    examples of further inputs in ``known``, by name).

    On the meta device first (a ViT-B forward at 224² costs a third of a second of real compute on a small
    CPU, the meta run only the interpreter's bookkeeping); an op without a meta kernel makes it run for real.
    """
    meta = _meta_slots(gm)
    inputs = example_inputs(gm, x, known)
    with torch.no_grad():
        try:
            torch.func.functional_call(_Propagation(gm), {f"gm.{k}": v for k, v in meta.items()},
                                       tuple(_to_meta(t) for t in inputs), tie_weights=False)
        except Exception:  # any failure on meta: the real run is the reference
            ShapeProp(gm).propagate(*inputs)


def _meta_slots(gm: fx.GraphModule) -> dict[str, torch.Tensor]:
    """A meta tensor for every parameter/buffer slot, each (module, attribute) once under one of its paths.

    Every tensor is swapped (a tied tensor left real would mix devices), but a module reached by several paths
    (FacT's factors, shared by every bypass) only once: swapped twice, its second "original" would be the meta
    tensor, and that is what would be put back."""
    slots: dict[tuple[int, str], str] = {}
    values: dict[str, torch.Tensor] = {}
    metas: dict[int, torch.Tensor] = {}
    for path, module in gm.named_modules(remove_duplicate=False):
        for attr, tensor in (*module._parameters.items(), *module._buffers.items()):
            if tensor is None or (id(module), attr) in slots:
                continue
            name = f"{path}.{attr}" if path else attr
            slots[id(module), attr] = name
            values[name] = metas.setdefault(id(tensor), tensor.to("meta"))
    return values


def format_shape(shape: Shape) -> str:
    """``(1, 64, 56, 56)`` → ``1×64×56×56``; tuple outputs as ``(1×3×197×64, …)``; no tensor → ``-``."""
    if shape is None:
        return "-"
    if isinstance(shape, list):
        return "(" + ", ".join(format_shape(s) for s in shape) + ")"
    return "×".join(str(d) for d in shape) if shape else "scalar"
