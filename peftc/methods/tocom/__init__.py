"""ToCom — token compensator: the ``tocom`` block, its self-distillation (``distill`` stage) and attaching."""

from peftc.methods.tocom import stage, tocom  # noqa: F401  (registration)
