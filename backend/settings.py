"""Environment variables → one validated, immutable :class:`Settings` object.

Every variable is parsed and checked at start-up; all problems are reported together in one
:class:`SettingsError` (each naming the variable, the bad value and what is expected), so a
misconfigured container fails at once with a message that says what to fix. An empty value
(``VAR=``) counts as unset. Secrets (``LABEL_STUDIO_API_KEY``, ``BASIC_AUTH_PASS``,
``WEBHOOK_SECRET``) never appear in ``repr``, in :meth:`Settings.describe` or in error messages.

Units: cache sizes in MiB (``*_CACHE_MB``, ``MAX_REQUEST_MB``, ``LEARN_QUEUE_MB``),
``MAX_IMAGE_BYTES`` in bytes (a ``K``/``M``/``G`` suffix, binary multiples, is accepted: ``64M``),
``MAX_IMAGE_PIXELS`` in pixels (width × height), ``FETCH_TIMEOUT`` in seconds.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

if TYPE_CHECKING:
    import torch

MIB = 1 << 20

SAM_MODEL_TYPES = ("vit_b", "vit_l", "vit_h", "tiny-random")
SAM_CHECKPOINT_FILENAMES = {
    "vit_b": "sam_vit_b_01ec64.pth",
    "vit_l": "sam_vit_l_0b3195.pth",
    "vit_h": "sam_vit_h_4b8939.pth",
}
"""Official checkpoint file names; the default ``SAM_CHECKPOINT`` is ``{WEIGHTS_DIR}/<name>``."""

DEFAULT_EMBEDDER_MODEL = "vit_small_patch14_reg4_dinov2.lvd142m"
RANDOM_WEIGHTS = "random"
"""``EMBEDDER_WEIGHTS=random``: randomly initialised backbone (tests and demos only)."""

LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
UNKNOWN_POLICIES = ("unlabelled", "drop")
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
FP16_ON_CPU = "PRECISION=fp16: expected a CUDA device, got DEVICE={device!r} (fp16 is slow on CPUs; use bf16)"
CLASSIFIER_METHODS = ("auto", "prototype", "knn")
SECRET_FIELDS = frozenset({"label_studio_api_key", "basic_auth_pass", "webhook_secret"})


class SettingsError(ValueError):
    """One or more settings are invalid; ``problems`` lists every one of them.

    Each problem names the environment variable, the bad value (never for secrets) and what is
    expected.
    """

    def __init__(self, problems: list[str]) -> None:
        self.problems = list(problems)
        count = len(self.problems)
        lines = "\n".join(f"  - {problem}" for problem in self.problems)
        super().__init__(f"invalid settings ({count} problem{'s' if count != 1 else ''}):\n{lines}")


# --------------------------------------------------------------------------------------------
# Parsers: text → value, raising ValueError on bad input (the reader adds variable and value).


def _parse_int(text: str) -> int:
    return int(text.strip())


def _parse_float(text: str) -> float:
    value = float(text.strip())
    if value != value or value in (float("inf"), float("-inf")):
        raise ValueError("not finite")
    return value


_TRUE = frozenset({"1", "true", "yes", "on"})
_FALSE = frozenset({"0", "false", "no", "off"})


def _parse_bool(text: str) -> bool:
    lowered = text.strip().lower()
    if lowered in _TRUE:
        return True
    if lowered in _FALSE:
        return False
    raise ValueError("not a boolean")


def _parse_path(text: str) -> Path:
    return Path(text.strip()).expanduser()


_SIZE_PATTERN = re.compile(r"^\s*(\d[\d_]*)\s*(?:([kmg])(?:i?b)?|b)?\s*$", re.IGNORECASE)
_SIZE_MULTIPLIERS = {None: 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30}


def _parse_size(text: str) -> int:
    """Bytes from ``"1048576"``, ``"1024K"``, ``"64M"``, ``"64MB"``, ``"64MiB"``, ``"1G"`` (binary)."""
    match = _SIZE_PATTERN.match(text)
    if match is None:
        raise ValueError("not a size")
    unit = match.group(2).lower() if match.group(2) else None
    return int(match.group(1)) * _SIZE_MULTIPLIERS[unit]


_DEVICE_PATTERN = re.compile(r"^(auto|cpu|cuda|cuda:\d+)$")


def _parse_device(text: str) -> str:
    value = text.strip().lower()
    if not _DEVICE_PATTERN.match(value):
        raise ValueError("not a device")
    return value


def _parse_url(text: str) -> str:
    value = text.strip().rstrip("/")
    parts = urlsplit(value)
    if parts.scheme not in ("http", "https") or not parts.hostname or parts.query or parts.fragment:
        raise ValueError("not an http(s) URL")
    return value


_HOST_PATTERN = re.compile(r"^(\*|(\*\.)?[a-z0-9._-]+|\[[0-9a-f:.]+\])(:\d{1,5})?$")


def _parse_hosts(text: str) -> tuple[str, ...]:
    hosts = tuple(item.strip().lower() for item in text.split(",") if item.strip())
    bad = [host for host in hosts if not _HOST_PATTERN.match(host)]
    if bad:
        raise ValueError(f"bad entries {bad}")
    return hosts


def _parse_text(text: str) -> str:
    return text.strip()


# --------------------------------------------------------------------------------------------
# The variable table: field name → environment variable, parser, range check, expectation.


@dataclass(frozen=True)
class _Var:
    env: str
    parse: Callable[[str], Any]
    expected: str
    check: Callable[[Any], bool] | None = None


def _at_least(minimum: float) -> Callable[[Any], bool]:
    return lambda value: value is None or value >= minimum


def _choice_var(env: str, options: tuple[str, ...], *, upper: bool = False) -> _Var:
    def parse(text: str) -> str:
        value = text.strip().upper() if upper else text.strip().lower()
        if value not in options:
            raise ValueError("not one of the options")
        return value

    return _Var(env, parse, f"one of {list(options)}", lambda value: value in options)


def _between(low: float, high: float) -> Callable[[Any], bool]:
    return lambda value: value is None or low <= value <= high


_UNIT = "a number between 0 and 1"

_VARS: dict[str, _Var] = {
    "sam_model_type": _choice_var("SAM_MODEL_TYPE", SAM_MODEL_TYPES),
    "sam_checkpoint": _Var("SAM_CHECKPOINT", _parse_path, "a path to a SAM checkpoint file"),
    "weights_dir": _Var("WEIGHTS_DIR", _parse_path, "a directory holding the model weights"),
    "embedder_model": _Var("EMBEDDER_MODEL", _parse_text, "a timm model name"),
    "embedder_weights": _Var(
        "EMBEDDER_WEIGHTS",
        lambda text: RANDOM_WEIGHTS if text.strip().lower() == RANDOM_WEIGHTS else _parse_path(text),
        "a path to a weights file, or 'random'",
    ),
    "embedder_multi_scale": _Var("EMBEDDER_MULTI_SCALE", _parse_bool, "true or false"),
    "embedder_long_side": _Var(
        "EMBEDDER_LONG_SIDE", _parse_int, "an integer number of pixels >= 16", _at_least(16)
    ),
    "device": _Var(
        "DEVICE", _parse_device, "auto, cpu, cuda or cuda:N", lambda v: bool(_DEVICE_PATTERN.match(v))
    ),
    "precision": _choice_var("PRECISION", PRECISIONS),
    "model_dir": _Var("MODEL_DIR", _parse_path, "a directory path"),
    "label_studio_url": _Var(
        "LABEL_STUDIO_URL", _parse_url, "an http(s) URL with scheme and host, e.g. http://label-studio:8080"
    ),
    "label_studio_api_key": _Var("LABEL_STUDIO_API_KEY", _parse_text, "a token"),
    "basic_auth_user": _Var("BASIC_AUTH_USER", _parse_text, "a user name"),
    "basic_auth_pass": _Var("BASIC_AUTH_PASS", _parse_text, "a password"),
    "webhook_secret": _Var("WEBHOOK_SECRET", _parse_text, "a shared secret string"),
    "host": _Var("HOST", _parse_text, "an interface address, e.g. 0.0.0.0"),
    "port": _Var("PORT", _parse_int, "an integer 1-65535", _between(1, 65535)),
    "workers": _Var("WORKERS", _parse_int, "an integer >= 1", _at_least(1)),
    "threads": _Var("THREADS", _parse_int, "an integer >= 1", _at_least(1)),
    "log_level": _choice_var("LOG_LEVEL", LOG_LEVELS, upper=True),
    "points_per_side": _Var("AUTO_POINTS_PER_SIDE", _parse_int, "an integer 1-256", _between(1, 256)),
    "points_per_batch": _Var("AUTO_POINTS_PER_BATCH", _parse_int, "an integer >= 1", _at_least(1)),
    "pred_iou_thresh": _Var("AUTO_PRED_IOU_THRESH", _parse_float, _UNIT, _between(0, 1)),
    "stability_score_thresh": _Var("AUTO_STABILITY_SCORE_THRESH", _parse_float, _UNIT, _between(0, 1)),
    "box_nms_thresh": _Var("AUTO_BOX_NMS_THRESH", _parse_float, _UNIT, _between(0, 1)),
    "max_regions": _Var("MAX_REGIONS", _parse_int, "an integer >= 1", _at_least(1)),
    "unknown_policy": _choice_var("UNKNOWN_POLICY", UNKNOWN_POLICIES),
    "classifier_method": _choice_var("CLASSIFIER_METHOD", CLASSIFIER_METHODS),
    "knn_k": _Var("KNN_K", _parse_int, "an integer >= 1", _at_least(1)),
    "min_margin": _Var("MIN_MARGIN", _parse_float, _UNIT, _between(0, 1)),
    "min_probability": _Var("MIN_PROBABILITY", _parse_float, _UNIT, _between(0, 1)),
    "sam_cache_mb": _Var("SAM_CACHE_MB", _parse_int, "an integer number of MiB >= 0", _at_least(0)),
    "embed_cache_mb": _Var("EMBED_CACHE_MB", _parse_int, "an integer number of MiB >= 0", _at_least(0)),
    "image_cache_mb": _Var("IMAGE_CACHE_MB", _parse_int, "an integer number of MiB >= 0", _at_least(0)),
    "proposal_cache_mb": _Var("PROPOSAL_CACHE_MB", _parse_int, "an integer number of MiB >= 0", _at_least(0)),
    "max_image_pixels": _Var(
        "MAX_IMAGE_PIXELS", _parse_int, "an integer number of pixels >= 1", _at_least(1)
    ),
    "max_image_bytes": _Var(
        "MAX_IMAGE_BYTES", _parse_size, "a size in bytes >= 1 (suffix K/M/G allowed, e.g. 64M)", _at_least(1)
    ),
    "allowed_image_hosts": _Var(
        "ALLOWED_IMAGE_HOSTS",
        _parse_hosts,
        "a comma-separated list of host names (host, host:port, *.domain, or * for any public host)",
    ),
    "allow_private_image_hosts": _Var("ALLOW_PRIVATE_IMAGE_HOSTS", _parse_bool, "true or false"),
    "local_files_root": _Var("LOCAL_FILES_DOCUMENT_ROOT", _parse_path, "a directory path"),
    "fetch_timeout": _Var("FETCH_TIMEOUT", _parse_float, "a number of seconds > 0", lambda v: v > 0),
    "max_request_mb": _Var("MAX_REQUEST_MB", _parse_int, "an integer number of MiB >= 1", _at_least(1)),
    "queue_max": _Var("LEARN_QUEUE_MAX", _parse_int, "an integer >= 1", _at_least(1)),
    "queue_max_mb": _Var("LEARN_QUEUE_MB", _parse_int, "an integer number of MiB >= 1", _at_least(1)),
    "prefetch_sam_embedding": _Var("PREFETCH_SAM_EMBEDDING", _parse_bool, "true or false"),
}


@dataclass(frozen=True)
class Settings:
    """All service settings (field ← environment variable, default).

    Models: ``sam_model_type`` ← SAM_MODEL_TYPE ("vit_b"; vit_b | vit_l | vit_h | tiny-random);
    ``weights_dir`` ← WEIGHTS_DIR (default ``{model_dir}/weights``);
    ``sam_checkpoint`` ← SAM_CHECKPOINT (default ``{weights_dir}/sam_vit_b_01ec64.pth`` and
    likewise per type; ``None`` for tiny-random); ``embedder_model`` ← EMBEDDER_MODEL;
    ``embedder_weights`` ← EMBEDDER_WEIGHTS (a ``Path`` or the string ``"random"``; default
    ``{weights_dir}/{embedder_model}.safetensors``); ``embedder_multi_scale`` ←
    EMBEDDER_MULTI_SCALE (CNN backbones: also pool the stride-16 and stride-8 stages; false);
    ``embedder_long_side`` ← EMBEDDER_LONG_SIDE (pixels, ``None`` = the embedder's default);
    ``device`` ← DEVICE
    (auto | cpu | cuda | cuda:N, see :meth:`resolved_device`); ``precision`` ← PRECISION (auto |
    fp32 | bf16 | fp16, see :meth:`autocast_dtype`); ``model_dir`` ← MODEL_DIR.

    Label Studio and auth: ``label_studio_url`` ← LABEL_STUDIO_URL (with scheme, no trailing
    slash); ``label_studio_api_key`` ← LABEL_STUDIO_API_KEY (legacy token or personal access
    token); ``basic_auth_user``/``basic_auth_pass`` ← BASIC_AUTH_USER/BASIC_AUTH_PASS (both or
    neither); ``webhook_secret`` ← WEBHOOK_SECRET (required with basic auth: Label Studio's
    webhooks carry no basic-auth credentials).

    Server: ``host``, ``port``, ``workers``, ``threads``, ``log_level``, ``max_request_mb``.

    Automatic masks: ``points_per_side``, ``points_per_batch``, ``pred_iou_thresh``,
    ``stability_score_thresh``, ``box_nms_thresh`` (AUTO_* variables), ``max_regions``.

    Classifier: ``unknown_policy`` (unlabelled | drop), ``classifier_method`` (auto | prototype |
    knn), ``knn_k``, ``min_margin`` and ``min_probability`` (``None`` = the library's default).

    Caches (MiB): ``sam_cache_mb``, ``embed_cache_mb``, ``image_cache_mb``, ``proposal_cache_mb``
    (embedded automatic proposals per image).

    Images: ``max_image_pixels`` (width × height), ``max_image_bytes`` (bytes),
    ``allowed_image_hosts`` (lower-case host names besides Label Studio's; ``"*"`` = any public
    host), ``allow_private_image_hosts``, ``local_files_root`` ← LOCAL_FILES_DOCUMENT_ROOT,
    ``fetch_timeout`` (seconds).

    Learning: ``queue_max`` ← LEARN_QUEUE_MAX (jobs waiting), ``queue_max_mb`` ← LEARN_QUEUE_MB
    (MiB of webhook bodies waiting), ``prefetch_sam_embedding`` ← PREFETCH_SAM_EMBEDDING.

    Constructing directly (tests) applies the same checks as :meth:`from_env` and raises
    :class:`SettingsError`.
    """

    sam_model_type: str = "vit_b"
    sam_checkpoint: Path | None = None
    weights_dir: Path | None = None
    embedder_model: str = DEFAULT_EMBEDDER_MODEL
    embedder_weights: Path | str | None = None
    embedder_long_side: int | None = None
    embedder_multi_scale: bool = False
    device: str = "auto"
    precision: str = "auto"
    model_dir: Path = Path("./model_dir")
    label_studio_url: str | None = None
    label_studio_api_key: str | None = field(default=None, repr=False)
    basic_auth_user: str | None = None
    basic_auth_pass: str | None = field(default=None, repr=False)
    webhook_secret: str | None = field(default=None, repr=False)
    host: str = "0.0.0.0"
    port: int = 9090
    workers: int = 1
    threads: int = 8
    log_level: str = "INFO"
    points_per_side: int = 32
    points_per_batch: int = 64
    pred_iou_thresh: float = 0.88
    stability_score_thresh: float = 0.95
    box_nms_thresh: float = 0.7
    max_regions: int = 50
    unknown_policy: str = "unlabelled"
    classifier_method: str = "auto"
    knn_k: int = 5
    min_margin: float | None = None
    min_probability: float | None = None
    sam_cache_mb: int = 1024
    embed_cache_mb: int = 256
    image_cache_mb: int = 256
    proposal_cache_mb: int = 256
    max_image_pixels: int = 50_000_000
    max_image_bytes: int = 64 * MIB
    allowed_image_hosts: tuple[str, ...] = ()
    allow_private_image_hosts: bool = False
    local_files_root: Path | None = None
    fetch_timeout: float = 30.0
    max_request_mb: int = 64
    queue_max: int = 10_000
    queue_max_mb: int = 256
    prefetch_sam_embedding: bool = True

    def __post_init__(self) -> None:
        object.__setattr__(self, "model_dir", Path(self.model_dir))
        object.__setattr__(self, "allowed_image_hosts", tuple(self.allowed_image_hosts))
        weights_dir = self.model_dir / "weights" if self.weights_dir is None else Path(self.weights_dir)
        object.__setattr__(self, "weights_dir", weights_dir)
        if self.sam_checkpoint is None and self.sam_model_type in SAM_CHECKPOINT_FILENAMES:
            default = weights_dir / SAM_CHECKPOINT_FILENAMES[self.sam_model_type]
            object.__setattr__(self, "sam_checkpoint", default)
        if self.embedder_weights is None:
            default = weights_dir / f"{self.embedder_model}.safetensors"
            object.__setattr__(self, "embedder_weights", default)
        elif self.embedder_weights != RANDOM_WEIGHTS:
            object.__setattr__(self, "embedder_weights", Path(self.embedder_weights))
        problems = self._value_problems()
        if problems:
            raise SettingsError(problems)

    # ---------------------------------------------------------------- construction

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Settings:
        """Parse every variable of ``env`` (``None`` → ``os.environ``).

        Raises:
            SettingsError: listing every unparsable, out-of-range or inconsistent variable.
        """
        env = os.environ if env is None else env
        values: dict[str, Any] = {}
        problems: list[str] = []
        for name, var in _VARS.items():
            raw = env.get(var.env, "")
            if raw.strip() == "":
                continue
            try:
                values[name] = var.parse(raw)
            except ValueError:
                shown = "<hidden>" if name in SECRET_FIELDS else repr(raw)
                problems.append(f"{var.env}={shown}: expected {var.expected}")
        try:
            settings = cls(**values)
        except SettingsError as error:
            problems.extend(error.problems)
        if problems:
            raise SettingsError(problems)
        return settings

    def _value_problems(self) -> list[str]:
        problems = []
        for name, var in _VARS.items():
            value = getattr(self, name)
            if var.check is not None and value is not None and not _passes(var.check, value):
                shown = "<hidden>" if name in SECRET_FIELDS else repr(value)
                problems.append(f"{var.env}={shown}: expected {var.expected}")
        if bool(self.basic_auth_user) != bool(self.basic_auth_pass):
            names = ("BASIC_AUTH_USER", "BASIC_AUTH_PASS")
            given, missing = names if self.basic_auth_user else names[::-1]
            problems.append(f"{missing}: expected to be set because {given} is set (basic auth needs both)")
        if self.basic_auth_enabled and not self.webhook_secret:
            problems.append(
                "WEBHOOK_SECRET: expected to be set when BASIC_AUTH_USER/BASIC_AUTH_PASS are set, because "
                "Label Studio's webhooks carry no basic-auth credentials; add the header "
                "'X-Samsem-Webhook-Secret: <secret>' to the project's webhook in Label Studio"
            )
        if self.precision == "fp16" and self.device == "cpu":
            problems.append(FP16_ON_CPU.format(device=self.device))
        return problems

    # ---------------------------------------------------------------- derived values

    @property
    def basic_auth_enabled(self) -> bool:
        """True when both BASIC_AUTH_USER and BASIC_AUTH_PASS are set."""
        return bool(self.basic_auth_user and self.basic_auth_pass)

    @property
    def sam_cache_bytes(self) -> int:
        return self.sam_cache_mb * MIB

    @property
    def embed_cache_bytes(self) -> int:
        return self.embed_cache_mb * MIB

    @property
    def image_cache_bytes(self) -> int:
        return self.image_cache_mb * MIB

    @property
    def proposal_cache_bytes(self) -> int:
        return self.proposal_cache_mb * MIB

    @property
    def max_request_bytes(self) -> int:
        return self.max_request_mb * MIB

    @property
    def queue_max_bytes(self) -> int:
        return self.queue_max_mb * MIB

    def classifier_options(self) -> dict[str, Any]:
        """Keyword arguments for ``samsem_plugin.classifier.ClassifierSettings``.

        Only knobs that were set are included for ``min_margin``/``min_probability`` (so the
        library's defaults apply otherwise).
        """
        options: dict[str, Any] = {
            "method": self.classifier_method,
            "knn_k": self.knn_k,
            "unknown_policy": self.unknown_policy,
        }
        if self.min_margin is not None:
            options["min_margin"] = self.min_margin
        if self.min_probability is not None:
            options["min_probability"] = self.min_probability
        return options

    def resolved_device(self) -> str:
        """The torch device to use: ``"cpu"``, ``"cuda"`` or ``"cuda:N"``.

        ``auto`` → ``"cuda"`` when torch sees a GPU, else ``"cpu"``. Imports torch; call it after
        fork (in the worker), never in the master process.

        Raises:
            SettingsError: DEVICE asks for a GPU torch cannot see.
        """
        import torch

        available = torch.cuda.is_available()
        if self.device == "auto":
            return "cuda" if available else "cpu"
        if self.device.startswith("cuda"):
            count = torch.cuda.device_count() if available else 0
            index = int(self.device.split(":", 1)[1]) if ":" in self.device else 0
            if index >= count:
                raise SettingsError(
                    [f"DEVICE={self.device!r}: expected a visible GPU, but torch sees {count} CUDA device(s)"]
                )
        return self.device

    def autocast_dtype(self, device: str) -> torch.dtype | None:
        """The ``torch.autocast`` dtype of the model passes on ``device`` (``None`` = float32).

        ``auto``: float32 on CPU (exact; ``bf16`` is ~1.7-2x faster on CPUs with AVX512-BF16/AMX,
        at a mask-embedding cosine >= 0.99 of float32, see the benchmarks), bfloat16 on GPUs that
        support it, else float16. ``fp16`` on CPU is refused (slower than float32 there).

        Raises:
            SettingsError: PRECISION=fp16 with a CPU device.
        """
        import torch

        on_gpu = device.startswith("cuda")
        choice = self.precision
        if choice == "auto":
            if not on_gpu:
                return None
            choice = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        if choice == "fp16" and not on_gpu:
            raise SettingsError([FP16_ON_CPU.format(device=device)])
        return {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[choice]

    def validate_files(self) -> None:
        """Check that the files and directories the settings point to exist (call at start).

        Raises:
            SettingsError: listing each missing checkpoint / weights file / directory, with the
                variable to set and how to get the file.
        """
        problems = []
        download = f"python -m samsem_plugin.weights download --dir {self.weights_dir}"
        if self.sam_model_type in SAM_CHECKPOINT_FILENAMES and not _is_file(self.sam_checkpoint):
            problems.append(
                f"SAM_CHECKPOINT={str(self.sam_checkpoint)!r}: expected an existing SAM "
                f"{self.sam_model_type} checkpoint file; download it with "
                f"`{download} --sam {self.sam_model_type}` or set SAM_CHECKPOINT"
            )
        if self.embedder_weights != RANDOM_WEIGHTS and not _is_file(self.embedder_weights):
            problems.append(
                f"EMBEDDER_WEIGHTS={str(self.embedder_weights)!r}: expected an existing weights file for "
                f"{self.embedder_model}; download it with `{download} --dinov2 {self.embedder_model}`, "
                f"set EMBEDDER_WEIGHTS, or EMBEDDER_WEIGHTS=random (tests only)"
            )
        if self.model_dir.exists() and not self.model_dir.is_dir():
            problems.append(f"MODEL_DIR={str(self.model_dir)!r}: expected a directory, found a file")
        if self.local_files_root is not None and not self.local_files_root.is_dir():
            problems.append(
                f"LOCAL_FILES_DOCUMENT_ROOT={str(self.local_files_root)!r}: expected an existing directory"
            )
        if problems:
            raise SettingsError(problems)

    def describe(self) -> dict[str, Any]:
        """All settings as a JSON-able dict for the start-up log; secrets shown as ``"***"``."""
        description: dict[str, Any] = {}
        for item in fields(self):
            value = getattr(self, item.name)
            if item.name in SECRET_FIELDS:
                value = "***" if value else None
            elif isinstance(value, Path):
                value = str(value)
            elif isinstance(value, tuple):
                value = list(value)
            description[item.name] = value
        return description


def _passes(check: Callable[[Any], bool], value: Any) -> bool:
    try:
        return bool(check(value))
    except TypeError:  # a wrongly typed value passed to the constructor directly
        return False


def _is_file(path: Path | str | None) -> bool:
    return path is not None and Path(path).is_file()
