"""LayerNorm tuning with task keys: the ``ln_bank`` and ``task_key`` blocks, per-sample task selection,
its training stages (``task_keys``, ``rectify_head``) and its ``select_task`` deploy mode."""

from peftc.blocks.registry import declare_block
from peftc.methods.ln_tuning.args import LNBankArgs, TaskKeyArgs
from peftc.plugins import implemented_in

declare_block("ln_bank", args=LNBankArgs, suffix="ln", home=f"{__name__}.blocks")
declare_block("task_key", args=TaskKeyArgs, suffix="task_key", home=f"{__name__}.key")
implemented_in(f"{__name__}.stages")
