"""Build SAM (segment-anything) models: official ViT-B/L/H from a local checkpoint, or a tiny toy.

* ``vit_b`` / ``vit_l`` / ``vit_h``: segment-anything's own architectures (``sam_model_registry``)
  filled from a local checkpoint file read with ``torch.load(..., weights_only=True)`` (never
  ``weights_only=False``: a checkpoint cannot run code). Any compatible checkpoint loads, also
  fine-tuned ones: a plain state dict, or one wrapped in ``"model"`` / ``"state_dict"``, with or
  without DataParallel's ``"module."`` key prefix. Nothing is downloaded here: see
  ``python -m samsem_plugin.weights download`` and :func:`sam_info`.
* ``tiny-random``: a small, **untrained** SAM assembled from segment-anything's own modules
  (:func:`build_tiny_sam`), for tests and demos; it runs through ``SamPredictor`` and
  ``SamAutomaticMaskGenerator`` unchanged, and its masks follow colour regions of the image.

Every problem with a checkpoint raises :class:`~samsem_plugin.errors.WeightsError` naming the file,
the problem, where to download the official file and which setting (``SAM_CHECKPOINT``) points to it.
"""

from __future__ import annotations

import logging
import math
import pickle
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path
from typing import Any

import torch
from segment_anything import sam_model_registry
from segment_anything.modeling import ImageEncoderViT, MaskDecoder, PromptEncoder, Sam, TwoWayTransformer
from segment_anything.modeling.image_encoder import Attention, get_rel_pos
from torch import nn
from torch.nn import functional as F

from samsem_plugin.backbones import unwrap_state_dict
from samsem_plugin.errors import WeightsError

log = logging.getLogger(__name__)

__all__ = [
    "SAM_MODEL_TYPES",
    "TINY_MODEL_TYPE",
    "SamCheckpointInfo",
    "WeightsError",
    "build_sam",
    "build_tiny_sam",
    "read_sam_checkpoint",
    "use_fused_attention",
    "sam_info",
]

TINY_MODEL_TYPE = "tiny-random"
SAM_MODEL_TYPES = ("vit_b", "vit_l", "vit_h", TINY_MODEL_TYPE)
CHECKPOINT_SETTING = "SAM_CHECKPOINT"
"""The service setting (environment variable) that names the SAM checkpoint file."""
DOWNLOAD_COMMAND = "python -m samsem_plugin.weights download --sam {model_type} --dir DIR"
OFFICIAL_BASE_URL = "https://dl.fbaipublicfiles.com/segment_anything/"
SAM_PIXEL_MEAN = (123.675, 116.28, 103.53)
SAM_PIXEL_STD = (58.395, 57.12, 57.375)
"""SAM's input normalisation (0–255 RGB), non-persistent buffers that checkpoints do not carry."""


@dataclass(frozen=True)
class SamCheckpointInfo:
    """The official checkpoint of one SAM model type.

    Attributes:
        model_type: ``"vit_b"``, ``"vit_l"`` or ``"vit_h"``.
        filename: official file name, e.g. ``"sam_vit_b_01ec64.pth"``.
        url: official download URL (Meta's ``dl.fbaipublicfiles.com``).
        md5: full MD5 hex digest. The hex suffix of the file name is its **MD5** prefix
            (``01ec64`` for ViT-B), not a SHA-256 prefix as in the torch-hub convention.
        sha256: full SHA-256 hex digest.
        size: file size in bytes.
        embed_dim: image-encoder width (768 / 1024 / 1280); identifies the architecture of a file.
    """

    model_type: str
    filename: str
    url: str
    md5: str
    sha256: str
    size: int
    embed_dim: int

    @property
    def filename_hash(self) -> str:
        """The hex suffix of the official file name (the first characters of :attr:`md5`)."""
        return self.filename.rsplit("_", 1)[1].split(".", 1)[0]


def _official(
    model_type: str, filename: str, md5: str, sha256: str, size: int, dim: int
) -> SamCheckpointInfo:
    return SamCheckpointInfo(model_type, filename, OFFICIAL_BASE_URL + filename, md5, sha256, size, dim)


# Digests and sizes as published for the official files (identical in many independent download
# scripts); the MD5 prefix is also part of each file name.
OFFICIAL_CHECKPOINTS: dict[str, SamCheckpointInfo] = {
    "vit_b": _official(
        "vit_b",
        "sam_vit_b_01ec64.pth",
        "01ec64d29a2fca3f0661936605ae66f8",
        "ec2df62732614e57411cdcf32a23ffdf28910380d03139ee0f4fcbe91eb8c912",
        375_042_383,
        768,
    ),
    "vit_l": _official(
        "vit_l",
        "sam_vit_l_0b3195.pth",
        "0b3195507c641ddb6910d2bb5adee89c",
        "3adcc4315b642a4d2101128f611684e8734c41232a17c648ed1693702a49a622",
        1_249_524_607,
        1024,
    ),
    "vit_h": _official(
        "vit_h",
        "sam_vit_h_4b8939.pth",
        "4b8939a88964f0f4ff5f5b2642c598a6",
        "a7bf3b02f3ebf1267aba913ff637d9a2d5c33d3173bb679e46d9f338c26f262e",
        2_564_550_879,
        1280,
    ),
}

StateDict = dict[str, torch.Tensor]


def _check_model_type(model_type: str) -> None:
    if model_type not in SAM_MODEL_TYPES:
        raise ValueError(f"model_type: expected one of {', '.join(SAM_MODEL_TYPES)}, got {model_type!r}")


def sam_info(model_type: str) -> dict[str, Any]:
    """Official checkpoint facts of ``model_type`` as a dict (see :class:`SamCheckpointInfo`).

    Keys: ``model_type``, ``filename``, ``url``, ``md5``, ``sha256``, ``size``, ``embed_dim`` and
    ``filename_hash`` (the MD5 prefix in the file name). ``tiny-random`` has no checkpoint: its
    dict has only ``model_type`` and ``filename``/``url`` set to ``None``.

    Raises:
        ValueError: unknown ``model_type``.
    """
    _check_model_type(model_type)
    if model_type == TINY_MODEL_TYPE:
        return {"model_type": model_type, "filename": None, "url": None}
    info = OFFICIAL_CHECKPOINTS[model_type]
    return {**asdict(info), "filename_hash": info.filename_hash}


# -- official models from a checkpoint --------------------------------------------------------------


def _where_to_get(model_type: str) -> str:
    if model_type not in OFFICIAL_CHECKPOINTS:
        return f"Point {CHECKPOINT_SETTING} at a checkpoint saved from this model type."
    info = OFFICIAL_CHECKPOINTS[model_type]
    return (
        f"Get the official {model_type} checkpoint {info.filename} from {info.url} "
        f"(or run `{DOWNLOAD_COMMAND.format(model_type=model_type)}`) and set {CHECKPOINT_SETTING} "
        "to the file's path."
    )


def _weights_error(path: Path | None, model_type: str, problem: str) -> WeightsError:
    where = "a checkpoint file is needed, none was given" if path is None else f"{problem}: {path}"
    return WeightsError(f"SAM {model_type} checkpoint: {where}. {_where_to_get(model_type)}")


def read_sam_checkpoint(path: str | Path, model_type: str = "vit_b") -> StateDict:
    """The tensors of a SAM checkpoint file as a flat state dict of CPU tensors.

    Reads with ``torch.load(path, map_location="cpu", weights_only=True)``; unwraps ``"model"`` /
    ``"state_dict"`` entries and strips a ``"module."`` prefix. ``model_type`` only shapes the
    error message.

    Raises:
        WeightsError: missing file, not a PyTorch checkpoint, a pickle with arbitrary objects
            (refused), or no tensors in it.
    """
    path = Path(path)
    if not path.is_file():
        raise _weights_error(path, model_type, "file not found" if not path.exists() else "not a file")
    try:
        raw = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        first_line = (str(error).splitlines() or [""])[0][:200]
        raise _weights_error(
            path,
            model_type,
            f"refused to unpickle it: it holds objects other than tensors ({first_line})",
        ) from error
    except Exception as error:  # corrupt / truncated / foreign files: torch raises many types
        first_line = (str(error).splitlines() or [""])[0][:200]
        raise _weights_error(
            path, model_type, f"not a readable PyTorch checkpoint ({type(error).__name__}: {first_line})"
        ) from error
    state = unwrap_state_dict(raw)
    if not state:
        raise _weights_error(path, model_type, "no tensors found in the file")
    return state


def _guess_model_type(state: StateDict) -> str | None:
    """The official model type whose encoder width matches ``state``'s patch embedding, if any."""
    patch = state.get("image_encoder.patch_embed.proj.weight")
    if patch is None or patch.ndim != 4:
        return None
    for info in OFFICIAL_CHECKPOINTS.values():
        if patch.shape[0] == info.embed_dim:
            return info.model_type
    return None


def _describe_mismatch(state: StateDict, model_state: StateDict) -> str | None:
    """What keeps ``state`` from loading strictly into a model with ``model_state``, or None."""
    missing = [k for k in model_state if k not in state]
    unexpected = [k for k in state if k not in model_state]
    wrong = [
        f"{k} {tuple(state[k].shape)} != {tuple(model_state[k].shape)}"
        for k in model_state
        if k in state and state[k].shape != model_state[k].shape
    ]
    if not (missing or unexpected or wrong):
        return None
    parts = []
    for name, items in (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong)):
        if items:
            parts.append(f"{len(items)} {name} (e.g. {', '.join(items[:3])})")
    return "wrong architecture: " + "; ".join(parts)


def load_sam_state(sam: Sam, state: StateDict, path: Path, model_type: str, assign: bool = False) -> None:
    """Load ``state`` into ``sam`` strictly (every key, every shape); floating tensors become float32.

    ``assign=True`` adopts the tensors instead of copying them (for a model built on the ``meta``
    device: no random initialisation, no second copy of the weights).

    Raises:
        WeightsError: missing / unexpected keys or shape mismatches, naming the file and, when the
            file's encoder width matches another official model type, that type.
    """
    problem = _describe_mismatch(state, sam.state_dict())
    if problem is not None:
        guess = _guess_model_type(state)
        if guess is not None and guess != model_type:
            problem += f"; the file looks like a SAM {guess} checkpoint"
        raise _weights_error(path, model_type, problem)
    state = {k: v.float() if v.is_floating_point() else v for k, v in state.items()}
    sam.load_state_dict(state, strict=True, assign=assign)


def _official_architecture(model_type: str) -> Sam:
    """segment-anything's ``model_type`` architecture on the ``meta`` device (no memory, no init)."""
    with torch.device("meta"):
        sam = sam_model_registry[model_type](checkpoint=None)
    # SAM's pixel mean/std are non-persistent buffers (not in checkpoints): make sure they are real.
    for name in ("pixel_mean", "pixel_std"):
        buffer = getattr(sam, name)
        if buffer.is_meta:
            values = SAM_PIXEL_MEAN if name == "pixel_mean" else SAM_PIXEL_STD
            sam.register_buffer(name, torch.tensor(values).view(-1, 1, 1), persistent=False)
    return sam


def build_sam(model_type: str, checkpoint: str | Path | None = None, device: str = "cpu") -> Sam:
    """A SAM model in eval mode on ``device``.

    Args:
        model_type: one of :data:`SAM_MODEL_TYPES`.
        checkpoint: path of a checkpoint file; required for ``vit_b``/``vit_l``/``vit_h``. For
            ``tiny-random`` it is optional: when given, the tiny architecture is filled from it
            (e.g. a state dict saved from :func:`build_tiny_sam`).
        device: torch device string, e.g. ``"cpu"``, ``"cuda"``, ``"cuda:1"``.

    Raises:
        ValueError: unknown ``model_type``.
        WeightsError: no checkpoint for an official type, or a checkpoint that is missing,
            unreadable, refused (arbitrary pickled objects) or of another architecture.
    """
    _check_model_type(model_type)
    if model_type == TINY_MODEL_TYPE:
        sam = build_tiny_sam()
        if checkpoint is not None:
            path = Path(checkpoint)
            load_sam_state(sam, read_sam_checkpoint(path, model_type), path, model_type)
    else:
        if checkpoint is None:
            raise _weights_error(None, model_type, "")
        path = Path(checkpoint)
        state = read_sam_checkpoint(path, model_type)
        sam = _official_architecture(model_type)
        load_sam_state(sam, state, path, model_type, assign=True)
        leftover = [name for name, t in (*sam.named_parameters(), *sam.named_buffers()) if t.is_meta]
        if leftover:  # cannot happen with a strict load; guards against segment-anything changes
            raise RuntimeError(f"SAM {model_type}: tensors left uninitialised after loading: {leftover[:5]}")
    if checkpoint is not None:
        log.info("SAM %s: loaded weights from %s", model_type, checkpoint)
    return sam.to(device).eval()


# -- faster image-encoder attention ------------------------------------------------------------------
#
# segment-anything's encoder attention materialises the full attention matrix and adds the
# decomposed relative-position terms to it: for a global block of ViT-B at 1024² that is
# 12 heads x 4096² float32 = 805 MB written and read ~5 times, and most of the encoder's time on a
# CPU. :class:`FusedAttention` computes the same function with torch's fused
# ``scaled_dot_product_attention`` (flash attention on CPU and GPU), passing the relative-position
# terms as an additive bias built a chunk of queries at a time in one reused buffer.

ATTENTION_BIAS_ELEMENTS = 2 << 20
"""Elements of the relative-position bias built at once (per chunk of heads x queries): 8 MiB in
float32, 4 MiB in bfloat16, which stays in cache while the attention kernel reads it."""


def _rel_pos_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, rel_h: torch.Tensor, rel_w: torch.Tensor
) -> torch.Tensor:
    """Softmax attention with SAM's decomposed relative-position bias, chunked.

    Args:
        q, k, v: ``(G, N, C)`` queries, keys, values (G = batch x heads, N = h x w tokens, row-major).
        rel_h: ``(G, N, h)`` bias of each query towards each key row; rel_w ``(G, N, w)`` towards
            each key column. The bias of query n to key (i, j) is ``rel_h[g, n, i] + rel_w[g, n, j]``.

    Returns:
        ``(G, N, C)`` = ``softmax(q k^T / sqrt(C) + bias) v``.
    """
    groups, tokens, _ = q.shape
    rows, cols = rel_h.shape[-1], rel_w.shape[-1]
    queries_per_chunk = max(1, min(tokens, ATTENTION_BIAS_ELEMENTS // tokens))
    groups_per_chunk = max(1, ATTENTION_BIAS_ELEMENTS // (tokens * tokens))
    buffer = q.new_empty(groups_per_chunk * queries_per_chunk * tokens)
    out = torch.empty_like(q)
    for g0 in range(0, groups, groups_per_chunk):
        g1 = min(g0 + groups_per_chunk, groups)
        for n0 in range(0, tokens, queries_per_chunk):
            n1 = min(n0 + queries_per_chunk, tokens)
            bias = buffer[: (g1 - g0) * (n1 - n0) * tokens].view(g1 - g0, n1 - n0, rows, cols)
            torch.add(rel_h[g0:g1, n0:n1, :, None], rel_w[g0:g1, n0:n1, None, :], out=bias)
            out[g0:g1, n0:n1] = F.scaled_dot_product_attention(
                q[None, g0:g1, n0:n1],
                k[None, g0:g1],
                v[None, g0:g1],
                attn_mask=bias.view(1, g1 - g0, n1 - n0, tokens),
            )[0]
    return out


class FusedAttention(Attention):
    """segment-anything's encoder ``Attention`` (same parameters, same function) computed with
    fused attention kernels; see :func:`use_fused_attention`."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, h, w, dim)`` tokens → ``(B, h, w, dim)``, as ``Attention.forward``."""
        batch, rows, cols, _ = x.shape
        tokens = rows * cols
        qkv = self.qkv(x).reshape(batch, tokens, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.reshape(3, batch * self.num_heads, tokens, -1).unbind(0)
        if self.use_rel_pos:
            grid_q = q.reshape(batch * self.num_heads, rows, cols, -1)
            rel_pos_h = get_rel_pos(rows, rows, self.rel_pos_h).to(q.dtype)
            rel_pos_w = get_rel_pos(cols, cols, self.rel_pos_w).to(q.dtype)
            rel_h = torch.einsum("bhwc,hkc->bhwk", grid_q, rel_pos_h).reshape(-1, tokens, rows)
            rel_w = torch.einsum("bhwc,wkc->bhwk", grid_q, rel_pos_w).reshape(-1, tokens, cols)
            out = _rel_pos_attention(q, k, v, rel_h.to(q.dtype), rel_w.to(q.dtype))
        else:
            out = F.scaled_dot_product_attention(q[None], k[None], v[None])[0]
        out = out.view(batch, self.num_heads, rows, cols, -1).permute(0, 2, 3, 1, 4)
        return self.proj(out.reshape(batch, rows, cols, -1))


def use_fused_attention(sam: Sam) -> Sam:
    """Switch every attention block of ``sam``'s image encoder to :class:`FusedAttention` in place.

    Same parameters and state-dict keys, same outputs up to float rounding (max abs difference
    ~1e-6 in float32); on a 2-core CPU the ViT-B encoder pass is ~1.8x faster (6.6 s vs 12.0 s).
    :class:`~samsem_plugin.proposer.SamProposer` does this to the model it is given. Returns ``sam``.
    """
    for module in sam.image_encoder.modules():
        if type(module) is Attention:
            module.__class__ = FusedAttention
    return sam


# -- the tiny toy model ------------------------------------------------------------------------------
#
# Random weights alone give masks that do not depend on the prompt and no automatic masks at SAM's
# default thresholds. So the tiny model keeps random weights where they do no harm (image-encoder
# blocks, scaled down; IoU head hidden layers) and wires the prompt path by hand, through the same
# modules a real SAM uses:
#
# 1. The image encoder makes, per 16×16 patch, a feature f = [mean RGB colour, position code]
#    (patch embedding + absolute position embedding); the neck smooths it over 3×3 patches and
#    layer-normalises it, so feature dot products are cosine similarities.
# 2. The prompt encoder's Fourier position code is restricted to a few frequencies; a positive
#    point (or box corner) token carries a marker channel.
# 3. Decoder layer 0: every output token copies the position code of the positive prompt tokens
#    (self-attention keyed on the marker), then attends to the image around that position
#    (cross-attention keyed on the position codes) and picks up the feature f there.
# 4. The hypernetwork MLPs turn that feature into mask weights, so mask logit(pixel) =
#    gamma · (cos(f(prompt), f(pixel)) − tau_k); the upscaling path passes f through
#    (nearest-neighbour upsampling kept in the linear range of GELU).
# 5. The three multimask outputs use tau = 0.95 / 0.85 / 0.7: small, medium and large nested
#    masks of "similar colour, near the prompt". The IoU head predicts about 0.92–0.95.


@dataclass(frozen=True)
class _TinyLayout:
    """Channel layout of the tiny model (see the comment above)."""

    img_size: int = 256
    patch_size: int = 16
    encoder_dim: int = 32
    dim: int = 64  # prompt / decoder width; the upscaled embedding has dim // 8 = 8 channels
    pos_frequencies: int = 8  # non-zero Fourier frequencies of the prompt position code
    feature_dim: int = 7  # 3 colour + 4 position channels; must be dim // 8 - 1
    marker: int = 8  # token channel flagging positive prompt tokens
    gamma: float = 50.0  # logit scale per unit of cosine similarity
    taus: tuple[float, float, float, float] = (0.8, 0.95, 0.85, 0.7)  # single, level 0, 1, 2
    colour_weight: float = 1.0
    position_weight: float = 0.5
    position_cycles: float = 1.0  # half-periods of the encoder position code across the image
    prompt_frequency: float = 1.5
    attention_sharpness: float = 4.0
    block_scale: float = 0.05  # random encoder blocks scaled down to keep features local
    neck_centre_weight: float = 0.5
    gelu_offset: float = 6.0  # keeps upscaling activations in GELU's linear range
    constant: float = 20.0  # constant channel pair of the upscaling path

    @property
    def position_code(self) -> list[int]:
        """Token / image-PE channels holding the sin and cos of the prompt position code."""
        half = self.dim // 2
        return list(range(self.pos_frequencies)) + list(range(half, half + self.pos_frequencies))

    @property
    def negated_position_code(self) -> list[int]:
        """Token channels holding minus the position code (keeps token means at zero)."""
        half, n = self.dim // 2, self.pos_frequencies
        return list(range(n, 2 * n)) + list(range(half + n, half + 2 * n))

    @property
    def image_feature(self) -> list[int]:
        """Image-embedding channels of f (and the next ones of −f), clear of the position code."""
        start = self.pos_frequencies
        return list(range(start, start + self.feature_dim))

    @property
    def image_negated_feature(self) -> list[int]:
        start = 2 * self.pos_frequencies
        return list(range(start, start + self.feature_dim))

    @property
    def token_feature(self) -> list[int]:
        start = 2 * self.pos_frequencies
        return list(range(start, start + self.feature_dim))

    @property
    def token_negated_feature(self) -> list[int]:
        start = 2 * self.pos_frequencies + self.feature_dim
        return list(range(start, start + self.feature_dim))


def _assemble_tiny(layout: _TinyLayout) -> Sam:
    grid = layout.img_size // layout.patch_size
    return Sam(
        image_encoder=ImageEncoderViT(
            img_size=layout.img_size,
            patch_size=layout.patch_size,
            embed_dim=layout.encoder_dim,
            depth=2,
            num_heads=2,
            mlp_ratio=4.0,
            out_chans=layout.dim,
            qkv_bias=True,
            norm_layer=partial(nn.LayerNorm, eps=1e-6),
            use_rel_pos=True,
            window_size=4,
            global_attn_indexes=(1,),
        ),
        prompt_encoder=PromptEncoder(
            embed_dim=layout.dim,
            image_embedding_size=(grid, grid),
            input_image_size=(layout.img_size, layout.img_size),
            mask_in_chans=8,
        ),
        mask_decoder=MaskDecoder(
            transformer_dim=layout.dim,
            transformer=TwoWayTransformer(depth=2, embedding_dim=layout.dim, num_heads=1, mlp_dim=64),
            num_multimask_outputs=3,
            iou_head_depth=3,
            iou_head_hidden_dim=32,
        ),
    )


def _zero(module: nn.Module) -> None:
    for parameter in module.parameters(recurse=False):
        parameter.zero_()


def _only_channels(norm: nn.Module, channels: Sequence[int]) -> None:
    """Make a LayerNorm's affine part output ``channels`` unchanged and every other channel zero."""
    norm.weight.zero_()
    norm.bias.zero_()
    norm.weight[list(channels)] = 1.0


def _wire_image_encoder(encoder: ImageEncoderViT, layout: _TinyLayout) -> None:
    """Patch features f = [mean colour, position code] and −f, layer-normalised, at fixed channels."""
    n, colours = layout.feature_dim, 3  # patch channels: colour 0-2, position 3-6, then negated
    for block in encoder.blocks:
        block.attn.proj.weight.mul_(layout.block_scale)
        block.attn.proj.bias.zero_()
        block.mlp.lin2.weight.mul_(layout.block_scale)
        block.mlp.lin2.bias.zero_()
    patch = encoder.patch_embed.proj
    _zero(patch)
    area = layout.patch_size**2
    for colour in range(colours):
        patch.weight[colour, colour] = layout.colour_weight / area
        patch.weight[n + colour, colour] = -layout.colour_weight / area
    grid = layout.img_size // layout.patch_size
    centres = (torch.arange(grid, dtype=torch.float32) + 0.5) / grid * math.pi * layout.position_cycles
    ys, xs = torch.meshgrid(centres, centres, indexing="ij")
    code = torch.stack([xs.cos(), xs.sin(), ys.cos(), ys.sin()], dim=-1) * layout.position_weight
    encoder.pos_embed.zero_()
    encoder.pos_embed[0, :, :, colours:n] = code
    encoder.pos_embed[0, :, :, n + colours : 2 * n] = -code
    project, norm1, smooth, norm2 = encoder.neck
    project.weight.zero_()
    channels = layout.image_feature + layout.image_negated_feature
    for source, target in enumerate(channels):
        project.weight[target, source] = 1.0
    smooth.weight.zero_()
    kernel = torch.full((3, 3), (1.0 - layout.neck_centre_weight) / 8)
    kernel[1, 1] = layout.neck_centre_weight
    for channel in channels:
        smooth.weight[channel, channel] = kernel
    _only_channels(norm1, channels)
    _only_channels(norm2, channels)


def _wire_prompt_encoder(encoder: PromptEncoder, layout: _TinyLayout, generator: torch.Generator) -> None:
    """Few-frequency position code; positive points and box corners carry the marker channel."""
    n = layout.pos_frequencies
    angles = torch.arange(n, dtype=torch.float32) * math.pi / n
    magnitudes = layout.prompt_frequency * (1.0 + 0.5 * torch.rand(n, generator=generator))
    frequencies = torch.zeros(2, layout.dim // 2)
    frequencies[0, :n] = magnitudes * angles.cos()
    frequencies[1, :n] = magnitudes * angles.sin()
    encoder.pe_layer.positional_encoding_gaussian_matrix.copy_(frequencies)
    for embedding in [*encoder.point_embeddings, encoder.not_a_point_embed, encoder.no_mask_embed]:
        embedding.weight.zero_()
    negative, positive, corner1, corner2 = encoder.point_embeddings
    for embedding, sign in ((negative, -1.0), (positive, 1.0), (corner1, 1.0), (corner2, 1.0)):
        embedding.weight[0, layout.marker] = sign


def _wire_transformer(transformer: TwoWayTransformer, layout: _TinyLayout) -> None:
    """Layer 0 gathers the image feature at the prompt; every other update is switched off."""
    image_channels = layout.image_feature + layout.image_negated_feature
    for layer in transformer.layers:
        for attention in (layer.self_attn, layer.cross_attn_token_to_image, layer.cross_attn_image_to_token):
            _zero(attention.out_proj)
        _zero(layer.mlp.lin2)
        _only_channels(layer.norm4, image_channels)
    _zero(transformer.final_attn_token_to_image.out_proj)
    first = transformer.layers[0]
    copy = first.self_attn  # all tokens ← position code of the positive prompt tokens
    for projection in (copy.q_proj, copy.k_proj, copy.v_proj):
        _zero(projection)
    copy.q_proj.bias[layout.marker] = 200.0
    copy.k_proj.weight[layout.marker, layout.marker] = 1.0
    for index, channel in enumerate(layout.position_code):
        copy.v_proj.weight[index, channel] = 1.0
        copy.out_proj.weight[channel, index] = 1.0
        copy.out_proj.weight[layout.negated_position_code[index], index] = -1.0
    gather = first.cross_attn_token_to_image  # tokens ← image feature around the prompt position
    for projection in (gather.q_proj, gather.k_proj, gather.v_proj):
        _zero(projection)
    for index, channel in enumerate(layout.position_code):
        gather.q_proj.weight[index, channel] = layout.attention_sharpness
        gather.k_proj.weight[index, channel] = 1.0
    for index in range(layout.feature_dim):
        gather.v_proj.weight[index, layout.image_feature[index]] = 1.0
        gather.out_proj.weight[layout.token_feature[index], index] = 1.0
        gather.out_proj.weight[layout.token_negated_feature[index], index] = -1.0
    # keep only the gathered feature: the next layer norms then make it unit-scale
    _only_channels(first.norm2, layout.token_feature + layout.token_negated_feature)


def _linear_mlp(mlp: nn.Module, weight: torch.Tensor, bias: torch.Tensor) -> None:
    """Make segment-anything's 3-layer ReLU ``MLP`` compute ``weight @ x + bias`` exactly
    (each value travels as a pair relu(v), relu(−v))."""
    outputs = weight.shape[0]
    first, second, third = mlp.layers
    for layer in (first, second, third):
        _zero(layer)
    eye = torch.eye(outputs)
    first.weight[:outputs], first.bias[:outputs] = weight, bias
    first.weight[outputs : 2 * outputs], first.bias[outputs : 2 * outputs] = -weight, -bias
    second.weight[:outputs, :outputs], second.weight[:outputs, outputs : 2 * outputs] = eye, -eye
    second.weight[outputs : 2 * outputs, :outputs] = -eye
    second.weight[outputs : 2 * outputs, outputs : 2 * outputs] = eye
    third.weight[:, :outputs], third.weight[:, outputs : 2 * outputs] = eye, -eye


def _wire_mask_head(decoder: MaskDecoder, layout: _TinyLayout, generator: torch.Generator) -> None:
    """Upscaling passes f through; hypernetworks give logit = gamma · (cos − tau); IoU ≈ 0.93."""
    n = layout.feature_dim
    decoder.iou_token.weight.zero_()
    decoder.mask_tokens.weight.zero_()
    expand, norm, _, reduce, _ = decoder.output_upscaling
    _zero(expand)
    for index, channel in enumerate(layout.image_feature):
        expand.weight[channel, index] = 1.0
        expand.weight[channel, n + index] = -1.0
    expand.bias[2 * n], expand.bias[2 * n + 1] = layout.constant, -layout.constant
    norm.weight.fill_(1.0)
    norm.bias.fill_(layout.gelu_offset)
    reduce.weight.zero_()
    reduce.bias.fill_(layout.gelu_offset)
    for index in range(n):  # output f_i = (f_i − (−f_i)) / 2 (+ offset)
        reduce.weight[index, index] = 0.5
        reduce.weight[n + index, index] = -0.5
    reduce.weight[2 * n, n], reduce.weight[2 * n + 1, n] = 0.5, -0.5  # the constant channel
    # after the normalisation the upscaled channels are f / scale + offset and constant / scale + offset
    feature_norm_sq = layout.dim / 2  # |f|² after the neck's layer norm over [f, −f]
    scale = math.sqrt((2 * feature_norm_sq + 2 * layout.constant**2) / (expand.weight.shape[1]))
    constant_channel = layout.constant / scale + layout.gelu_offset
    weight_scale = layout.gamma * scale / feature_norm_sq
    for tau, mlp in zip(layout.taus, decoder.output_hypernetworks_mlps, strict=True):
        weight = torch.zeros(n + 1, layout.dim)
        bias = torch.zeros(n + 1)
        for index, channel in enumerate(layout.token_feature):
            weight[index, channel] = weight_scale
        weight[n] = -(layout.gelu_offset / constant_channel) * weight[:n].sum(dim=0)
        bias[n] = -tau * layout.gamma / constant_channel
        _linear_mlp(mlp, weight, bias)
    last = decoder.iou_prediction_head.layers[-1]
    noise = torch.randn(last.weight.shape, generator=generator)
    last.weight.copy_(0.05 * noise / math.sqrt(last.in_features))
    last.bias.copy_(torch.tensor([0.93, 0.92, 0.94, 0.95]))


def build_tiny_sam(seed: int = 0) -> Sam:
    """A small untrained SAM (~240 k parameters, input 256 px, 16×16 embedding) for tests and demos.

    Deterministic for a given ``seed`` (it uses its own random generator state and leaves the
    global torch RNG untouched). Works with ``SamPredictor`` and ``SamAutomaticMaskGenerator``
    unchanged. Its masks are regions of similar colour near the prompt (three nested levels), so
    automatic generation returns masks at SAM's default thresholds; they are no substitute for a
    trained SAM. Logs a WARNING saying so.
    """
    log.warning(
        "SAM %r: an UNTRAINED toy model (seeded random weights, prompt path wired by hand so masks "
        "follow colour regions). For tests and demos only; use vit_b/vit_l/vit_h with a checkpoint.",
        TINY_MODEL_TYPE,
    )
    layout = _TinyLayout()
    if layout.dim // 8 != layout.feature_dim + 1:
        raise ValueError(f"tiny SAM layout: expected dim // 8 == feature_dim + 1, got {layout}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        sam = _assemble_tiny(layout)
    generator = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        _wire_image_encoder(sam.image_encoder, layout)
        _wire_prompt_encoder(sam.prompt_encoder, layout, generator)
        _wire_transformer(sam.mask_decoder.transformer, layout)
        _wire_mask_head(sam.mask_decoder, layout, generator)
    return sam.eval()
