"""Region mode: a model whose forward does not trace whole is rewritten region by region.

When the whole-model trace fails (the forward branches on tensor values, say), the model's own forward stays the
eager glue and its submodules that trace become *regions*: one example forward records how the glue calls each
module, the outermost parameterised submodules called once with one batch tensor and traced whole (or leaf layers,
a Linear head) are the regions, and a submodule that does not trace is searched the same way inside. The regions
are chained into one graph rooted at the model (:func:`peftc.analysis.stack.trace_stack`), so rules, roles and
``blocks:`` positions see every region with the model's own module paths; the compiler cuts the rewritten graph
back into the regions and installs them in place (:func:`peftc.analysis.stack.cut`).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch
from torch import fx, nn

from peftc.analysis.stack import Call, Stack, record_calls, trace_layer, trace_stack
from peftc.analysis.trace import LEAF_TYPES, TraceInfo, example_input, trace
from peftc.errors import TraceError

__all__ = ["STACK", "glue_message", "stack_of", "trace_model", "trace_regions"]

STACK = "peftc_stack"  # gm.meta key of the Stack a region-mode graph was chained from
BATCH = 2


def trace_model(module: nn.Module, *, leaves: Iterable[type[nn.Module]] = (),
                input_size: tuple[int, int, int] | None = None) -> fx.GraphModule:
    """The whole model traced (:func:`peftc.analysis.trace.trace`), else its regions chained into one graph; in
    region mode ``gm.meta[STACK]`` holds the :class:`~peftc.analysis.stack.Stack` to cut the rewrite back with."""
    try:
        return trace(module, leaves=leaves, input_size=input_size)
    except TraceError as exc:
        if input_size is None:
            raise
        return trace_regions(module, input_size, str(exc), leaves=leaves)


def trace_regions(module: nn.Module, input_size: tuple[int, int, int], why: str, *,
                  leaves: Iterable[type[nn.Module]] = ()) -> fx.GraphModule:
    """The regions of ``module`` chained into one graph whose first input is the model's input; ``why`` the
    whole trace failed is kept for the report."""
    leaves = list(leaves)
    x = example_input(input_size, BATCH, device=_device(module))
    calls = record_calls(module, [p for p, _ in module.named_modules()], lambda: module(x),
                         hint=f"region mode runs it once on a batch of {'x'.join(map(str, input_size))} inputs")
    traced: dict[str, fx.GraphModule | None] = {}
    glue: dict[str, str] = {}
    _search(module, "", calls, leaves, traced, glue)
    if not traced:
        found = "; ".join(f"{p}: {w}" for p, w in glue.items()) or "it has no submodule with parameters"
        raise TraceError(f"{why}; nor does any submodule trace as a region: {found}")
    order = list(calls)  # the order the calls returned: regions do not nest, so the order they ran
    paths = sorted(traced, key=order.index)
    stack = trace_stack(module, paths, [calls[p][0] for p in paths], source=x, traced=traced)
    gm = stack.gm
    gm.meta["peftc_trace"] = TraceInfo("regions", why, {type(module).__name__: "the model's own forward", **glue},
                                       regions=tuple(paths))
    gm.meta[STACK] = stack
    return gm


def stack_of(gm: fx.GraphModule) -> Stack | None:
    """The Stack a region-mode graph was chained from (None for a whole-model trace)."""
    return getattr(gm, "meta", {}).get(STACK)


def _search(module: nn.Module, prefix: str, calls: Mapping[str, list[Call]], leaves: list[type[nn.Module]],
            traced: dict[str, fx.GraphModule | None], glue: dict[str, str]) -> None:
    """Find the regions under ``module``: each child with parameters is a region when it fits and traces, else
    searched in turn; a leaf that cannot be a region is glue (with why)."""
    for name, child in module.named_children():
        path = f"{prefix}.{name}" if prefix else name
        if next(child.parameters(), None) is None:
            continue  # nothing for a rule to tune: the glue may keep it
        leaf = isinstance(child, (*LEAF_TYPES, *leaves))
        why = _unfit(calls.get(path, []))
        if why is None and leaf:
            traced[path] = None
            continue
        if why is None:
            try:
                gm = trace_layer(child, [], {}, leaves)
            except TraceError as exc:
                glue[path] = str(exc)  # its own code is glue; its children may still be regions
            else:
                if sum(n.op == "placeholder" for n in gm.graph.nodes) == 1:
                    traced[path] = gm
                    continue
                glue[path] = "its traced forward takes more than one input"
        if leaf or next(child.children(), None) is None:
            glue.setdefault(path, why or "")
        else:
            _search(child, path, calls, leaves, traced, glue)


def _unfit(calls: list[Call]) -> str | None:
    """Why a module's recorded calls do not make it a region (None: they do): one call, one batch tensor in, one
    batch tensor out."""
    if len(calls) != 1:
        return f"called {len(calls)} times by the example forward" if calls else "not called by the example forward"
    call = calls[0]
    tensors = [*call.args, call.output]
    if len(call.args) != 1 or call.kwargs:
        return f"called with {len(call.args) + len(call.kwargs)} inputs, not one tensor"
    if not all(isinstance(t, torch.Tensor) and t.dim() and t.shape[0] == BATCH for t in tensors):
        return "its input or output is not one tensor of the batch"
    return None


def _device(module: nn.Module) -> torch.device:
    param = next(module.parameters(), None)
    return param.device if param is not None else torch.device("cpu")


def glue_message(info: TraceInfo, model: str) -> str:
    """What region mode leaves out of the rules' reach, for an error about a rule that selected nothing."""
    if info.tracer != "regions":
        return ""
    inside = [p for p in info.eager if p != model]
    return (f"; what is outside its regions ({', '.join(info.regions)}) lies in the eager glue of {model}"
            + (f" (with {', '.join(inside)})" if inside else "")
            + f", which is not traced because {info.why_not_plain}")
