"""LoRA — low-rank adaptation of Linear layers and convolutions: the ``lora`` block."""

from peftc.blocks.registry import declare_block
from peftc.methods.lora.args import LoraArgs

declare_block("lora", args=LoraArgs, suffix="lora", home=f"{__name__}.lora")
