"""FacT — factor-tuning (tensor-train and Tucker formats): the ``fact`` block."""

from peftc.methods.fact import fact  # noqa: F401  (registration)
