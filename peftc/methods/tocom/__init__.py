"""ToCom — token compensator: the ``tocom`` block, its self-distillation (``distill`` stage) and attaching."""

from peftc.blocks.registry import declare_block
from peftc.methods.tocom.args import ToComArgs
from peftc.plugins import implemented_in

declare_block("tocom", args=ToComArgs, suffix="tocom", home=f"{__name__}.tocom")
implemented_in(f"{__name__}.stage")
