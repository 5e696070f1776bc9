"""ToMe — token merging: the ``merge_tokens`` primitive and the merge algorithm."""

from peftc.language.primitives import declare_primitive
from peftc.methods.tome.args import MergeTokensArgs

declare_primitive("merge_tokens", args=MergeTokensArgs, reads_shapes=True, once=True, home=f"{__name__}.merge_tokens")
