"""MemVP — visual knowledge as FFN memory: the stream encoder (projector) and the memory branch blocks."""

from peftc.blocks.registry import declare_block
from peftc.methods.memvp.args import ProjectorArgs, VisualMemoryArgs

declare_block("memvp_projector", args=ProjectorArgs, suffix="projector", home=f"{__name__}.memory")
declare_block("memvp_memory", args=VisualMemoryArgs, suffix="memvp", home=f"{__name__}.memory")
