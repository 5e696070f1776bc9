"""LoRA — low-rank adaptation of Linear layers and convolutions: the ``lora`` block."""

from peftc.methods.lora import lora  # noqa: F401  (registration)
