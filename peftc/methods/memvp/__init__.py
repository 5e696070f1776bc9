"""MemVP — visual knowledge as FFN memory: the stream encoder (projector) and the memory branch blocks."""

from peftc.methods.memvp import memory  # noqa: F401  (registration)
