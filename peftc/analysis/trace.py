"""Tracing: a backbone → a torch.fx GraphModule whose nodes are the layers users think in.

The leaf policy keeps every standard layer — convolutions, linears, all normalisation layers, attention,
embeddings — *and their subclasses* as ``call_module`` nodes, so timm's ``LayerNorm`` subclass is a node rather
than an inlined ``F.layer_norm``, and selectors by type see it. timm's own not-traceable modules and functions
are honoured too. A Linear whose own weight the code reads with ``F.linear`` (BEiT's and EVA's fused qkv, with a
bias assembled outside it) becomes a call of that layer plus the bias, so it is a node too. Each node gets a
stable qualified name in ``node.meta["peftc_name"]``: the module path for layers (``layer1.0.conv2``), the
enclosing module's path plus the function name for operations (``layer1.0.add``), the attribute path for
parameters read directly (``cls_token``).
"""

from __future__ import annotations

import inspect
import sys
from collections import defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import fx, nn

from peftc.analysis import trace_cache
from peftc.analysis.shaped import BATCHES, ShapedTracing
from peftc.errors import PeftcError, TraceError

try:  # a GraphModule that writes its Python code when first run, not on every recompile (torch's own, for dynamo)
    from torch.fx._lazy_graph_module import _LazyGraphModule
except ImportError:  # pragma: no cover - older or newer torch without it: code is written at once
    _LazyGraphModule = fx.GraphModule

__all__ = ["LEAF_TYPES", "TraceInfo", "node_name", "primary_output", "register_leaf", "trace", "trace_info",
           "write_code"]

LEAF_TYPES: list[type[nn.Module]] = [
    nn.modules.conv._ConvNd,
    nn.Linear,
    nn.Bilinear,
    nn.modules.batchnorm._NormBase,  # BatchNorm*, InstanceNorm*, SyncBatchNorm
    nn.LayerNorm,
    nn.GroupNorm,
    nn.LocalResponseNorm,
    nn.MultiheadAttention,
    nn.Embedding,
]
if hasattr(nn, "RMSNorm"):
    LEAF_TYPES.append(nn.RMSNorm)


def register_leaf(cls: type[nn.Module]) -> type[nn.Module]:
    """Keep ``cls`` (and subclasses) as a single node when tracing; usable as a class decorator."""
    if cls not in LEAF_TYPES:
        LEAF_TYPES.append(cls)
    return cls


def _timm_notrace(module: nn.Module) -> tuple[tuple[type, ...], tuple[Any, ...]]:
    """timm's registered not-traceable modules/functions, when ``module`` runs timm code. Only then: fx wraps
    every autowrap function anew on each trace (~90 of timm's, a millisecond each), so a torchvision model traced
    in a process that also imported timm would pay several times its bare trace for nothing."""
    if "timm" not in sys.modules or not any(type(m).__module__.startswith("timm.") for m in module.modules()):
        return (), ()
    try:
        from timm.layers import _fx as timm_fx
    except ImportError:  # timm is a dependency, but tracing plain torch models must not need it
        return (), ()
    return tuple(timm_fx.get_notrace_modules()), tuple(timm_fx.get_notrace_functions())


class _Tracer(fx.Tracer):
    def __init__(self, leaves: tuple[type, ...], autowrap: tuple[Any, ...]):
        super().__init__(autowrap_functions=autowrap)
        self._leaves = leaves
        self.scope_stack: list[str] = []
        self.failed_in: str | None = None  # the innermost module whose code raised, once a trace failed

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        if isinstance(m, self._leaves) or getattr(type(m), "_peftc_leaf", False):
            return True
        return super().is_leaf_module(m, module_qualified_name)

    def call_module(self, m: nn.Module, forward: Any, args: Any, kwargs: Any) -> Any:
        path = self.path_of_module(m)
        self.scope_stack.append(path)
        try:
            return super().call_module(m, forward, args, kwargs)
        except Exception:
            if self.failed_in is None:
                self.failed_in = path
            raise
        finally:
            self.scope_stack.pop()


class _ShapedTracer(ShapedTracing, _Tracer):
    """The leaf policy, with proxies that know their example values."""


def _concrete_args(module: nn.Module) -> dict[str, Any]:
    """Optional forward arguments (timm's ``attn_mask``/``is_causal``) are fixed to their defaults."""
    try:
        params = list(inspect.signature(module.forward).parameters.values())
    except (TypeError, ValueError):
        return {}
    return {
        p.name: p.default
        for p in params[1:]
        if p.default is not inspect.Parameter.empty and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
    }


def _drop_concrete_placeholders(graph: fx.Graph, names: Iterable[str]) -> None:
    """fx keeps a placeholder plus guard asserts for each concrete arg; nothing else reads them, so drop them."""
    for node in [n for n in graph.nodes if n.op == "placeholder" and n.target in names]:
        doomed: list[fx.Node] = []
        frontier = [node]
        while frontier:
            current = frontier.pop()
            doomed.append(current)
            frontier.extend(u for u in current.users if u not in doomed)
        if any(n.op == "output" for n in doomed):
            continue  # the argument is genuinely used: keep it
        for n in sorted(doomed, key=_order(graph), reverse=True):
            graph.erase_node(n)


def _order(graph: fx.Graph) -> Any:
    index = {n: i for i, n in enumerate(graph.nodes)}
    return index.__getitem__


def _scope_of(node: fx.Node) -> str:
    stack = node.meta.get("nn_module_stack")
    if not stack:
        return ""
    path = next(reversed(stack.values()))[0]
    return path if isinstance(path, str) else ""


def _op_name(node: fx.Node) -> str:
    target = node.target
    if node.op == "call_method":
        return str(target)
    return getattr(target, "__name__", None) or str(target).split(".")[-1]


def assign_names(gm: fx.GraphModule) -> None:
    """Give every node a stable qualified name (``node.meta['peftc_name']``), unique within the graph."""
    counts: dict[str, int] = defaultdict(int)
    for node in gm.graph.nodes:
        if "peftc_name" in node.meta:
            counts[node.meta["peftc_name"]] += 1
            continue
        if node.op in ("call_module", "get_attr"):
            # a module called twice (a ResNet block's relu) gets "#2", "#3" on its later calls
            base = str(node.target)
            name = base if counts[base] == 0 else f"{base}#{counts[base] + 1}"
            counts[base] += 1
        elif node.op in ("placeholder", "output"):
            name = node.name
        else:
            scope = _scope_of(node)
            base = f"{scope}.{_op_name(node)}" if scope else _op_name(node)
            name = base if counts[base] == 0 else f"{base}_{counts[base]}"
            counts[base] += 1
        node.meta["peftc_name"] = name


def node_name(node: fx.Node) -> str:
    """The qualified name of a node (see :func:`assign_names`)."""
    return node.meta.get("peftc_name") or str(node.target if node.op in ("call_module", "get_attr") else node.name)


@dataclass(frozen=True)
class TraceInfo:
    """How a model was traced, for the report and the diff: ``plain`` fx, or the shape-aware tracer (why plain
    fx could not trace the whole model), and the modules kept eager as single nodes (why each did not trace)."""

    tracer: str = "plain"
    why_not_plain: str = ""
    eager: Mapping[str, str] = field(default_factory=dict)
    input_size: tuple[int, ...] | None = None  # the (C, H, W) the shape-aware graph is specialised to
    regions: tuple[str, ...] = ()  # tracer "regions": the submodules traced, in call order (the rest runs eager)

    def describe(self) -> list[str]:
        """One line per fact, for the report and the diff ([] for a plain trace of the whole model)."""
        if self.tracer == "plain":
            return []
        if self.tracer == "regions":
            return [f"traced per region, because the whole model does not trace: {self.why_not_plain}",
                    f"regions (rules apply inside): {', '.join(self.regions)}",
                    *(f"eager glue (no rule reaches inside): {path}: {why}" for path, why in self.eager.items())]
        size = "x".join(map(str, self.input_size or ()))
        lines = [f"traced shape-aware for {size} inputs, because plain fx could not: {self.why_not_plain}"]
        lines += [f"kept eager (one node, no rule reaches inside): {path}: {why}" for path, why in self.eager.items()]
        return lines

    def to_dict(self) -> dict[str, Any]:
        return {"tracer": self.tracer, "why_not_plain": self.why_not_plain, "eager": dict(self.eager),
                "input_size": list(self.input_size) if self.input_size else None, "regions": list(self.regions)}


def trace_info(gm: nn.Module) -> TraceInfo:
    """How ``gm`` was traced (plain fx when it does not say)."""
    return getattr(gm, "meta", {}).get("peftc_trace", TraceInfo())


def trace(module: nn.Module, *, leaves: Iterable[type] = (),
          input_size: tuple[int, int, int] | None = None) -> fx.GraphModule:
    """Symbolically trace ``module`` with peftc's leaf policy; a clear TraceError names what cannot be traced.

    Plain fx first. When it fails and the model's ``input_size`` is known, the shape-aware tracer
    (:mod:`peftc.analysis.shaped`) tries again for an example of that size, keeping each module that still does
    not trace eager, as one node — rules apply everywhere else. How it went is ``trace_info(gm)``.

    The GraphModule writes its code lazily (on its first call, or ``.code``): the passes change the graph
    anyway, so the code is generated once, by :meth:`~peftc.passes.CompileState.finish`, not twice. A module of
    an architecture traced (plainly) before in this process gets a copy of that graph (:mod:`.trace_cache`).
    """
    timm_leaves, timm_functions = _timm_notrace(module)
    all_leaves = (*LEAF_TYPES, *leaves, *timm_leaves)
    key = trace_cache.architecture_key(module, all_leaves, timm_functions)
    kept = trace_cache.lookup(key)
    if kept is not None:
        return _graph_module(module, kept, TraceInfo(), key)
    tracer = _Tracer(all_leaves, timm_functions)
    concrete = _concrete_args(module)
    try:
        graph = tracer.trace(module, concrete_args=concrete or None)
    except Exception as exc:
        failure = _failure(module, tracer.failed_in, exc)
        if input_size is None:
            raise TraceError(failure + _hint(module, tracer.failed_in)) from None
        return _trace_shaped(module, all_leaves, timm_functions, input_size, failure)
    _drop_concrete_placeholders(graph, concrete)
    gm = _finish(tracer.root, graph, module, TraceInfo(), key)
    trace_cache.store(key, gm.graph)
    return gm


def write_code(gm: fx.GraphModule, *, changed: bool) -> fx.GraphModule:
    """Generate ``gm``'s Python code if it has none yet (a traced module) or its graph ``changed``; a traced
    module becomes a plain GraphModule here (torch.export and copies then see its real ``forward``)."""
    if isinstance(gm, _LazyGraphModule) and _LazyGraphModule is not fx.GraphModule:
        # the per-instance class GraphModule.__new__ makes, named as torch names it (copies look for that name)
        plain = type("GraphModuleImpl", (fx.GraphModule,), {"__module__": fx.GraphModule.__module__})
        plain.__name__ = type(gm).__name__
        gm.__class__ = plain
        changed = True
    if changed:
        gm.recompile()
    return gm


ARCHITECTURE = "peftc_architecture"  # gm.meta key: the trace cache's key, for the shapes kept with the graph


def _finish(root: nn.Module, graph: fx.Graph, module: nn.Module, info: TraceInfo, key: Any = None) -> fx.GraphModule:
    _call_linears(graph, root)
    gm = _graph_module(root, graph, info, key, name=type(module).__name__)
    if info.tracer != "plain" and gm.graph.eliminate_dead_code():  # what only the dropped outputs read
        gm.recompile()
    return gm


def _graph_module(root: nn.Module, graph: fx.Graph, info: TraceInfo, key: Any, *, name: str | None = None
                  ) -> fx.GraphModule:
    gm = _LazyGraphModule(root, graph, name or type(root).__name__)
    gm.meta["peftc_trace"] = info
    assign_names(gm)
    gm.meta[ARCHITECTURE] = key
    return gm


def _trace_shaped(module: nn.Module, leaves: tuple[type, ...], autowrap: tuple[Any, ...],
                  input_size: tuple[int, int, int], why_not_plain: str) -> fx.GraphModule:
    """The shape-aware trace, keeping eager (one node each) the modules whose code still does not trace."""
    examples = tuple(example_input(input_size, batch) for batch in BATCHES)
    eager: dict[str, str] = {}
    while True:
        tracer = _ShapedTracer(leaves, autowrap, examples=examples, eager=frozenset(eager))
        try:
            graph = tracer.trace(module)
            break
        except Exception as exc:
            failure = _failure(module, tracer.failed_in, exc)
            if not tracer.failed_in or tracer.failed_in in eager:
                raise TraceError(f"{failure} (with the shape-aware tracer; plain fx: {why_not_plain})"
                                 + _hint(module, tracer.failed_in)) from None
            failed = type(module.get_submodule(tracer.failed_in))
            for path, other in module.named_modules():  # the same code fails the same way: one retry, not one each
                if type(other) is failed:
                    same = f"same code as {tracer.failed_in!r}"
                    eager.setdefault(path, failure if path == tracer.failed_in else same)
    _single_output(graph, {node: values[0] for node, values in tracer.values.items()})
    info = TraceInfo("shape-aware", why_not_plain, eager, tuple(input_size))
    return _finish(tracer.root, graph, module, info)


def primary_output(result: Any, value: Any = lambda v: v) -> Any:
    """The one output peftc compiles for: the first per-image result of shape ``(batch, features)`` (logits,
    pooled features) among the tensors of a mapping (HF's ``ModelOutput``) or tuple, else its first tensor.
    ``value`` maps an entry to the tensor it stands for (a graph node to its example value)."""
    entries = [e for e in torch.utils._pytree.tree_leaves(result) if isinstance(value(e), torch.Tensor)]
    return next((e for e in entries if value(e).dim() == 2), entries[0] if entries else result)


def _single_output(graph: fx.Graph, values: Mapping[fx.Node, Any]) -> None:
    """A model returning several tensors returns one: its :func:`primary_output`."""
    output = next(n for n in graph.nodes if n.op == "output")
    if not isinstance(output.args[0], fx.Node):
        output.args = (primary_output(output.args[0], lambda n: values.get(n) if isinstance(n, fx.Node) else None),)


def _failure(root: nn.Module, path: str | None, exc: BaseException) -> str:
    """``'encoder.layer.0' (ViTLayer) at modeling_vit.py:123 `code`: message`` — where tracing failed and why."""
    module = root.get_submodule(path) if path else root
    where = f"{path!r} ({type(module).__qualname__})" if path else type(root).__qualname__
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    line = _source_line(exc)
    return f"torch.fx cannot trace {where}{f' at {line}' if line else ''}: {first}"


def _hint(root: nn.Module, path: str | None) -> str:
    if not path:
        return ""
    name = type(root.get_submodule(path)).__name__
    return f"; keep that module whole with peftc.analysis.trace.register_leaf({name})"


def _source_line(exc: BaseException) -> str:
    """The model's own line that failed: the innermost traceback frame outside torch and peftc's tracers."""
    import traceback

    torch_dir = str(Path(torch.__file__).parent)
    here = str(Path(__file__).parent)
    frames = [f for f in traceback.extract_tb(exc.__traceback__)
              if not f.filename.startswith((torch_dir, here)) and not f.filename.startswith("<")]
    if not frames:
        return ""
    frame = frames[-1]
    path = Path(frame.filename)
    shown = "/".join(path.parts[-3:]) if "site-packages" in path.parts else str(path)
    return f"{shown}:{frame.lineno}" + (f" `{frame.line.strip()}`" if frame.line else "")


def _call_linears(graph: fx.Graph, root: nn.Module) -> int:
    """``F.linear(x, lin.weight, b)`` on a Linear's own weight becomes ``lin(x) + b``: the layer is a node.

    BEiT and EVA compute their fused qkv this way (its bias is ``cat(q_bias, 0, v_bias)``, outside the Linear),
    which would hide the projection from roles and rules; as a module call it is ``role: qkv`` like any ViT's.
    Returns how many calls were rewritten.
    """
    count = 0
    for node in list(graph.nodes):
        if node.op != "call_function" or node.target not in (torch._C._nn.linear, torch.nn.functional.linear):
            continue
        args = dict(zip(("input", "weight", "bias"), node.args)) | dict(node.kwargs)
        weight, bias = args.get("weight"), args.get("bias")
        if not (isinstance(weight, fx.Node) and weight.op == "get_attr" and str(weight.target).endswith(".weight")):
            continue
        path = str(weight.target)[: -len(".weight")]
        layer = _submodule(root, path)
        own_bias = isinstance(bias, fx.Node) and bias.op == "get_attr" and str(bias.target) == f"{path}.bias"
        if not isinstance(layer, nn.Linear) or (layer.bias is not None and not own_bias):
            continue  # the layer's call would add a bias this F.linear does not
        with graph.inserting_before(node):
            out = graph.call_module(path, (args["input"],))
            if bias is not None and not own_bias:
                out = graph.call_function(torch.add, (out, bias))
        out.meta.update(node.meta)
        node.replace_all_uses_with(out)
        graph.erase_node(node)
        for read in (weight, bias if own_bias else None):
            if isinstance(read, fx.Node) and not read.users:
                graph.erase_node(read)
        count += 1
    return count


def _submodule(root: nn.Module, path: str) -> nn.Module | None:
    try:
        return root.get_submodule(path)
    except AttributeError:
        return None


def example_input(input_size: tuple[int, int, int], batch: int = 1, *, device: Any = "cpu") -> torch.Tensor:
    """A deterministic example batch for shape propagation."""
    gen = torch.Generator().manual_seed(0)
    return torch.randn(batch, *input_size, generator=gen).to(device)


def image_input_size(
    input_size: tuple[int, int, int], image_size: int | tuple[int, int] | None
) -> tuple[int, int, int]:
    """``(C, H, W)``: a backbone's ``input_size`` with ``image_size`` (one side, or ``(H, W)``) overriding ``H, W``."""
    channels, height, width = input_size
    if image_size is not None:
        height, width = (image_size, image_size) if isinstance(image_size, int) else image_size
        if height < 1 or width < 1:
            raise PeftcError(f"image size must be positive, got {height}x{width}")
    return int(channels), int(height), int(width)
