"""Backbones built once per test session for the method-library tests.

Building a ViT is the expensive part of a compile (timm's truncated-normal init of 86M weights takes seconds on
CPU), and many tests need the same few backbones. ``peftc.compile(spec, module)`` works on a private deep copy
and never modifies the module it is given, so one built instance can serve every test as compile input and as
the unmodified reference.
"""

from __future__ import annotations

from functools import cache

from torch import nn

from peftc.backbones import build_backbone


@cache
def backbone(name: str, img_size: int | None = None) -> nn.Module:
    """The seeded random-init backbone ``name`` (timm ViTs optionally for ``img_size`` inputs), in eval mode."""
    kwargs = {"img_size": img_size} if img_size is not None else {}
    return build_backbone(name, **kwargs).module
