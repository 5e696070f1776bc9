"""A decoder stack, traced layer by layer: how peftc rewrites language models that do not trace whole.

An HF transformers 5 model cannot be fx-traced end to end (``**kwargs``, decorators, ModelOutput, mask and cache
control flow), but each of its repeated decoder layers can, once what does not trace inside it (attention, which
iterates tensor shapes) is kept whole. So the model's own forward stays the eager glue, and peftc rewrites its
*stack*: one graph chaining the traced layers — hidden state in, hidden state out, plus the side inputs the glue
gives every layer (mask, rotary angles, positions) — rooted at the model, so rules, roles, ``blocks:`` positions
and shared blocks see every layer at once with the model's own module paths, as on a ViT. :func:`cut` splits the
rewritten stack back into one GraphModule per layer (what runs in place of the layers) and a *prelude* of what
no layer computes (a stream's encoder, run once per forward).

The same machinery serves any backbone whose forward does not trace whole (:mod:`peftc.analysis.regions`): its
regions are chained the same way, except that a region fed by the glue rather than by the previous region gets
an input of its own.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import fx, nn

from peftc.analysis.index import block_positions
from peftc.analysis.roles import is_scale_norm
from peftc.analysis.trace import assign_names, trace
from peftc.errors import PeftcError, TraceError

__all__ = ["Call", "Cut", "Stack", "cut", "decoder_layers", "first_calls", "install", "own_forward", "record_calls",
           "trace_layer", "trace_stack"]

HIDDEN = "hidden_states"


@dataclass(frozen=True)
class Call:
    """How the eager glue called one layer: its positional and keyword arguments, and what it returned."""

    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    output: Any


def decoder_layers(model: nn.Module) -> list[str]:
    """Paths of the model's longest run of same-class layers in one container (``model.layers.0`` …)."""
    runs: dict[str, list[str]] = {}
    for path, (container, _, _) in block_positions(model).items():
        runs.setdefault(f"{container}:{type(model.get_submodule(path)).__name__}", []).append(path)
    if not runs:
        raise PeftcError(f"{type(model).__name__} has no run of repeated layers (a ModuleList of decoder layers): "
                         "nothing to rewrite layer by layer")
    return max(runs.values(), key=len)


def record_calls(model: nn.Module, paths: list[str], run: Callable[[], Any], hint: str = "") -> dict[str, list[Call]]:
    """Run ``run()`` (one example forward of ``model``) and record each call of the modules at ``paths`` (``""``:
    the model itself), in the order the calls returned; ``hint`` says how the model is called, for the error.

    A model on the meta device (a 7B-shaped one, built without weights) runs under fake tensors, which the glue's
    data-dependent checks (padding detection, mask shortcuts) recognise as tracing and skip; what is recorded
    comes back as meta tensors."""
    if any(p.is_meta for p in model.parameters()):
        from torch._subclasses.fake_tensor import FakeTensorMode

        with FakeTensorMode(allow_non_fake_inputs=True):
            fake = _record(model, paths, run, hint)
        memo: dict[int, Any] = {}
        return {p: [Call(_to_meta(c.args, memo), _to_meta(c.kwargs, memo), _to_meta(c.output, memo)) for c in cs]
                for p, cs in fake.items()}
    return _record(model, paths, run, hint)


def _record(model: nn.Module, paths: list[str], run: Callable[[], Any], hint: str) -> dict[str, list[Call]]:
    calls: dict[str, list[Call]] = {}
    handles = []
    for path in paths:
        def hook(_m: nn.Module, args: tuple, kwargs: dict, output: Any, path: str = path) -> None:
            calls.setdefault(path, []).append(Call(args, dict(kwargs), output))
        handles.append(model.get_submodule(path).register_forward_hook(hook, with_kwargs=True))
    try:
        with torch.no_grad():
            run()
    except Exception as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise PeftcError(f"{type(model).__name__} cannot run an example forward ({type(exc).__name__}: {first})"
                         + (f"; {hint}" if hint else "")) from None
    finally:
        for h in handles:
            h.remove()
    return calls


def first_calls(model: nn.Module, paths: list[str], calls: Mapping[str, list[Call]]) -> list[Call]:
    """The first recorded call of each layer in ``paths``; every one must have been called."""
    missing = [p for p in paths if p not in calls]
    if missing:
        raise PeftcError(f"the example forward of {type(model).__name__} never called {missing[0]!r}")
    return [calls[p][0] for p in paths]


def _to_meta(value: Any, memo: dict[int, Any]) -> Any:
    """Fake tensors as meta tensors of the same shape and dtype, one per fake tensor (identity kept)."""
    if isinstance(value, torch.Tensor):
        if id(value) not in memo:
            memo[id(value)] = torch.empty(value.shape, dtype=value.dtype, device="meta")
        return memo[id(value)]
    if isinstance(value, (tuple, list)) and id(value) not in memo:
        memo[id(value)] = type(value)(_to_meta(v, memo) for v in value)
    if isinstance(value, dict):
        return {k: _to_meta(v, memo) for k, v in value.items()}
    return memo.get(id(value), value) if isinstance(value, (tuple, list)) else value


def _side_inputs(calls: list[Call], paths: list[str]) -> tuple[list[str], dict[str, Any]]:
    """(names of the per-call inputs, constants) the glue passes each layer besides the hidden state.

    Each layer takes one hidden state (the previous layer's output, or a value of the glue's) and the same side
    inputs by keyword, and returns one tensor."""
    first = calls[0]
    for path, call in zip(paths, calls):
        if len(call.args) != 1 or not isinstance(call.args[0], torch.Tensor):
            raise PeftcError(f"{path!r} is called with {len(call.args)} positional inputs; a layer takes the hidden "
                             "state first and the rest by keyword")
        if not isinstance(call.output, torch.Tensor):
            raise PeftcError(f"{path!r} returns {type(call.output).__name__}, not the hidden state tensor")
    for i, call in enumerate(calls[1:], 1):
        changed = [k for k in first.kwargs if call.kwargs.get(k) is not first.kwargs[k]
                   and not isinstance(first.kwargs[k], (bool, int, str))]
        if changed or call.kwargs.keys() != first.kwargs.keys():
            raise PeftcError(f"{paths[i]!r} gets other side inputs ({', '.join(changed) or 'other keywords'}) "
                             f"than {paths[0]!r}; layers with per-layer inputs are not supported yet")
    side = [k for k, v in first.kwargs.items() if v is None or not isinstance(v, (bool, int, float, str))]
    constants = {k: v for k, v in first.kwargs.items() if k not in side}
    return side, constants


class _Layer(nn.Module):
    """A decoder layer seen through its undecorated ``forward`` with the side inputs as one mapping: what fx
    traces (the layer's decorators hide its signature, and its defaults would be fixed as constants)."""

    def __init__(self, layer: nn.Module, side: list[str], constants: dict[str, Any]):
        super().__init__()
        self.__dict__.update({k: v for k, v in vars(layer).items() if k != "training"})
        self._forward = inspect.unwrap(type(layer).forward)
        self._side, self._constants = side, constants
        self.training = layer.training

    def forward(self, hidden_states: torch.Tensor, inputs: Mapping[str, Any]) -> Any:
        return self._forward(self, hidden_states, **{k: inputs[k] for k in self._side}, **self._constants)


def _leaves(layer: nn.Module) -> list[type[nn.Module]]:
    """What stays whole inside a layer: RMS-style norms (so roles see a norm) and children that do not trace."""
    leaves = {type(m) for m in layer.modules() if is_scale_norm(m)}
    for child in layer.children():
        if type(child) in leaves:
            continue
        try:
            trace(child, leaves=leaves)
        except TraceError:
            leaves.add(type(child))
    return sorted(leaves, key=lambda t: t.__qualname__)


@dataclass
class Stack:
    """The traced stack and what compiling it needs."""

    gm: fx.GraphModule  # rooted at the model: module targets are the model's own paths
    paths: list[str]  # the layers, in order
    side: list[str]  # side-input placeholders, after the hidden state
    examples: dict[str, Any]  # the recorded example of each side input (shape propagation)
    hidden: torch.Tensor  # the recorded value of the first placeholder


def trace_layer(layer: nn.Module, side: list[str], constants: dict[str, Any],
                leaves: list[type[nn.Module]]) -> fx.GraphModule:
    """One layer's graph: the layer itself when the glue passes it nothing but its input, else seen through
    :class:`_Layer` (side inputs as one mapping)."""
    if not side and not constants:
        return trace(layer, leaves=leaves)
    return trace(_Layer(layer, side, constants), leaves=leaves)


def trace_stack(model: nn.Module, paths: list[str], calls: list[Call], *, source: torch.Tensor | None = None,
                traced: Mapping[str, fx.GraphModule | None] | None = None) -> Stack:
    """One graph of every layer in ``paths``, rooted at ``model``: a layer that reads an earlier layer's output
    reads its node; one fed by the glue reads an input of its own (of the recorded value's shape). The first
    placeholder stands for ``source`` (the model's own input) when given, else for the first layer's input.

    ``traced`` holds graphs already traced by path (``None``: a leaf layer, one node). The graph returns the
    outputs no later layer reads: one node, or a tuple of them in call order."""
    side, constants = _side_inputs(calls, paths)
    graph = fx.Graph()
    first = graph.placeholder(HIDDEN)
    inputs = {k: graph.placeholder(k) for k in side}
    made: dict[int, fx.Node] = {id(source if source is not None else calls[0].args[0]): first}
    produced: set[int] = set()
    for path, call in zip(paths, calls):
        x = call.args[0]
        if id(x) not in made and id(x) not in produced:
            name = f"{path.replace('.', '_')}_input"
            made[id(x)] = graph.placeholder(name)
            made[id(x)].meta["peftc_example"] = tuple(x.shape[1:])  # its examples: random, at the batch's size
        produced.add(id(call.output))
    traced = dict(traced or {})
    leaves = _leaves(model.get_submodule(paths[0])) if paths[0] not in traced else []  # the layers are one class
    outputs: list[fx.Node] = []
    for i, (path, call) in enumerate(zip(paths, calls)):
        x = made[id(call.args[0])]
        if x in outputs:
            outputs.remove(x)
        layer = model.get_submodule(path)
        region = traced[path] if path in traced else trace_layer(layer, side, constants, leaves)
        out = _inline(graph, region, path, i, x, inputs) if region is not None else _leaf(graph, path, i, x)
        made[id(call.output)] = out
        outputs.append(out)
    graph.output(outputs[0] if len(outputs) == 1 else tuple(outputs))
    gm = fx.GraphModule(model, graph, type(model).__name__)
    assign_names(gm)
    return Stack(gm, paths, side, {k: calls[0].kwargs[k] for k in side},
                 source if source is not None else calls[0].args[0])


def _leaf(graph: fx.Graph, path: str, index: int, x: fx.Node) -> fx.Node:
    """A layer that is itself a leaf (a Linear head): one call of it."""
    node = graph.call_module(path, (x,))
    node.meta["peftc_name"] = path
    node.meta["peftc_region"] = index
    return node


def _inline(graph: fx.Graph, region: fx.GraphModule, path: str, index: int, hidden: fx.Node,
            inputs: dict[str, fx.Node]) -> fx.Node:
    """Copy ``region``'s nodes into ``graph`` under the layer's ``path``; returns the layer's output node."""
    env: dict[fx.Node, fx.Node] = {}
    mapping: fx.Node | None = None
    out = hidden
    for node in region.graph.nodes:
        if node.op == "placeholder":
            if not env:
                env[node] = hidden
            else:
                mapping = node
            continue
        if node.op == "output":
            out = env[node.args[0]]
            continue
        if node.op == "call_function" and node.args and node.args[0] is mapping:
            env[node] = inputs[node.args[1]]  # inputs["attention_mask"] -> the side-input placeholder
            continue
        copy = graph.node_copy(node, env.__getitem__)
        if copy.op in ("call_module", "get_attr"):
            copy.target = f"{path}.{copy.target}"
        copy.meta["peftc_name"] = f"{path}.{node.meta['peftc_name']}"
        copy.meta["peftc_region"] = index
        env[node] = copy
    return out


def install(model: nn.Module, paths: list[str], layers: list[nn.Module]) -> None:
    """Put each cut layer in place of the module at its path: the glue now calls the rewritten layer."""
    for path, layer in zip(paths, layers):
        parent, _, name = path.rpartition(".")
        setattr(model.get_submodule(parent), name, layer)


# -- cutting the rewritten stack back into layers ---------------------------------------------------------------


@dataclass
class Cut:
    """The rewritten stack as what runs: the prelude (stream encoders) and one GraphModule per layer."""

    prelude: fx.GraphModule | None  # stream inputs by name -> dict of the values layers read
    layers: list[nn.Module]  # GraphModules: hidden_states, side inputs by keyword (anything else ignored) -> hidden
    reads: list[str]  # names of the prelude values (what a layer's StreamValue modules look up)


_INPUT = -2  # the region of the glue's inputs (the placeholders that are not streams)


def _regions(graph: fx.Graph, streams: set[str], paths: list[str]) -> dict[fx.Node, int]:
    """Each node's layer (``-1``: the prelude, which depends on stream inputs only).

    A node a rule added goes to the layer its name places it in (``layer2.0.conv1.lora`` is ``layer2``'s, even
    though it reads ``layer1``'s output), unless it reads a later layer; else to the layer of its latest input."""
    index = {path: i for i, path in enumerate(paths)}
    region: dict[fx.Node, int] = {}
    for node in graph.nodes:
        if node.op == "placeholder":
            region[node] = -1 if node.target in streams else _INPUT
        elif node.op != "output":
            found = node.meta.get("peftc_region")
            latest = max((region[a] for a in node.all_input_nodes), default=-1)
            named = _named_region(str(node.meta.get("peftc_name", "")), index)
            if found is None and latest != -1 and named is not None and named >= latest:
                found = named
            region[node] = found if found is not None else latest if latest == -1 else max(latest, 0)
    return region


def _named_region(name: str, index: Mapping[str, int]) -> int | None:
    """The layer whose path prefixes ``name`` (``layer2.0.conv1.lora`` → ``layer2``'s index)."""
    parts = name.split(".")
    for cut_at in range(len(parts), 0, -1):
        found = index.get(".".join(parts[:cut_at]))
        if found is not None:
            return found
    return None


def cut(gm: fx.GraphModule, stack: Stack, streams: set[str], reader: Callable[[str], nn.Module]) -> Cut:
    """Split the rewritten stack: layer ``i``'s nodes become a GraphModule of its own, rooted at that layer (its
    parameters keep their paths), taking the one value it reads from the glue or an earlier layer; values of the
    prelude reach it through ``reader(name)`` modules."""
    region = _regions(gm.graph, streams, stack.paths)
    nodes = [n for n in gm.graph.nodes if n.op not in ("placeholder", "output")]
    prelude_nodes = [n for n in nodes if region[n] == -1]
    reads: list[str] = []
    layers = []
    output = next(n for n in gm.graph.nodes if n.op == "output")
    for i, path in enumerate(stack.paths):
        own = [n for n in nodes if region[n] == i]
        if len(own) == 1 and own[0].op == "call_module" and own[0].target == path and len(own[0].args) == 1:
            layers.append(gm.get_submodule(path))  # a leaf layer still called alone (a head, maybe replaced)
            continue
        graph = fx.Graph()
        around = any(n.op == "call_module" and n.target == path for n in own)  # a leaf layer, and what rules added
        layer = graph.placeholder(_SELF) if around else None
        hidden = graph.placeholder(HIDDEN)
        env: dict[fx.Node, fx.Node] = {_placeholder(gm, k): graph.placeholder(k, default_value=None)
                                       for k in stack.side}
        graph.placeholder("**kwargs")  # what else the glue passes a layer (use_cache …): fixed when traced
        entry: fx.Node | None = None
        modules: dict[str, Any] = {}
        for n in own:
            for a in n.all_input_nodes:
                if a in env:
                    continue
                if region[a] == -1:
                    name = a.meta.get("peftc_name", a.name).replace(".", "_")
                    if name not in reads:
                        reads.append(name)
                    modules[f"stream_{name}"] = reader(name)
                    env[a] = graph.call_module(f"stream_{name}")
                    continue
                if entry is not None:
                    raise PeftcError(f"{n.meta.get('peftc_name', n.name)!r} in {path!r} reads "
                                     f"{a.meta.get('peftc_name', a.name)!r} besides the layer's input; rules that "
                                     "connect layers cannot be cut back into them")
                entry, env[a] = a, hidden
            if n.op == "call_module" and n.target == path:
                env[n] = graph.call_function(own_forward, (layer, *(env[a] for a in n.args)))
                continue
            copy = graph.node_copy(n, env.__getitem__)
            if copy.op in ("call_module", "get_attr"):
                target = str(n.target)
                local = target.removeprefix(f"{path}.") if target.startswith(f"{path}.") else target
                copy.target = local
                modules[local] = _resolve(gm, target)
            env[n] = copy
        leaving = [n for n in own if any(region.get(u, i + 1) > i for u in n.users)]
        if len(leaving) != 1:
            raise PeftcError(f"{path!r} passes {len(leaving)} values on after the rewrite; a cut layer must hand "
                             "on exactly its output")
        graph.output(env[leaving[0]])
        region_gm = fx.GraphModule(modules, graph, type(gm.get_submodule(path)).__name__)
        layers.append(_around(gm.get_submodule(path), region_gm) if around else region_gm)
    if any(region.get(n, -1) < 0 for n in output.all_input_nodes):
        raise PeftcError("the rewritten stack's output is not computed by its layers")
    prelude = _prelude(gm, prelude_nodes, streams, reads) if reads else None
    return Cut(prelude, layers, reads)


_SELF = "layer"  # the first input of the graph of a region that is one leaf layer and what rules added to it


def own_forward(layer: nn.Module, *args: Any) -> Any:
    """The layer's class forward: what the layer computed before its region's graph took its place."""
    return type(layer).forward(layer, *args)


def _around(layer: nn.Module, region: fx.GraphModule) -> nn.Module:
    """A leaf layer that rules added to stays in place, so its tensors keep their paths (``head.weight``); what
    the rules added are its children already, and its instance ``forward`` becomes the region's graph called
    with the layer (held outside the module tree, so nothing is registered twice; a deep copy rebinds both)."""
    layer.__dict__["forward"] = functools.partial(region, layer)
    return layer


def _placeholder(gm: fx.GraphModule, name: str) -> fx.Node:
    return next(n for n in gm.graph.nodes if n.op == "placeholder" and n.target == name)


def _resolve(gm: fx.GraphModule, target: str) -> Any:
    owner, _, attr = target.rpartition(".")
    return getattr(gm.get_submodule(owner) if owner else gm, attr)


def _prelude(gm: fx.GraphModule, nodes: list[fx.Node], streams: set[str], reads: list[str]) -> fx.GraphModule:
    """The nodes no layer computes, as a GraphModule: stream inputs by name -> ``{name: value}`` of ``reads``."""
    graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    modules: dict[str, Any] = {}
    named: dict[str, fx.Node] = {}
    for n in gm.graph.nodes:
        if n.op == "placeholder" and n.target in streams:
            env[n] = named[str(n.target)] = graph.placeholder(str(n.target))
    for n in nodes:
        copy = graph.node_copy(n, lambda a: env[a])
        if copy.op in ("call_module", "get_attr"):
            modules[str(n.target)] = _resolve(gm, str(n.target))
        env[n] = copy
        named[n.meta.get("peftc_name", n.name).replace(".", "_")] = copy
    graph.output({name: named[name] for name in reads})
    return fx.GraphModule(modules, graph, "Prelude")
