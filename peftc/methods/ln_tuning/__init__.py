"""LayerNorm tuning with task keys: the ``ln_bank`` and ``task_key`` blocks, per-sample task selection,
its training stages (``task_keys``, ``rectify_head``) and its ``select_task`` deploy mode."""

from peftc.methods.ln_tuning import blocks, key, stages  # noqa: F401  (registration)
