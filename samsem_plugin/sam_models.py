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
from segment_anything.modeling.image_encoder import Attention, Block, get_rel_pos
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


# -- faster image encoder ----------------------------------------------------------------------------
#
# segment-anything's encoder attention materialises the full attention matrix and adds the
# decomposed relative-position terms to it: for a global block of ViT-B at 1024² that is
# 12 heads x 4096² float32 = 805 MB written and read ~5 times, and most of the encoder's time on a
# CPU. :class:`FusedAttention` computes the same function with torch's fused
# ``scaled_dot_product_attention`` (flash attention on CPU and GPU), passing the relative-position
# terms as an additive bias built a chunk of queries at a time in one reused buffer.
#
# Its windowed blocks (ViT-B at 1024²: 64x64 tokens in 14x14 windows) pad the token grid to 70x70
# before the qkv projection and crop after the output projection, so 20 % of the qkv/proj work is
# spent on padding tokens, and partitioning costs four copies. :class:`FusedBlock` runs the
# per-token work (LayerNorms, qkv, proj, MLP) on the 4096 real tokens only and pads in one copy of
# the qkv output into the window layout: a padding token's q, k and v are the qkv bias (the
# projection of the zero vector that segment-anything pads with), exactly as in the stock code.

ATTENTION_BIAS_ELEMENTS = 1 << 24
"""Elements of the relative-position bias built at once (per chunk of windows x heads x queries):
64 MiB in float32, 32 MiB in bfloat16: one head of a ViT-B global block at 1024² (4096² tokens).
Fewer, larger chunks beat cache-sized ones (2 << 20) on a loaded 2-core machine, where every
parallel region waits for both threads to be scheduled: ViT-B fp32 encoder pass 13.1 s vs 18.1 s
under load 4, and as fast when idle."""


def _rel_pos_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    rel_h: torch.Tensor,
    rel_w: torch.Tensor,
    out: torch.Tensor,
    workspace: _Workspace | None = None,
) -> torch.Tensor:
    """Softmax attention with SAM's decomposed relative-position bias, chunked, written into ``out``.

    Args:
        q, k, v: ``(B, heads, N, C)`` queries, keys, values (N = h x w tokens, row-major); any
            strides with the last dimension contiguous (views into the qkv projection's output).
        rel_h: ``(B, heads, N, h)`` bias of each query towards each key row; rel_w ``(B, heads, N, w)``
            towards each key column. The bias of query n to key (i, j) is
            ``rel_h[b, g, n, i] + rel_w[b, g, n, j]``.
        out: ``(B, heads, N, C)`` result (any strides), ``softmax(q k^T / sqrt(C) + bias) v``.
        workspace: where the bias chunk buffer (up to :data:`ATTENTION_BIAS_ELEMENTS` elements)
            comes from; a fresh buffer of that size is a fresh ``mmap`` whose first touch costs
            about twice the bias sums themselves.

    Returns:
        ``out``.
    """
    batch, heads, tokens, _ = q.shape
    rows, cols = rel_h.shape[-1], rel_w.shape[-1]
    budget = ATTENTION_BIAS_ELEMENTS
    per_head = tokens * tokens
    if heads * per_head <= budget:  # whole windows at a time (windowed blocks)
        batch_step, head_step, query_step = max(1, budget // (heads * per_head)), heads, tokens
    elif per_head <= budget:
        batch_step, head_step, query_step = 1, budget // per_head, tokens
    else:  # a chunk of queries of one head (global blocks)
        batch_step, head_step, query_step = 1, 1, max(1, budget // tokens)
    size = min(batch_step, batch) * min(head_step, heads) * query_step * tokens
    buffer = q.new_empty(size) if workspace is None else workspace.get("attention_bias", (size,), q)
    for b0 in range(0, batch, batch_step):
        b1 = min(b0 + batch_step, batch)
        for h0 in range(0, heads, head_step):
            h1 = min(h0 + head_step, heads)
            for n0 in range(0, tokens, query_step):
                n1 = min(n0 + query_step, tokens)
                shape = (b1 - b0, h1 - h0, n1 - n0)
                bias = buffer[: math.prod(shape) * tokens].view(*shape, rows, cols)
                chunk = (slice(b0, b1), slice(h0, h1), slice(n0, n1))
                torch.add(rel_h[chunk][..., None], rel_w[chunk][..., None, :], out=bias)
                out[chunk] = F.scaled_dot_product_attention(
                    q[chunk], k[b0:b1, h0:h1], v[b0:b1, h0:h1], attn_mask=bias.view(*shape, tokens)
                )
    return out


class FusedAttention(Attention):
    """segment-anything's encoder ``Attention`` (same parameters, same function) computed with
    fused attention kernels when gradients are off; see :func:`use_fused_attention`."""

    def _rel_pos_tables(self, rows: int, cols: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``get_rel_pos`` of the row and column tables: ``(rows, rows, C)``, ``(cols, cols, C)``.

        With gradients off they are computed once per grid size and kept until a table changes
        (in-place update, ``load_state_dict``, a move to another device: keyed on the tensors'
        version counters and storage); with gradients on they are computed on every call.
        """
        if torch.is_grad_enabled():
            return get_rel_pos(rows, rows, self.rel_pos_h), get_rel_pos(cols, cols, self.rel_pos_w)
        key = (rows, cols, *((t._version, t.data_ptr(), t.dtype) for t in (self.rel_pos_h, self.rel_pos_w)))
        cached = self.__dict__.get("_rel_pos_cache")
        if cached is None or cached[0] != key:
            tables = get_rel_pos(rows, rows, self.rel_pos_h), get_rel_pos(cols, cols, self.rel_pos_w)
            cached = self.__dict__["_rel_pos_cache"] = (key, tables)
        return cached[1]

    def attend(
        self, qkv: torch.Tensor, out: torch.Tensor | None = None, workspace: _Workspace | None = None
    ) -> torch.Tensor:
        """Attention of ``(B, h, w, 3 x dim)`` contiguous qkv projections (q, k, v heads along the
        last dimension, as ``self.qkv`` makes them) → ``(B, h, w, dim)`` contiguous, before ``proj``
        (written into ``out`` if given: ``B x h x w x dim`` elements, contiguous; the bias buffer
        taken from ``workspace`` if given)."""
        batch, rows, cols, _ = qkv.shape
        tokens = rows * cols
        q, k, v = qkv.view(batch, tokens, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
        shape = (batch, tokens, self.num_heads, q.shape[-1])
        out = qkv.new_empty(shape) if out is None else out.view(shape)
        heads_out = out.transpose(1, 2)  # (B, heads, N, C) view: the heads land side by side
        if self.use_rel_pos:
            table_h, table_w = self._rel_pos_tables(rows, cols)
            grid_q = q.unflatten(2, (rows, cols))
            rel_h = torch.einsum("bnhwc,hkc->bnhwk", grid_q, table_h.to(q.dtype))
            rel_w = torch.einsum("bnhwc,wkc->bnhwk", grid_q, table_w.to(q.dtype))
            _rel_pos_attention(
                q,
                k,
                v,
                rel_h.reshape(batch, self.num_heads, tokens, rows).to(q.dtype),
                rel_w.reshape(batch, self.num_heads, tokens, cols).to(q.dtype),
                heads_out,
                workspace,
            )
        else:
            heads_out.copy_(F.scaled_dot_product_attention(q, k, v))
        return out.view(batch, rows, cols, -1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, h, w, dim)`` tokens → ``(B, h, w, dim)``, as ``Attention.forward`` (which runs
        when gradients are on: the chunked bias is built with ``out=`` and has no gradient)."""
        if torch.is_grad_enabled():
            return super().forward(x)
        return self.proj(self.attend(self.qkv(x).contiguous()))


def _window_pieces(size: int, window: int) -> list[tuple[slice, slice, int]]:
    """Pieces of one grid axis: (grid slice, window-index slice, tokens per window) for the full
    windows, then for the last, partial window if ``window`` does not divide ``size``."""
    full, rest = divmod(size, window)
    pieces = [(slice(0, full * window), slice(0, full), window)] if full else []
    if rest:
        pieces.append((slice(full * window, size), slice(full, full + 1), rest))
    return pieces


def _copy_windows(grid: torch.Tensor, windows: torch.Tensor, window: int, to_windows: bool) -> None:
    """Copy the real tokens between ``grid`` ``(B, H, W, C)`` and ``windows``, a
    ``(B, H_windows, window, W_windows, window, C)`` view of the padded window layout (up to four
    strided copies: full windows, right edge, bottom edge, corner)."""
    for grid_rows, window_rows, row_len in _window_pieces(grid.shape[1], window):
        for grid_cols, window_cols, col_len in _window_pieces(grid.shape[2], window):
            part = windows[:, window_rows, :row_len, window_cols, :col_len]
            block = grid[:, grid_rows, grid_cols].unflatten(2, (-1, col_len)).unflatten(1, (-1, row_len))
            if to_windows:
                part.copy_(block)
            else:
                block.copy_(part)


def _partition(
    grid: torch.Tensor, window: int, fill: torch.Tensor | None, out: torch.Tensor | None = None
) -> torch.Tensor:
    """``(B, H, W, C)`` → ``(B x windows, window, window, C)`` (segment-anything's window order,
    written into ``out`` if given); padding tokens are ``fill`` ``(C,)`` (zeros if ``None``)."""
    batch, rows, cols, channels = grid.shape
    window_rows, window_cols = -(-rows // window), -(-cols // window)
    shape = (batch, window_rows, window_cols, window, window, channels)
    windows = grid.new_empty(shape) if out is None else out.view(shape)
    view = windows.permute(0, 1, 3, 2, 4, 5)
    pad_rows, pad_cols = window_rows * window - rows, window_cols * window - cols
    value = 0.0 if fill is None else fill.to(grid.dtype)
    if pad_rows:
        view[:, -1, window - pad_rows :] = value
    if pad_cols:
        view[:, :, :, -1, window - pad_cols :] = value
    _copy_windows(grid, view, window, to_windows=True)
    return windows.view(-1, window, window, channels)


def _unpartition(
    windows: torch.Tensor, window: int, rows: int, cols: int, out: torch.Tensor | None = None
) -> torch.Tensor:
    """Inverse of :func:`_partition`: ``(B x windows, window, window, C)`` → ``(B, rows, cols, C)``
    (padding tokens dropped; written into ``out`` if given)."""
    window_rows, window_cols = -(-rows // window), -(-cols // window)
    channels = windows.shape[-1]
    view = windows.view(-1, window_rows, window_cols, window, window, channels).permute(0, 1, 3, 2, 4, 5)
    shape = (view.shape[0], rows, cols, channels)
    grid = windows.new_empty(shape) if out is None else out.view(shape)
    _copy_windows(grid, view, window, to_windows=False)
    return grid


class _Workspace:
    """Flat buffers reused by the blocks of one encoder pass, one per role.

    A fresh tensor of tens of MB is a fresh ``mmap`` (glibc), and first touching its pages costs
    about as much as writing it three more times; reusing buffers pays that once per pass.
    """

    def __init__(self) -> None:
        self._buffers: dict[str, torch.Tensor] = {}

    def get(self, role: str, shape: tuple[int, ...], like: torch.Tensor) -> torch.Tensor:
        """An uninitialised contiguous ``shape`` tensor of ``like``'s dtype and device."""
        size = math.prod(shape)
        buffer = self._buffers.get(role)
        if (
            buffer is None
            or buffer.numel() < size
            or buffer.dtype != like.dtype
            or buffer.device != like.device
        ):
            buffer = self._buffers[role] = like.new_empty(size)
        return buffer[:size].view(shape)


def _linear(
    x: torch.Tensor, linear: nn.Linear, dtype: torch.dtype, out: torch.Tensor, accumulate: bool = False
) -> torch.Tensor:
    """``(n, in)`` → ``linear(x)`` ``(n, out)`` computed in ``dtype`` (weights cast if needed):
    written into ``out``, or with ``accumulate`` added to ``out`` in place (``out`` keeps its dtype)."""
    weight = linear.weight.to(dtype)
    bias = None if linear.bias is None else linear.bias.to(dtype)
    if accumulate and out.dtype == dtype:
        out.addmm_(x, weight.t())  # out += x W^T: the GEMM accumulates in place, no temporary
        return out if bias is None else out.add_(bias)
    if accumulate:  # a float32 residual stream gets a bfloat16 update: as the stock code under autocast
        return out.add_(F.linear(x, weight, bias))
    if bias is None:
        return torch.mm(x, weight.t(), out=out)
    return torch.addmm(bias, x, weight.t(), out=out)


class FusedBlock(Block):
    """segment-anything's encoder ``Block`` (same parameters, same function) that, with gradients
    off and a :class:`FusedAttention`, does its per-token work on the real tokens only, in reused
    buffers; see :func:`use_fused_attention`. Otherwise (training, or the attention switched back
    to segment-anything's) it is ``Block``."""

    def fast_path(self) -> bool:
        """True when :meth:`update_` applies: gradients off and a :class:`FusedAttention`."""
        return not torch.is_grad_enabled() and type(self.attn) is FusedAttention

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, H, W, dim)`` tokens → ``(B, H, W, dim)``, as ``Block.forward``."""
        if not self.fast_path():
            return super().forward(x)
        return self.update_(x.clone(memory_format=torch.contiguous_format), _Workspace())

    def update_(self, x: torch.Tensor, workspace: _Workspace) -> torch.Tensor:
        """The block applied in place to contiguous ``(B, H, W, dim)`` tokens ``x`` (the residual
        stream; float32 also under autocast, whose dtype the matrix products and attention use).
        Returns ``x``."""
        dtype = x.dtype
        if torch.is_autocast_enabled(x.device.type):
            dtype = torch.get_autocast_dtype(x.device.type)
        with torch.autocast(x.device.type, enabled=False):
            return self._update(x, workspace, dtype)

    def _update(self, x: torch.Tensor, workspace: _Workspace, dtype: torch.dtype) -> torch.Tensor:
        batch, rows, cols, dim = x.shape
        tokens = x.view(-1, dim)  # (n, dim), n = B x H x W real tokens
        count = tokens.shape[0]
        attn, mlp = self.attn, self.mlp
        like = tokens.new_empty(0, dtype=dtype)

        normed = self.norm1(tokens).to(dtype)
        qkv = _linear(normed, attn.qkv, dtype, workspace.get("qkv", (count, 3 * dim), like))
        qkv = qkv.view(batch, rows, cols, 3 * dim)
        if self.window_size > 0:
            window = self.window_size
            padded = batch * (-(-rows // window) * window) * (-(-cols // window) * window)
            windows = _partition(
                qkv, window, attn.qkv.bias, workspace.get("windows", (padded, 3 * dim), like)
            )
            heads_out = attn.attend(windows, workspace.get("attention", (padded, dim), like), workspace)
            out = _unpartition(
                heads_out, window, rows, cols, workspace.get("attention_grid", (count, dim), like)
            )
        else:
            out = attn.attend(qkv, workspace.get("attention", (count, dim), like), workspace)
        _linear(out.view(count, dim), attn.proj, dtype, tokens, accumulate=True)

        normed = self.norm2(tokens).to(dtype)
        hidden = _linear(
            normed, mlp.lin1, dtype, workspace.get("hidden", (count, mlp.lin1.out_features), like)
        )
        if type(mlp.act) is nn.GELU:
            torch._C._nn.gelu_(hidden, approximate=mlp.act.approximate)
        else:
            hidden = mlp.act(hidden)
        _linear(hidden, mlp.lin2, dtype, tokens, accumulate=True)
        return x


class FusedImageEncoder(ImageEncoderViT):
    """segment-anything's ``ImageEncoderViT`` (same parameters, same function) that runs its
    :class:`FusedBlock` s in place on one contiguous ``(B, H, W, dim)`` residual stream with shared
    buffers, and hands its neck contiguous ``(B, dim, H, W)`` features.

    The stock encoder keeps the patch embedding's ``(B, dim, H, W)`` memory order throughout (a
    permuted view), so its neck convolutions read plain NCHW memory; a permuted view of
    ``(B, H, W, dim)``-contiguous tokens would run the neck's convolutions in oneDNN's channels-last
    mode, about 5x less accurate in float32 (1e-5 vs 2e-6 max abs error against float64 on ViT-B).
    Hence the explicit layouts.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, 3, S, S)`` normalised pixels → ``(B, out_chans, S / 16, S / 16)``."""
        x = self.patch_embed(x)
        if self.pos_embed is not None:
            x = x + self.pos_embed
        x = x.contiguous()
        workspace = _Workspace()
        for block in self.blocks:
            if isinstance(block, FusedBlock) and block.fast_path():
                x = block.update_(x, workspace)
            else:
                x = block(x)
        return self.neck(x.permute(0, 3, 1, 2).contiguous())


def use_fused_attention(sam: Sam) -> Sam:
    """Switch ``sam``'s image encoder to :class:`FusedImageEncoder`, :class:`FusedBlock` and
    :class:`FusedAttention` in place (the fast code runs with gradients off; with gradients on it is
    segment-anything's own code).

    Same parameters and state-dict keys, same outputs up to float rounding: on ViT-B at 1024² the
    max abs difference to the stock encoder is ~3e-6 in float32, the same as the stock encoder's
    own float32 error against float64 (2.9e-6 vs 3.4e-6 for ours). Under bfloat16 autocast it
    computes bit for bit what the previous fused attention did (max abs difference to float32
    4.5e-2, embeddings of magnitude ~5). On this 2-core CPU (shared, load ~4) the ViT-B float32
    pass is 1.7x faster than the stock encoder (12.4 s vs 20.3 s, interleaved) and ~1.4x faster
    than the fused attention alone (13.1 s vs 18.1 s); under bfloat16 autocast 2x faster than the
    fused attention alone (8.2 s vs 17.0 s). :class:`~samsem_plugin.proposer.SamProposer` does this
    to the model it is given. Returns ``sam``.
    """
    for module in sam.image_encoder.modules():
        if type(module) is Attention:
            module.__class__ = FusedAttention
        elif type(module) is Block:
            module.__class__ = FusedBlock
        elif type(module) is ImageEncoderViT:
            module.__class__ = FusedImageEncoder
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
