"""Replacement Learning: the ``tie`` primitive, its tied layers and their graph-level fold."""

from peftc.language.primitives import declare_primitive
from peftc.methods.replacement.args import TieArgs

declare_primitive("tie", args=TieArgs, adds_params=True, home=f"{__name__}.tie")
