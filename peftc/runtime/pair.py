"""A compiled vision-language pair: one module from images and token ids to the language model's loss and logits.

The visual encoder is an ordinary :class:`~peftc.runtime.model.Compiled` whose graph outputs the tokens the spec's
``pair:`` section names. The language model keeps its own forward (the eager glue: embeddings, masks, rotary
angles, the LM head and its loss); its decoder layers are the GraphModules cut from the rewritten stack
(:mod:`peftc.analysis.stack`). The glue does not pass a layer the stream, so the hand-off goes around it: the
pair encodes the stream once (the *prelude*: MemVP's projector), binds the values to a :class:`StreamValues` for
the duration of the forward, and each layer's graph reads them through a :class:`StreamValue` node.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import fx, nn

from peftc.errors import PeftcError
from peftc.language import MethodSpec
from peftc.passes import StreamInput
from peftc.runtime.model import Compiled
from peftc.runtime.report import Report

__all__ = ["CompiledPair", "StreamValue", "StreamValues"]


class StreamValues:
    """The encoded streams of the forward running now, by name (bound by :class:`CompiledPair`; one forward of
    a model at a time — threads sharing one model would see each other's values)."""

    def __init__(self) -> None:
        self._values: Mapping[str, torch.Tensor] | None = None

    @contextmanager
    def bound(self, values: Mapping[str, torch.Tensor]) -> Iterator[None]:
        outer, self._values = self._values, values
        try:
            yield
        finally:
            self._values = outer

    def get(self, name: str) -> torch.Tensor:
        if self._values is None:
            raise PeftcError("this decoder layer reads a stream that only the compiled pair's forward provides: "
                             "call the pair (model(images, input_ids)), not its language model alone")
        return self._values[name]


class StreamValue(nn.Module):
    """A layer's read of one encoded stream value (a node with no inputs in the layer's graph)."""

    def __init__(self, values: StreamValues, name: str):
        super().__init__()
        self.values, self.name = values, name

    def forward(self) -> torch.Tensor:
        return self.values.get(self.name)

    def save(self, directory: str | Path) -> Path:
        """Write the pair's artifact (spec, both models' hashes, the trainable tensors) to ``directory``."""
        from peftc.storage.pair import save_pair

        return save_pair(self, directory)

    def load_delta(self, directory: str | Path) -> CompiledPair:
        """Load a saved pair's tensors (same spec, same two models)."""
        from peftc.storage.pair import load_pair_delta

        return load_pair_delta(self, directory)

    def extra_repr(self) -> str:
        return repr(self.name)


class CompiledPair(nn.Module):
    """``model(images, input_ids, labels=None, attention_mask=None, image_mask=None)`` → the language model's
    output (``.logits``, and ``.loss`` with ``labels``). ``images=None``, or ``image_mask`` false for a sample,
    means no image: the stream gets no tokens (MemVP: Z = 0, only the learned memory acts). ``features=`` gives
    the encoder's tokens instead of images (computed once and cached, say): ``model(None, ids, features=t)``."""

    def __init__(self, vision: Compiled, language: nn.Module, prelude: fx.GraphModule | None, values: StreamValues,
                 spec: MethodSpec, stream: StreamInput, reports: dict[str, Report], language_digest: Callable[[], str]):
        super().__init__()
        self.vision = vision
        self.language = language
        self.prelude = prelude
        self.values = values
        self.spec = spec
        self.stream = stream
        self.reports = reports
        self._language_digest = language_digest
        self.train(False)

    @property
    def language_hash(self) -> str:
        """A hash of the language model's weights as given (computed when first asked for: saving, loading)."""
        return self._language_digest()

    @property
    def vocab_size(self) -> int:
        return int(self.language.get_input_embeddings().num_embeddings)

    def forward(self, images: torch.Tensor | None, input_ids: torch.Tensor, labels: torch.Tensor | None = None,
                attention_mask: torch.Tensor | None = None, image_mask: torch.Tensor | None = None,
                features: torch.Tensor | None = None) -> Any:
        self._check_ids(input_ids, labels)
        batch = int(input_ids.shape[0])
        if features is not None:
            if images is not None:
                raise PeftcError("give images or their features, not both")
            tokens = features
        elif images is None:
            param = next(self.language.parameters())
            tokens = torch.zeros(batch, 0, self.stream.features, device=param.device, dtype=param.dtype)
        else:
            self._check_images(images, batch)
            tokens = self.vision(images)
        if image_mask is not None:
            tokens = tokens * image_mask.reshape(-1, 1, 1).to(tokens.dtype)
        self.stream.check(tokens, batch)
        values = self.prelude(**{self.stream.name: tokens}) if self.prelude is not None else {}
        with self.values.bound(values):
            return self.language(input_ids=input_ids, attention_mask=attention_mask, labels=labels, use_cache=False)

    def _check_images(self, images: Any, batch: int) -> None:
        want = tuple(self.vision.backbone.input_size)
        if not isinstance(images, torch.Tensor) or images.dim() != 4 or tuple(images.shape[1:]) != want:
            got = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
            raise PeftcError(f"images must be (batch, {', '.join(map(str, want))}) for this visual encoder, got {got}")
        if images.shape[0] != batch:
            raise PeftcError(f"{images.shape[0]} images for {batch} token sequences")

    def _check_ids(self, input_ids: Any, labels: Any) -> None:
        for name, ids in (("input_ids", input_ids), ("labels", labels)):
            if ids is None and name == "labels":
                continue
            if not isinstance(ids, torch.Tensor) or ids.dim() != 2 or ids.is_floating_point():
                got = (f"{ids.dtype} of shape {tuple(ids.shape)}" if isinstance(ids, torch.Tensor)
                       else type(ids).__name__)
                raise PeftcError(f"{name} must be integer token ids of shape (batch, tokens), got {got}")
            real = ids[ids != -100] if name == "labels" else ids  # -100: positions the loss ignores
            if real.numel() and (int(real.min()) < 0 or int(real.max()) >= self.vocab_size):
                raise PeftcError(f"{name} holds token ids outside the vocabulary [0, {self.vocab_size}): "
                                 f"min {int(real.min())}, max {int(real.max())}")

    def train(self, mode: bool = True) -> CompiledPair:
        super().train(mode)
        self.vision.train(mode)  # keeps frozen normalisation statistics in eval mode
        return self

    def trainable_parameters(self) -> Iterator[nn.Parameter]:
        return (p for p in self.parameters() if p.requires_grad)

    def named_trainable_parameters(self) -> Iterator[tuple[str, nn.Parameter]]:
        return ((n, p) for n, p in self.named_parameters() if p.requires_grad)

    @property
    def trainable_params(self) -> int:
        """Trainable parameter elements, each shared tensor once (MemVP's E1/E2 serve every layer)."""
        return sum(p.numel() for p in self.trainable_parameters())

    def added_params(self) -> dict[str, int]:
        """Parameters each rule added, by label, over both parts."""
        out: dict[str, int] = {}
        for report in self.reports.values():
            for rule in report.rules:
                out[rule.label] = out.get(rule.label, 0) + rule.added_params
        return out

    def save(self, directory: str | Path) -> Path:
        """Write the pair's artifact (spec, both models' hashes, the trainable tensors) to ``directory``."""
        from peftc.storage.pair import save_pair

        return save_pair(self, directory)

    def load_delta(self, directory: str | Path) -> CompiledPair:
        """Load a saved pair's tensors (same spec, same two models)."""
        from peftc.storage.pair import load_pair_delta

        return load_pair_delta(self, directory)

    def extra_repr(self) -> str:
        return f"spec={self.spec.name!r}, stream={self.stream.name!r}"
