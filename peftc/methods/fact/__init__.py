"""FacT — factor-tuning (tensor-train and Tucker formats): the ``fact`` block."""

from peftc.blocks.registry import declare_block
from peftc.methods.fact.args import FactArgs

declare_block("fact", args=FactArgs, suffix="fact", home=f"{__name__}.fact")
