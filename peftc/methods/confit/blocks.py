"""ConFiT's cross-convolution BatchNorm (JieShibo/ConFiT, ``stat_tracker.py``, ``main.py``).

In continual fine-tuning the convolutions are shared by all tasks and keep changing, so an old task's stored BN
running mean no longer describes what its conv now produces. ConFiT re-derives it: the conv is linear, so the
mean of its output over the old task's data is (up to borders) the conv applied to the mean of its *input*.

Two blocks implement it, wired by the ``confit`` spec:

* ``input_mean`` (:class:`InputMean`), inserted before each conv of a conv → BN pair: an identity that, in
  training, keeps a running mean of the conv input (BN-style momentum), one mean per spatial phase of the conv's
  stride (a stride-2 conv sees the 4 pixels of each 2×2 cell through different taps, so each gets its own mean),
  and the input size it last saw. Its buffers are task state.
* ``cross_conv_bn`` (:class:`CrossConvBN`), in place of the BN: a ``BatchNorm2d`` — the same Parameter and
  buffer objects, so it still *is* the backbone's BN for every selector, fold and export — that also records when
  its statistics were last measured. When a task is activated whose statistics predate the last training step,
  it sets ``running_mean`` to the spatial mean of ``conv(constant map of the stored input means)`` through the
  conv's *current* weights (zero padding included, at the input size seen in training). ``running_var`` is not
  corrected, as in the paper.

"Predates" is exact bookkeeping, not a guess: ``num_batches_tracked`` is one counter shared by all tasks (it
advances with every training step of any task), while ``measured_at`` — task state — remembers its value when
this task's statistics were last updated or corrected. Both are saved in artifacts, so a loaded model corrects
exactly the tasks the saved one would have.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import fx, nn

from peftc.blocks.contract import Block
from peftc.blocks.registry import BlockArgs, Site, block_factory
from peftc.errors import PeftcError
from peftc.methods.confit.args import InputMeanArgs

__all__ = ["CrossConvBN", "InputMean"]


class InputMean(Block):
    """Identity that tracks the running mean of a conv's input per stride phase (in training only)."""

    def __init__(self, channels: int, stride: tuple[int, int] = (1, 1), momentum: float = 0.1):
        super().__init__()
        self.channels = channels
        self.stride = (int(stride[0]), int(stride[1]))
        self.momentum = momentum
        # input_mean[:, p, q] = mean of pixels (y, x) with y % stride_h == p and x % stride_w == q
        self.register_buffer("input_mean", torch.zeros(channels, *self.stride))
        self.register_buffer("input_size", torch.zeros(2))  # (H, W) last seen; 0 = never trained

    @torch.no_grad()
    def update(self, x: torch.Tensor) -> None:
        """Move each phase's running mean towards this batch's mean of that phase's pixels (N, C, H, W)."""
        sh, sw = self.stride
        n, c, h, w = x.shape
        x = x.detach().to(self.input_mean.dtype)
        if h % sh == 0 and w % sw == 0:
            self.input_mean.lerp_(x.reshape(n, c, h // sh, sh, w // sw, sw).mean(dim=(0, 2, 4)), self.momentum)
        else:  # ragged edge; phases with no pixel at all (a 1x1 input) keep their mean
            for p in range(min(sh, h)):
                for q in range(min(sw, w)):
                    self.input_mean[:, p, q].lerp_(x[:, :, p::sh, q::sw].mean(dim=(0, 2, 3)), self.momentum)
        self.input_size[0].fill_(h)
        self.input_size[1].fill_(w)

    def constant_map(self, height: int, width: int) -> torch.Tensor:
        """The stored means laid out as an input image (1, C, H, W): pixel (y, x) holds its phase's mean."""
        sh, sw = self.stride
        reps = (1, -(-height // sh), -(-width // sw))
        return self.input_mean.repeat(*reps)[:, :height, :width].unsqueeze(0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training:
            self.update(x)
        return x

    def folded(self) -> nn.Module:
        """For deployment (``peftc.export.fold``): tracking is a training-time job; inference is the identity."""
        return nn.Identity()

    def extra_repr(self) -> str:
        return f"{self.channels}, stride={self.stride}, momentum={self.momentum}"


class CrossConvBN(nn.BatchNorm2d, Block):
    """A BatchNorm2d that can re-derive its running mean through its producer conv's current weights."""

    reused = "owned"  # it *is* the backbone's BN: the BN's tensors become this block's (per-task) state

    def __init__(self, bn: nn.modules.batchnorm._BatchNorm, conv: nn.Conv2d, tracker: InputMean):
        super().__init__(bn.num_features, bn.eps, bn.momentum, bn.affine, bn.track_running_stats)
        if bn.affine:  # the very same tensors: optimizers, task slots and folds keep seeing them
            self.weight, self.bias = bn.weight, bn.bias
        for name, buf in bn.named_buffers(recurse=False):
            self._buffers[name] = buf
        counter = bn.num_batches_tracked
        self.register_buffer("measured_at", torch.zeros((), dtype=torch.float32, device=counter.device))
        self.measured_at.copy_(counter)
        self.train(bn.training)
        # Not submodules (they live at their own paths in the graph): read, never owned, counted or moved here.
        self.__dict__["conv"] = conv
        self.__dict__["tracker"] = tracker

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = super().forward(x)
        if self.training and self.track_running_stats:
            self.measured_at.copy_(self.num_batches_tracked)  # this task's stats now match the current convs
        return out

    @property
    def stale(self) -> bool:
        """Whether the conv has been trained since this task's statistics were measured or corrected."""
        return float(self.measured_at) != float(self.num_batches_tracked)

    @torch.no_grad()
    def expected_mean(self) -> torch.Tensor | None:
        """Spatial mean of conv(constant map of the stored input means) through the current conv weights."""
        h, w = (int(v) for v in self.tracker.input_size)
        if h == 0 or w == 0:
            return None  # this task never trained: nothing was measured
        conv = self.conv
        x = self.tracker.constant_map(h, w).to(conv.weight)
        return conv._conv_forward(x, conv.weight, conv.bias).mean(dim=(0, 2, 3))

    @torch.no_grad()
    def correct(self) -> bool:
        """Set ``running_mean`` from the stored input means; returns whether it could (the task has data)."""
        mean = self.expected_mean()
        if mean is None or self.running_mean is None:
            return False
        self.running_mean.copy_(mean.to(self.running_mean))
        self.measured_at.copy_(self.num_batches_tracked)
        return True

    def folded(self) -> nn.BatchNorm2d:
        """For deployment: a plain BatchNorm2d with copies of the active task's (corrected) state, which
        ``peftc.export.fold`` then merges into the conv."""
        plain = nn.BatchNorm2d(self.num_features, self.eps, self.momentum, self.affine, self.track_running_stats)
        plain.to(device=self.running_mean.device, dtype=self.running_mean.dtype)
        plain.load_state_dict({k: v for k, v in self.state_dict().items() if k != "measured_at"})
        return plain.eval()

    # -- task bank hooks: the bank has already put the task's tensors in place ---------------------------------
    def add_task(self, name: str, source: str) -> None:
        """New tasks get their state from the bank (task slots); nothing else to do."""

    def set_task(self, name: str) -> None:
        if self.stale:
            self.correct()

    def extra_repr(self) -> str:
        return super().extra_repr() + ", cross_conv=True"


@block_factory("input_mean")
def input_mean(site: Site, args: InputMeanArgs) -> InputMean:
    """Identity before a conv that tracks its input mean per stride phase (ConFiT's statistics tracker)."""
    conv = site.module
    if not isinstance(conv, nn.Conv2d):
        raise PeftcError(f"input_mean goes before a Conv2d; {site.name!r} is a {type(conv).__name__}")
    return InputMean(conv.in_channels, conv.stride, args.momentum)


def _producer(node: fx.Node) -> fx.Node | None:
    first = node.args[0] if node.args else None
    return first if isinstance(first, fx.Node) and first.op == "call_module" else None


def _is_plain_batchnorm(bn: nn.BatchNorm2d) -> bool:
    """Whether ``bn`` computes exactly batch normalisation (in eval mode), found by running it on a probe."""
    like = bn.running_mean
    x = torch.randn(2, bn.num_features, 3, 3, generator=torch.Generator().manual_seed(0)).to(like)
    was = bn.training
    bn.eval()
    try:
        with torch.no_grad():
            expected = F.batch_norm(x, bn.running_mean, bn.running_var, bn.weight, bn.bias, False, 0.0, bn.eps)
            return torch.allclose(bn(x), expected, atol=1e-5)
    finally:
        bn.train(was)


@block_factory("cross_conv_bn")
def cross_conv_bn(site: Site, args: BlockArgs) -> CrossConvBN:
    """A BatchNorm2d whose running mean is re-derived through its conv's current weights (ConFiT)."""
    bn = site.module
    if not isinstance(bn, nn.BatchNorm2d) or not bn.track_running_stats:
        what = "a BatchNorm2d without running statistics" if isinstance(bn, nn.BatchNorm2d) else type(bn).__name__
        raise PeftcError(f"cross_conv_bn replaces a BatchNorm2d with running statistics; {site.name!r} is {what}")
    if not _is_plain_batchnorm(bn):
        raise PeftcError(f"cross_conv_bn replaces a plain BatchNorm2d; {site.name!r} ({type(bn).__name__}) computes "
                         "more than batch normalisation (e.g. an activation fused in)")
    gm = site.node.graph.owning_module
    conv_node = _producer(site.node)
    conv = gm.get_submodule(str(conv_node.target)) if conv_node is not None else None
    if not isinstance(conv, nn.Conv2d):
        raise PeftcError(f"cross_conv_bn needs {site.name!r} to read a Conv2d directly (role bn_after_conv)")
    tracker_node = _producer(conv_node)
    tracker = gm.get_submodule(str(tracker_node.target)) if tracker_node is not None else None
    if not isinstance(tracker, InputMean):
        raise PeftcError(f"cross_conv_bn needs an input_mean block right before {conv_node.target!r}; insert "
                         "one first (insert: {before: {role: conv_before_bn}, block: input_mean})")
    return CrossConvBN(bn, conv, tracker)
