"""A decoder stack, traced layer by layer: how peftc rewrites language models that do not trace whole.

An HF transformers 5 model cannot be fx-traced end to end (``**kwargs``, decorators, ModelOutput, mask and cache
control flow), but each of its repeated decoder layers can, once what does not trace inside it (attention, which
iterates tensor shapes) is kept whole. So the model's own forward stays the eager glue, and peftc rewrites its
*stack*: one graph chaining the traced layers — hidden state in, hidden state out, plus the side inputs the glue
gives every layer (mask, rotary angles, positions) — rooted at the model, so rules, roles, ``blocks:`` positions
and shared blocks see every layer at once with the model's own module paths, as on a ViT. :func:`cut` splits the
rewritten stack back into one GraphModule per layer (what runs in place of the layers) and a *prelude* of what
no layer computes (a stream's encoder, run once per forward).

This is the structural path for one shape of model (a plain stack of same-class layers, each fed the previous
one's output); per-region tracing of any model (issue 17) generalises it.
"""

from __future__ import annotations

import inspect
import itertools
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import fx, nn

from peftc.analysis.index import block_positions
from peftc.analysis.roles import is_scale_norm
from peftc.analysis.trace import assign_names, trace
from peftc.errors import PeftcError, TraceError

__all__ = ["Call", "Cut", "Stack", "cut", "decoder_layers", "record_calls", "trace_stack"]

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


def record_calls(model: nn.Module, paths: list[str], run: Callable[[], Any]) -> list[Call]:
    """Run ``run()`` (one example forward of ``model``) and record each layer's call.

    A model on the meta device (a 7B-shaped one, built without weights) runs under fake tensors, which the glue's
    data-dependent checks (padding detection, mask shortcuts) recognise as tracing and skip; what is recorded
    comes back as meta tensors."""
    if any(p.is_meta for p in model.parameters()):
        from torch._subclasses.fake_tensor import FakeTensorMode

        with FakeTensorMode(allow_non_fake_inputs=True):
            fake = _record(model, paths, run)
        memo: dict[int, Any] = {}
        return [Call(_to_meta(c.args, memo), _to_meta(c.kwargs, memo), _to_meta(c.output, memo)) for c in fake]
    return _record(model, paths, run)


def _record(model: nn.Module, paths: list[str], run: Callable[[], Any]) -> list[Call]:
    calls: dict[str, Call] = {}
    handles = []
    for path in paths:
        def hook(_m: nn.Module, args: tuple, kwargs: dict, output: Any, path: str = path) -> None:
            calls.setdefault(path, Call(args, dict(kwargs), output))
        handles.append(model.get_submodule(path).register_forward_hook(hook, with_kwargs=True))
    try:
        with torch.no_grad():
            run()
    except Exception as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise PeftcError(f"{type(model).__name__} cannot run an example forward of token ids "
                         f"({type(exc).__name__}: {first}); a pair's language model is called as "
                         "lm(input_ids=..., attention_mask=..., labels=..., use_cache=False)") from None
    finally:
        for h in handles:
            h.remove()
    missing = [p for p in paths if p not in calls]
    if missing:
        raise PeftcError(f"the example forward of {type(model).__name__} never called {missing[0]!r}")
    return [calls[p] for p in paths]


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

    The layers must form a plain stack: each reads the previous one's output and the same side inputs."""
    first = calls[0]
    if len(first.args) != 1 or not isinstance(first.args[0], torch.Tensor):
        raise PeftcError(f"{paths[0]!r} is called with {len(first.args)} positional inputs; a decoder layer takes "
                         "the hidden state first and the rest by keyword")
    for i, (prev, call) in enumerate(itertools.pairwise(calls), 1):
        if not call.args or call.args[0] is not prev.output:
            raise PeftcError(f"{paths[i]!r} does not read {paths[i - 1]!r}'s output: the layers are not a plain "
                             "stack, so they cannot be rewritten as one")
        changed = [k for k in first.kwargs if call.kwargs.get(k) is not first.kwargs[k]
                   and not isinstance(first.kwargs[k], (bool, int, str))]
        if changed or call.kwargs.keys() != first.kwargs.keys():
            raise PeftcError(f"{paths[i]!r} gets other side inputs ({', '.join(changed) or 'other keywords'}) "
                             f"than {paths[0]!r}; layers with per-layer inputs are not supported yet")
    if not isinstance(first.output, torch.Tensor):
        raise PeftcError(f"{paths[0]!r} returns {type(first.output).__name__}, not the hidden state tensor")
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
    hidden: torch.Tensor  # the recorded hidden state entering the first layer


def trace_stack(model: nn.Module, paths: list[str], calls: list[Call]) -> Stack:
    """One graph of every layer in ``paths``, chained, rooted at ``model``."""
    side, constants = _side_inputs(calls, paths)
    graph = fx.Graph()
    hidden = graph.placeholder(HIDDEN)
    inputs = {k: graph.placeholder(k) for k in side}
    leaves = _leaves(model.get_submodule(paths[0]))  # the layers are one class
    for i, path in enumerate(paths):
        region = trace(_Layer(model.get_submodule(path), side, constants), leaves=leaves)
        hidden = _inline(graph, region, path, i, hidden, inputs)
    graph.output(hidden)
    gm = fx.GraphModule(model, graph, type(model).__name__)
    assign_names(gm)
    return Stack(gm, paths, side, {k: calls[0].kwargs[k] for k in side}, calls[0].args[0])


def _inline(graph: fx.Graph, region: fx.GraphModule, path: str, index: int, hidden: fx.Node,
            inputs: dict[str, fx.Node]) -> fx.Node:
    """Copy ``region``'s nodes into ``graph`` under the layer's ``path``; returns the layer's output node."""
    env: dict[fx.Node, fx.Node] = {}
    mapping: fx.Node | None = None
    out = hidden
    for node in region.graph.nodes:
        if node.op == "placeholder":
            if node.target == HIDDEN:
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


# -- cutting the rewritten stack back into layers ---------------------------------------------------------------


@dataclass
class Cut:
    """The rewritten stack as what runs: the prelude (stream encoders) and one GraphModule per layer."""

    prelude: fx.GraphModule | None  # stream inputs by name -> dict of the values layers read
    layers: list[fx.GraphModule]  # hidden_states, side inputs by keyword (and anything else, ignored) -> hidden
    reads: list[str]  # names of the prelude values (what a layer's StreamValue modules look up)


def _regions(graph: fx.Graph, streams: set[str]) -> dict[fx.Node, int]:
    """Each node's layer (``-1``: the prelude, which depends on stream inputs only)."""
    region: dict[fx.Node, int] = {}
    for node in graph.nodes:
        if node.op == "placeholder":
            region[node] = -1 if node.target in streams else 0
        elif node.op != "output":
            found = node.meta.get("peftc_region")
            ups = [region[a] for a in node.all_input_nodes]
            region[node] = found if found is not None else max(ups, default=-1)
    return region


def cut(gm: fx.GraphModule, stack: Stack, streams: set[str], reader: Callable[[str], nn.Module]) -> Cut:
    """Split the rewritten stack: layer ``i``'s nodes become a GraphModule of its own, rooted at that layer (its
    parameters keep their paths), values of the prelude reach it through ``reader(name)`` modules."""
    region = _regions(gm.graph, streams)
    nodes = [n for n in gm.graph.nodes if n.op not in ("placeholder", "output")]
    prelude_nodes = [n for n in nodes if region[n] == -1]
    reads: list[str] = []
    layers = []
    output = next(n for n in gm.graph.nodes if n.op == "output").args[0]
    hidden: fx.Node = next(n for n in gm.graph.nodes if n.op == "placeholder" and n.target == HIDDEN)
    for i, path in enumerate(stack.paths):
        own = [n for n in nodes if region[n] == i]
        graph = fx.Graph()
        env: dict[fx.Node, fx.Node] = {hidden: graph.placeholder(HIDDEN)}
        for k in stack.side:
            env[_placeholder(gm, k)] = graph.placeholder(k, default_value=None)
        graph.placeholder("**kwargs")  # what else the glue passes a layer (use_cache …): fixed when traced
        modules: dict[str, Any] = {}
        for n in own:
            for a in n.all_input_nodes:
                if a in env:
                    continue
                if region[a] != -1:
                    raise PeftcError(f"{n.meta.get('peftc_name', n.name)!r} in {path!r} reads "
                                     f"{a.meta.get('peftc_name', a.name)!r} of another layer; rules that connect "
                                     "layers cannot be cut back into them")
                name = a.meta.get("peftc_name", a.name).replace(".", "_")
                if name not in reads:
                    reads.append(name)
                modules[f"stream_{name}"] = reader(name)
                env[a] = graph.call_module(f"stream_{name}")
            copy = graph.node_copy(n, env.__getitem__)
            if copy.op in ("call_module", "get_attr"):
                target = str(n.target)
                local = target.removeprefix(f"{path}.") if target.startswith(f"{path}.") else target
                copy.target = local
                modules[local] = _resolve(gm, target)
            env[n] = copy
        leaving = [n for n in own if any(region.get(u, i + 1) > i for u in n.users)]
        if len(leaving) != 1:
            raise PeftcError(f"{path!r} passes {len(leaving)} values to the next layer after the rewrite; a cut "
                             "layer must hand on exactly its hidden state")
        graph.output(env[leaving[0]])
        layer_gm = fx.GraphModule(modules, graph, type(gm.get_submodule(path)).__name__)
        layers.append(layer_gm)
        hidden = leaving[0]
    if hidden is not output:
        raise PeftcError("the rewritten stack's output is not its last layer's hidden state")
    prelude = _prelude(gm, prelude_nodes, streams, reads) if reads else None
    return Cut(prelude, layers, reads)


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
