"""The compile report: what a spec added, removed, trains and keeps per task — the numbers a paper quotes."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from torch import nn

from peftc.analysis.trace import trace_info
from peftc.language import get_primitive
from peftc.passes import Ledger, Rewrite


@dataclass(frozen=True)
class RuleSummary:
    label: str
    op: str
    nodes: int
    added_params: int
    removed_params: int
    task_params: int
    task_buffers: int


@dataclass(frozen=True)
class Report:
    spec: str
    backbone: str
    backbone_params: int
    backbone_head_params: int
    added_params: int
    removed_params: int
    total_params: int
    trainable_params: int
    task_params: int
    task_buffers: int
    task_head_params: int
    rules: tuple[RuleSummary, ...] = field(default=())
    delta_bytes: int = 0  # one task's artifact delta as stored (quantised tensors packed), heads included
    delta_head_bytes: int = 0  # of which per-task heads
    tracing: tuple[str, ...] = ()  # how the backbone was traced when plain fx could not trace it whole

    @property
    def backbone_body_params(self) -> int:
        """The backbone without its classifier (what papers take percentages of)."""
        return self.backbone_params - self.backbone_head_params

    @property
    def task_state_without_head(self) -> int:
        return self.task_params + self.task_buffers - self.task_head_params

    def percent(self, count: int, of: str = "body") -> float:
        base = self.backbone_body_params if of == "body" else self.backbone_params
        return 100.0 * count / base if base else 0.0

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["rules"] = [asdict(r) for r in self.rules]
        out["backbone_body_params"] = self.backbone_body_params
        out["task_state_without_head"] = self.task_state_without_head
        out["trainable_percent"] = round(self.percent(self.trainable_params, "all"), 4)
        out["task_state_percent_of_body"] = round(self.percent(self.task_state_without_head), 4)
        out["delta_bytes_without_head"] = self.delta_bytes - self.delta_head_bytes
        return out


def build_report(
    spec_name: str,
    backbone_id: str,
    backbone_params: int,
    backbone_head_params: int,
    original_ids: set[int],
    model: nn.Module,
    ledger: Ledger,
) -> Report:
    """Count everything from the final model and the ledger (never from what rules claim)."""
    params = dict(model.named_parameters())
    buffers = dict(model.named_buffers())
    added = sum(p.numel() for p in params.values() if id(p) not in original_ids)
    removed = backbone_params - sum(p.numel() for p in params.values() if id(p) in original_ids)
    per_rule: dict[str, dict[str, int]] = {}
    head_task = 0
    for slot in ledger.tensor_slots.values():
        tensor = params.get(slot.name) if slot.is_param else buffers.get(slot.name)
        if tensor is None or not tensor.is_floating_point():
            continue  # a counter (num_batches_tracked) is kept per task but is bookkeeping, not state to count
        entry = per_rule.setdefault(slot.rule, {"task_params": 0, "task_buffers": 0})
        entry["task_params" if slot.is_param else "task_buffers"] += tensor.numel()
    for mslot in ledger.module_slots.values():
        module = model.get_submodule(mslot.path)
        n = sum(p.numel() for p in module.parameters())
        entry = per_rule.setdefault(mslot.rule, {"task_params": 0, "task_buffers": 0})
        entry["task_params"] += n
        head_task += n
    delta_bytes, delta_head_bytes = _delta_bytes(model, ledger, params, buffers)
    rules = []
    for label in dict.fromkeys(r.rule for r in ledger.rewrites):
        rows = [r for r in ledger.rewrites if r.rule == label]
        counts = per_rule.get(label, {})
        rules.append(
            RuleSummary(
                label=label,
                op=rows[0].action,
                nodes=len({r.node for r in rows}),
                added_params=sum(int(r.detail.get("params", 0)) for r in rows if _adds(r)),
                removed_params=sum(int(r.detail.get("removed", 0)) for r in rows),
                task_params=counts.get("task_params", 0),
                task_buffers=counts.get("task_buffers", 0),
            )
        )
    return Report(
        spec=spec_name,
        backbone=backbone_id,
        backbone_params=backbone_params,
        backbone_head_params=backbone_head_params,
        added_params=added,
        removed_params=removed,
        total_params=sum(p.numel() for p in params.values()),
        trainable_params=sum(p.numel() for p in params.values() if p.requires_grad),
        task_params=sum(v["task_params"] for v in per_rule.values()),
        task_buffers=sum(v["task_buffers"] for v in per_rule.values()),
        task_head_params=head_task,
        rules=tuple(rules),
        delta_bytes=delta_bytes,
        delta_head_bytes=delta_head_bytes,
        tracing=tuple(trace_info(model).describe()),
    )


def _delta_bytes(
    model: nn.Module, ledger: Ledger, params: dict[str, Any], buffers: dict[str, Any]
) -> tuple[int, int]:
    """Bytes of one task's saved delta (trained, per-task and updating tensors; quantised ones packed) and how
    many of them are per-task heads."""
    from peftc.storage.codec import stored_nbytes

    names = {n for n, p in params.items() if p.requires_grad} | set(ledger.updating_buffers)
    names |= {s.name for s in ledger.tensor_slots.values()}
    heads = tuple(f"{path}." for path in ledger.module_slots)
    for path in ledger.module_slots:
        names |= {f"{path}.{k}" for k in model.get_submodule(path).state_dict()}
    total = head = 0
    for name in names:
        tensor = params.get(name, buffers.get(name))
        if tensor is None:
            continue
        size = stored_nbytes(model, name, tensor)
        total += size
        head += size if name.startswith(heads) else 0
    return total, head


def _adds(rewrite: Rewrite) -> bool:
    """True when a rewrite's ``params`` are parameters its primitive added (a head kept as it was adds none)."""
    try:
        primitive = get_primitive(rewrite.action)
    except KeyError:  # an action that is not a primitive's own name (a pass's sub-step) adds nothing
        return False
    return primitive.adds_params and not rewrite.detail.get("reused")
