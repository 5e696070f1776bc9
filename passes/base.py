"""What every pass works with: the graph being rewritten, the rule it applies, and the ledger of what changed.

A pass is a function ``run(ctx) -> None`` registered under a primitive's name. It selects nodes through
``ctx.select`` (so errors point into the spec), rewrites ``ctx.gm`` — the compiler's private copy, never the
backbone the user passed in — and writes down each change with ``ctx.record`` and ownership changes in
``ctx.ledger``. The ledger is what the report, the task bank, the artifact and the diff read; no stage after
the passes has to rediscover what a rule did.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import fx, nn

from peftc.analysis import trace_cache
from peftc.analysis.index import Candidate, NodeIndex
from peftc.analysis.paths import fresh_path
from peftc.analysis.propagation import propagate_shapes
from peftc.analysis.select import select
from peftc.analysis.trace import ARCHITECTURE, assign_names, example_input, write_code
from peftc.blocks import Site, get_block
from peftc.blocks.contract import is_shared_state, task_tensors
from peftc.errors import Location, SpecError
from peftc.language import MethodSpec, Rule, Selector

__all__ = ["CompileState", "Ledger", "ModuleSlot", "PassContext", "Rewrite", "StreamInput", "TensorSlot",
           "own_tensors"]


@dataclass(frozen=True)
class Rewrite:
    """One change a rule made to one node, for the report and the diff."""

    rule: str
    action: str
    node: str
    detail: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class TensorSlot:
    """A parameter or buffer that each task owns a copy of (``policy``: fresh from ``new`` init, or ``inherit``)."""

    name: str  # qualified, as in state_dict: layer1.0.bn1.weight
    rule: str
    policy: str
    is_param: bool


@dataclass(frozen=True)
class ModuleSlot:
    """A whole module each task owns (a classification head, whose class count can differ per task)."""

    path: str
    rule: str
    policy: str
    make: Callable[[int | None, nn.Module], nn.Module]  # (classes, template) -> new module


@dataclass(frozen=True)
class StreamInput:
    """A second model input a ``stream`` rule added: ``(batch, tokens, features)``, tokens at most ``max_tokens``.

    Calls are checked against it before the graph runs, so a missing or mis-shaped stream is one clear message.
    """

    name: str
    rule: str
    features: int
    max_tokens: int | None = None

    def describe(self) -> str:
        most = f" (at most {self.max_tokens})" if self.max_tokens is not None else ""
        return f"{self.name!r} of shape (batch, tokens{most}, {self.features})"

    def check(self, value: Any, batch: int | None) -> None:
        from peftc.errors import PeftcError

        if value is None:
            raise PeftcError(f"this model takes a second input {self.describe()} (rule {self.rule!r}); "
                             f"call it as model(x, {self.name}=...)")
        shape = tuple(getattr(value, "shape", ()))
        ok = (isinstance(value, torch.Tensor) and len(shape) == 3 and shape[2] == self.features
              and (batch is None or shape[0] == batch)
              and (self.max_tokens is None or shape[1] <= self.max_tokens))
        if not ok:
            got = f"shape {shape}" if isinstance(value, torch.Tensor) else type(value).__name__
            for_batch = f" for a batch of {batch}" if batch is not None else ""
            raise PeftcError(f"input {self.describe()} expected{for_batch}, got {got}")

    def example(self, batch: int, tokens: int = 2, *, generator: torch.Generator | None = None) -> torch.Tensor:
        """A random example of this input (export, parity checks)."""
        if self.max_tokens is not None:
            tokens = min(tokens, self.max_tokens)
        return torch.randn(batch, tokens, self.features, generator=generator)

    @property
    def example_shape(self) -> tuple[int, int]:
        """(tokens, features) of the example the graph tools run with (``node.meta['peftc_example']``)."""
        return (min(2, self.max_tokens) if self.max_tokens is not None else 2), self.features


@dataclass
class Ledger:
    """Who owns what after compilation."""

    rewrites: list[Rewrite] = field(default_factory=list)
    updating_buffers: set[str] = field(default_factory=set)
    tensor_slots: dict[str, TensorSlot] = field(default_factory=dict)
    module_slots: dict[str, ModuleSlot] = field(default_factory=dict)
    inserted: dict[str, str] = field(default_factory=dict)  # module path -> rule label
    kept: set[str] = field(default_factory=set)  # frozen tensors of a block's shared_state: stored once
    streams: dict[str, StreamInput] = field(default_factory=dict)  # second model inputs, in placeholder order


@dataclass
class CompileState:
    """The state shared by all passes of one compilation."""

    gm: fx.GraphModule
    spec: MethodSpec
    positions: Mapping[str, tuple[str, int, int]]
    input_size: tuple[int, ...]  # the example input's shape without the batch: (C, H, W), a stack's (T, d)
    ledger: Ledger = field(default_factory=Ledger)
    head_params: int = 0  # parameters of the backbone's own classifier (what "% of the body" excludes)
    shared: dict[str, dict[str, Any]] = field(default_factory=dict)  # block name -> Site.shared namespace
    streams: dict[str, Any] = field(default_factory=dict)  # stream name -> its rule, then its encoded node
    examples: Mapping[str, Any] = field(default_factory=dict)  # example values of further inputs, by name
    _index: NodeIndex | None = field(default=None, repr=False)
    _shapes_valid: bool = field(default=False, repr=False)
    _stale_code: bool = field(default=False, repr=False)
    _tensors: dict[int, torch.Tensor] | None = field(default=None, repr=False)
    _architecture: Any = field(default=None, repr=False)  # the trace cache's key while no pass changed anything

    def __post_init__(self) -> None:
        self._architecture = self.gm.meta.pop(ARCHITECTURE, None)

    @property
    def index(self) -> NodeIndex:
        if self._index is None:
            self._index = NodeIndex(self.gm, self.positions)
        return self._index

    def graph_changed(self, *, shapes_kept: bool = False) -> None:
        """Call after editing the graph: names new nodes and drops caches (code is regenerated lazily).

        ``shapes_kept``: the edit changed no existing node's output shape (a bypass added to a layer's output),
        so the shapes propagated before stay valid and only a new node's shape costs another propagation — on
        a ViT-B that is a full forward at 224², a third of a second.
        """
        assign_names(self.gm)
        self._architecture = None
        self._index = None
        self._shapes_valid = self._shapes_valid and shapes_kept
        self._stale_code = True

    def finish(self) -> fx.GraphModule:
        """Check the final graph and generate its Python code, once, after all passes (the traced module is
        lazy: nothing was generated before)."""
        if self._stale_code:
            self.gm.graph.lint()
        write_code(self.gm, changed=self._stale_code)
        self._stale_code = False
        return self.gm

    def modules_changed(self, added: nn.Module | None = None) -> None:
        """Call after putting modules into the model. With ``added`` (the one module that came in), the tensor
        map is extended rather than rebuilt: one replace per site (75 LayerNorms of a ViT-B, 53 convs of a
        ResNet-50) walked the whole model each time. Tensors of the module that left stay in it (a superset:
        a tensor shared with a module still in the model must never look new)."""
        self._architecture = None
        self._index = None
        if added is None or self._tensors is None:
            self._tensors = None
        else:
            self._tensors.update((id(t), t) for t in (*added.parameters(), *added.buffers()))

    def tensors(self) -> dict[int, torch.Tensor]:
        """Every parameter and buffer of the model by ``id`` (built once, extended by ``add_block``).

        Holding the tensors keeps their ids from being reused while the map lives; ``modules_changed`` extends
        or drops it.
        """
        if self._tensors is None:
            self._tensors = {id(t): t for t in (*self.gm.parameters(), *self.gm.buffers())}
        return self._tensors

    def shape_of(self, node: fx.Node) -> torch.Size | None:
        """Example output shape of ``node`` (shape propagation runs lazily, once per graph version)."""
        if not self._shapes_valid or "tensor_meta" not in node.meta:
            self.gm.graph.lint()  # propagation interprets the graph: its code need not be written yet
            param = next(self.gm.parameters(), None)
            x = example_input(self.input_size, device=param.device if param is not None else "cpu")
            if param is not None and param.is_floating_point():
                x = x.to(param.dtype)
            example = (tuple(x.shape), x.dtype, str(x.device))
            architecture = None if self.examples else self._architecture  # further inputs: not in the key
            if not trace_cache.recall_shapes(architecture, example, self.gm.graph):
                propagate_shapes(self.gm, x, self.examples)
                trace_cache.remember_shapes(architecture, example, self.gm.graph)
            self._shapes_valid = True
        meta = node.meta.get("tensor_meta")
        return getattr(meta, "shape", None)


def own_tensors(cand: Candidate, ledger: Ledger, pattern: str | list[str] = "*") -> Iterator[tuple[str, str, Any]]:
    """(qualified name, kind 'param'|'buffer', tensor) of a candidate's own tensors, not those of inserted blocks."""
    import fnmatch

    patterns = [pattern] if isinstance(pattern, str) else pattern
    everything = "*" in patterns  # ``freeze: {}`` visits every node: no glob matching per tensor then

    def wanted(local: str) -> bool:
        return everything or any(fnmatch.fnmatchcase(local, p) or fnmatch.fnmatchcase(local.rsplit(".", 1)[-1], p)
                                 for p in patterns)

    if cand.module is not None:
        base = str(cand.node.target)
        for kind, items in (("param", cand.module.named_parameters()), ("buffer", cand.module.named_buffers())):
            for local, tensor in items:
                owner = local.split(".")[:-1]
                if owner and ledger.inserted and any(f"{base}.{'.'.join(owner[:i])}" in ledger.inserted
                                                     for i in range(1, len(owner) + 1)):
                    continue  # a block inserted into this module: not the module's own tensor
                if wanted(local):
                    yield f"{base}.{local}", kind, tensor
    elif cand.tensor is not None and wanted(cand.name.rsplit(".", 1)[-1]):
        yield cand.name, "param" if isinstance(cand.tensor, nn.Parameter) else "buffer", cand.tensor


@dataclass
class PassContext:
    """One rule being applied."""

    state: CompileState
    rule: Rule
    _block_args: Any = field(default=None, repr=False)  # the rule's block args, validated once for all its sites

    @property
    def gm(self) -> fx.GraphModule:
        return self.state.gm

    @property
    def ledger(self) -> Ledger:
        return self.state.ledger

    @property
    def args(self) -> Any:
        return self.rule.args

    def locate(self, *path: str | int) -> Location:
        return self.state.spec.locate((*self.rule.path, *path))

    def select(self, selector: Selector, *path: str) -> list[Candidate]:
        """Nodes matching ``selector``; ``path`` is where the selector sits under the rule (for errors)."""
        return select(selector, self.state.index, lambda key: self.locate(*path, *key))

    def error(self, message: str, *path: str | int) -> SpecError:
        return SpecError(message, self.locate(*path))

    def record(self, action: str, node: str, **detail: Any) -> None:
        self.ledger.rewrites.append(Rewrite(self.rule.label, action, node, detail))

    def site(self, cand: Candidate, **extras: Any) -> Site:
        namespace = self.state.shared.setdefault(getattr(self.args, "block", None) or "", {})
        return Site(cand.name, cand.node, cand.module, self.state.shape_of, block=cand.block,
                    shared=namespace, extras=extras)

    def build_block(self, cand: Candidate, **extras: Any) -> nn.Module:
        """The rule's block, built for ``cand``; a build failure is reported at the rule's ``args``."""
        block = get_block(self.args.block)
        try:
            if self._block_args is None:
                self._block_args = block.args.model_validate(self.args.args)
            return block.build(self.site(cand, **extras), self._block_args)
        except SpecError:
            raise
        except Exception as exc:
            raise self.error(f"block {block.name!r} cannot be built for {cand.name!r}: {exc}", "args") from None

    def module_path_for(self, cand: Candidate, suffix: str) -> str:
        """A fresh module path derived from the node: ``layer1.0.conv2`` → ``layer1.0.conv2.clr``."""
        if cand.node.op == "call_module":
            base = f"{cand.node.target}.{suffix}"
        else:
            parent, _, leaf = cand.name.rpartition(".")
            leaf = leaf.replace("@", "_")
            base = f"{parent}.{leaf}_{suffix}" if parent else f"{leaf}_{suffix}"
        return fresh_path(self.gm, base)

    def add_block(self, path: str, module: nn.Module) -> int:
        """Register an inserted block; returns how many parameter elements it adds to the model.

        Its parameters are trainable unless the rule says otherwise. Tensors the block shares with blocks
        added before (a submodule found in ``Site.shared``) are already in the model: not counted, not owned
        again.
        """
        known = self.state.tensors()
        present = {id(t) for t in (*module.parameters(), *module.buffers()) if id(t) in known}
        self.gm.add_submodule(path, module)
        known.update((id(t), t) for t in (*module.parameters(), *module.buffers()))
        self.ledger.inserted[path] = self.rule.label
        trainable = getattr(self.args, "trainable", True)
        for p in module.parameters():
            if id(p) not in present:  # a tensor the block borrows from the model keeps its own flag
                p.requires_grad_(trainable)
        self.own(path, module, skip=present)
        self.keep(path, module)
        return sum(p.numel() for p in module.parameters() if id(p) not in present)

    def own(self, path: str, module: nn.Module, skip: frozenset[int] | set[int] = frozenset()) -> None:
        """Apply the rule's ``task_state`` to what a block it added offers as per-task state.

        That is the block's parameters and floating-point buffers (:func:`~peftc.blocks.contract.task_tensors`)
        minus those its ``shared_state`` keeps one copy of and those in ``skip`` (tensors it borrows).
        """
        if getattr(self.args, "task_state", "shared") == "shared":
            return
        for local, tensor, is_param in task_tensors(module):
            if id(tensor) not in skip:
                self.own_tensor(f"{path}.{local}", is_param)

    def keep(self, path: str, module: nn.Module) -> None:
        """Record the frozen tensors of a block's ``shared_state`` (random projections): not derived from the
        backbone, so the artifact stores them — once, whatever the tasks."""
        for local, tensor in (*module.named_parameters(), *module.named_buffers()):
            if is_shared_state(module, local) and not tensor.requires_grad and tensor.is_floating_point():
                self.ledger.kept.add(f"{path}.{local}")

    def own_tensor(self, name: str, is_param: bool) -> None:
        policy = getattr(self.args, "task_state", "shared")
        if policy != "shared":
            self.ledger.tensor_slots[name] = TensorSlot(name, self.rule.label, policy, is_param)



def count_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
