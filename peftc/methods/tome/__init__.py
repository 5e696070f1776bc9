"""ToMe — token merging: the ``merge_tokens`` primitive and the merge algorithm."""

from peftc.methods.tome import merge_tokens  # noqa: F401  (registration)
