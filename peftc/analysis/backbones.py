"""Backbones by name: any torchvision classification model (``resnet50``), timm model (``timm:deit_small_…``) or
HF transformers model (``hf:google/vit-base-patch16-224`` — a hub id whose config is in the local cache, a local
directory with a ``config.json``, or an architecture class built from its default config:
``hf:ViTForImageClassification``; builder arguments override config fields).

Random init is the default and is seeded, so the same id and seed always rebuild bit-identical weights (an
artifact of a randomly initialised backbone can be loaded again). ``pretrained=True`` asks the library to
download its weights; ``weights=FILE`` loads a local safetensors or ``.pt/.pth`` state dict (``weights_only``,
so loading never runs code). A hash of the resulting weights identifies the backbone in artifacts.

A backbone built here is hashed at once. A module a user passes in is hashed when first asked for (saving an
artifact, loading one), over a zero-copy snapshot of its tensors: they stay alive in the user's module anyway, and
the compiler gives every tensor that training can write its own storage, so the snapshot keeps the original values
however long the model trains before it is saved.
"""

from __future__ import annotations

import copy
import hashlib
import os
import socket
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from peftc.errors import BackboneError, did_you_mean

__all__ = ["Backbone", "WeightsDigest", "build_backbone", "from_module", "list_backbones", "seed_generators",
           "shared_copy", "weights_hash"]


def _snapshot(module: nn.Module) -> dict[str, torch.Tensor]:
    """The state dict as views of the current storage: the values as they are now, without copying a byte."""
    return {name: t.detach() for name, t in module.state_dict(keep_vars=True).items()}


class WeightsDigest:
    """The content hash of a snapshot of weights, computed on the first call; the snapshot is let go then."""

    def __init__(self, tensors: dict[str, torch.Tensor]) -> None:
        self._tensors = tensors
        self._value: str | None = None

    @property
    def pending(self) -> bool:
        """Not computed yet: the snapshot still needs the tensors as they were built."""
        return self._value is None

    def __call__(self) -> str:
        if self._value is None:
            self._value = _digest(self._tensors.items())
            self._tensors = {}
        return self._value


@dataclass(eq=False)
class Backbone:
    """A built backbone and what peftc needs to know about it."""

    id: str
    module: nn.Module
    source: str  # "random" | "pretrained" | "weights" | "module"
    seed: int | None
    weights_file: str | None
    input_size: tuple[int, int, int]
    borrowed: bool = False  # its tensors' storage belongs to a module the caller still holds (shared_copy)
    digest: WeightsDigest = field(init=False, repr=False)  # of the weights as built

    def __post_init__(self) -> None:
        self.digest = WeightsDigest(_snapshot(self.module))

    @property
    def hash(self) -> str:
        return self.digest()

    @property
    def library(self) -> str:
        if self.source == "module":
            return "custom"
        return {"timm": "timm", "hf": "transformers"}.get(self.id.partition(":")[0], "torchvision")


def _digest(tensors: Iterable[tuple[str, torch.Tensor]]) -> str:
    h = hashlib.blake2b(digest_size=16)
    for name, tensor in tensors:
        t = tensor.detach()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)};".encode())
        if t.numel():
            h.update(t.contiguous().cpu().reshape(-1).view(torch.uint8).numpy())  # the buffer itself, no copy
    return h.hexdigest()


def weights_hash(module: nn.Module) -> str:
    """A content hash of every parameter and buffer (names, dtypes, shapes and bytes)."""
    return _digest(module.state_dict().items())


def shared_copy(module: nn.Module) -> nn.Module:
    """A copy of ``module``'s structure whose parameters and buffers are new tensor objects over the *same*
    storage: rewriting the copy never touches the original's modules, and no weight is copied (the compiler
    gives the tensors that training can write their own storage afterwards)."""
    memo: dict[int, Any] = {}
    for _, p in module.named_parameters(remove_duplicate=False):
        memo.setdefault(id(p), nn.Parameter(p.detach(), requires_grad=p.requires_grad))
    for _, b in module.named_buffers(remove_duplicate=False):
        memo.setdefault(id(b), b.detach())
    return copy.deepcopy(module, memo)


def _torchvision_names() -> list[str]:
    import torchvision

    return sorted(torchvision.models.list_models(module=torchvision.models))


def _timm_names(pattern: str = "") -> list[str]:
    import timm

    return timm.list_models(pattern or "*")


def list_backbones(pattern: str = "", library: str | None = None) -> list[str]:
    """Backbone ids matching a glob ``pattern`` (``*vit*``): torchvision names, then ``timm:`` names."""
    import fnmatch

    glob = pattern if any(c in pattern for c in "*?[") else f"*{pattern}*"
    out: list[str] = []
    if library in (None, "torchvision"):
        out += [n for n in _torchvision_names() if fnmatch.fnmatch(n, glob)]
    if library in (None, "timm"):
        out += [f"timm:{n}" for n in _timm_names(glob)]
    return out


def _reachable(host: str) -> bool:
    """Whether ``host`` resolves (a DNS lookup; no connection) — the hub's retries take a minute offline."""
    try:
        socket.getaddrinfo(host, 443)
    except OSError:
        return False
    return True


def _hub_offline() -> None:
    """Put huggingface_hub in offline mode (its retries take a minute when the network is unreachable)."""
    os.environ["HF_HUB_OFFLINE"] = "1"
    try:
        from huggingface_hub import constants
    except ImportError:
        return
    constants.HF_HUB_OFFLINE = True


def _construct_hf(name: str, pretrained: bool, kwargs: dict[str, Any]) -> nn.Module:
    """An HF transformers model: an architecture class from its default config, or a hub id / local directory
    whose config is read locally unless ``pretrained`` (then the weights are downloaded too). Builder arguments
    override config fields; one the config does not have is refused (a config would keep it silently)."""
    try:
        import transformers
    except ImportError:
        raise BackboneError("hf: backbones need HF transformers: pip install 'peftc[hf]'") from None
    cls = getattr(transformers, name, None)
    if isinstance(cls, type) and issubclass(cls, transformers.PreTrainedModel):
        if pretrained:
            raise BackboneError(f"hf:{name} is an architecture, not a checkpoint: give a hub id for --pretrained")
        _check_fields(cls.config_class, kwargs, name)
        return cls(cls.config_class(**kwargs))
    if pretrained and not _reachable("huggingface.co"):
        _hub_offline()  # use the local cache if it has the files; fail fast otherwise
    try:
        config = transformers.AutoConfig.from_pretrained(name, local_files_only=not pretrained, **kwargs)
    except OSError:
        raise BackboneError(
            f"no config for hf:{name} here: give a local directory with a config.json, a hub id whose config is "
            "in the local cache, an architecture (hf:ViTForImageClassification), or --pretrained to download it"
        ) from None
    _check_fields(type(config), kwargs, name)
    arch = getattr(transformers, (config.architectures or [""])[0], None) or transformers.AutoModel
    if pretrained:
        return arch.from_pretrained(name, config=config)
    return arch.from_config(config) if arch is transformers.AutoModel else arch(config)


def _check_fields(config_class: type, kwargs: dict[str, Any], name: str) -> None:
    """Builder arguments must be fields of the model's config: a config would keep a misspelt one silently."""
    default = config_class()
    for key in kwargs:
        if not hasattr(default, key):
            raise BackboneError(f"hf:{name}: {config_class.__name__} has no field {key!r}"
                                + did_you_mean(key, default.to_dict()))


def _construct(backbone_id: str, pretrained: bool, kwargs: dict[str, Any]) -> nn.Module:
    if backbone_id.startswith("hf:"):
        return _construct_hf(backbone_id[3:], pretrained, kwargs)
    if backbone_id.startswith("timm:"):
        import timm

        name = backbone_id[5:]
        if not timm.is_model(name):
            raise BackboneError(
                f"unknown timm model {name!r}" + did_you_mean(name, timm.list_models(f"*{name[:4]}*") or _timm_names())
            )
        if pretrained and not _reachable("huggingface.co"):
            _hub_offline()  # use the local cache if it has the weights; fail fast otherwise
        return timm.create_model(name, pretrained=pretrained, **kwargs)
    import torchvision

    names = _torchvision_names()
    if backbone_id not in names:
        hint = did_you_mean(backbone_id, names)
        raise BackboneError(
            f"unknown backbone {backbone_id!r}{hint}; use a torchvision classification model name, timm:NAME or "
            "hf:NAME (see `peftc backbones`)"
        )
    return torchvision.models.get_model(backbone_id, weights="DEFAULT" if pretrained else None, **kwargs)


def _input_size(module: nn.Module, backbone_id: str) -> tuple[int, int, int]:
    embed = getattr(module, "patch_embed", None)  # a timm ViT built with img_size=N: its cfg still says 224
    built = getattr(embed, "img_size", None)
    channels = getattr(getattr(embed, "proj", None), "in_channels", 3)
    if isinstance(built, (tuple, list)) and len(built) == 2 and all(isinstance(s, int) for s in built):
        return (int(channels), int(built[0]), int(built[1]))
    config = getattr(module, "config", None)  # a transformers PretrainedConfig: one side, or (H, W)
    side = getattr(config, "image_size", None)
    hw = (side, side) if isinstance(side, int) else tuple(side) if isinstance(side, (tuple, list)) else ()
    if len(hw) == 2 and all(isinstance(s, int) for s in hw):
        return (int(getattr(config, "num_channels", 3)), int(hw[0]), int(hw[1]))
    cfg = getattr(module, "pretrained_cfg", None) or getattr(module, "default_cfg", None)
    if isinstance(cfg, dict) and cfg.get("input_size"):
        return tuple(cfg["input_size"])  # type: ignore[return-value]
    size = getattr(module, "image_size", None) or (299 if "inception" in backbone_id else 224)
    return (3, int(size), int(size))


def load_state_file(path: str | Path) -> dict[str, torch.Tensor]:
    """A state dict from safetensors or a ``.pt/.pth`` file, never unpickling arbitrary objects."""
    path = Path(path)
    if not path.is_file():
        raise BackboneError(f"weights file not found: {path}")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:
        raise BackboneError(f"cannot read weights file {path}: {exc}") from None
    for key in ("state_dict", "model", "model_state_dict"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise BackboneError(f"{path} does not hold a state dict of tensors")
    return state


def _load_weights(module: nn.Module, path: str, backbone_id: str) -> None:
    state = load_state_file(path)
    own = module.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    wrong = sorted(k for k in set(own) & set(state) if own[k].shape != state[k].shape)
    if missing or unexpected or wrong:
        detail = []
        if missing:
            detail.append(f"{len(missing)} missing (e.g. {missing[0]})")
        if unexpected:
            detail.append(f"{len(unexpected)} unexpected (e.g. {unexpected[0]})")
        if wrong:
            k = wrong[0]
            detail.append(f"{len(wrong)} of another shape (e.g. {k}: {tuple(state[k].shape)} vs {tuple(own[k].shape)})")
        raise BackboneError(f"weights file {path} does not fit {backbone_id}: " + "; ".join(detail))
    module.load_state_dict(state)


def seed_generators(seed: int) -> None:
    """``torch.manual_seed`` where an accelerator could draw numbers; else the CPU generator alone (seeding
    absent backends queues a formatted stack trace for each, and linecache then keeps ~0.5 MiB of source)."""
    accelerator = getattr(torch, "accelerator", None)
    if accelerator is not None and accelerator.is_available():
        torch.manual_seed(seed)
    else:
        torch.default_generator.manual_seed(seed)


def build_backbone(
    backbone_id: str,
    *,
    pretrained: bool = False,
    weights: str | Path | None = None,
    seed: int = 0,
    **kwargs: Any,
) -> Backbone:
    """Build ``backbone_id`` in eval mode: seeded random init, library pretrained weights, or a local file."""
    if pretrained and weights:
        raise BackboneError("give either --pretrained or --weights, not both")
    with torch.random.fork_rng(devices=[]):
        seed_generators(seed)
        try:
            module = _construct(backbone_id, pretrained, kwargs)
        except BackboneError:
            raise
        except (OSError, RuntimeError, ValueError) as exc:
            if pretrained:
                raise BackboneError(
                    f"could not download pretrained weights for {backbone_id} ({type(exc).__name__}: {exc}); "
                    "are you offline? Use --weights FILE with a local state dict instead"
                ) from None
            raise BackboneError(f"cannot build {backbone_id}: {exc}") from None
        except TypeError as exc:
            raise BackboneError(f"cannot build {backbone_id} with {kwargs}: {exc}") from None
    if weights:
        _load_weights(module, str(weights), backbone_id)
    module.eval()
    source = "pretrained" if pretrained else ("weights" if weights else "random")
    built = Backbone(
        id=backbone_id,
        module=module,
        source=source,
        seed=seed if source == "random" else None,
        weights_file=str(Path(weights).resolve()) if weights else None,
        input_size=_input_size(module, backbone_id),
    )
    built.digest()  # nobody else holds these weights: a snapshot kept for later would keep dropped layers alive
    return built


def from_module(module: nn.Module, backbone_id: str | None = None, *, borrowed: bool = False) -> Backbone:
    """Wrap a module the user built (``borrowed``: a :func:`shared_copy`, whose storage is still the user's)."""
    name = backbone_id or f"module:{type(module).__module__}.{type(module).__qualname__}"
    return Backbone(
        id=name,
        module=module,
        source="module",
        seed=None,
        weights_file=None,
        input_size=_input_size(module, name),
        borrowed=borrowed,
    )
