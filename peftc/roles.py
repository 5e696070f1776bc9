"""Structural roles: names for parts of a network that mean the same on every library.

A spec that says ``role: head`` works on torchvision's ``fc``/``classifier.3``/``heads.head`` and timm's ``head``
alike, because a role is found from the graph's structure, not from one library's attribute names.
"""

from __future__ import annotations

from torch import fx

from .select import Candidate, NodeIndex, register_role


def _has_params(cand: Candidate) -> bool:
    return cand.module is not None and any(True for _ in cand.module.parameters(recurse=False))


@register_role("head")
def head(index: NodeIndex) -> list[Candidate]:
    """The classifier(s): the parameterised layers nearest the output (``fc``, ``head`` and DeiT's ``head_dist``)."""
    output = next(n for n in reversed(index.gm.graph.nodes) if n.op == "output")
    found: list[Candidate] = []
    seen: set[fx.Node] = set()
    frontier = list(output.all_input_nodes)
    while frontier:
        node = frontier.pop()
        if node in seen:
            continue
        seen.add(node)
        cand = index.by_node.get(node)
        if cand is not None and node.op == "call_module" and _has_params(cand):
            found.append(cand)
            continue
        if cand is not None and node.op == "get_attr":
            continue
        frontier.extend(node.all_input_nodes)
    order = {c.node: i for i, c in enumerate(index.candidates)}
    return sorted(found, key=lambda c: order[c.node])
