"""Task images: URL → ``(H, W, 3) uint8`` RGB array, EXIF orientation applied.

Where an image comes from, by the form of the URL in the task data:

* ``/data/upload/...`` and other relative paths → ``LABEL_STUDIO_URL`` + path, with Label Studio
  auth;
* ``/data/local-files/?d=<path>`` → read from ``local_files_root`` when set and the file exists
  under it (no path traversal), else through Label Studio; plain absolute paths under
  ``local_files_root`` are read from disk too;
* ``s3://``, ``gs://``, ``azure-blob://`` → ``{LS}/tasks/{task_id}/presign/?fileuri=<urlsafe
  base64 of the URI>`` with auth; Label Studio answers with a redirect to the storage, which is
  followed WITHOUT the token;
* ``http(s)://`` → only Label Studio's own origin or ``allowed_hosts``; a host resolving to a
  private / loopback / link-local address is refused unless ``allow_private_hosts``;
* ``data:`` URIs (base64 or percent-encoded) with the same size limits.

Auth (:class:`LabelStudioAuth`): a legacy token is sent as ``Authorization: Token <key>``; a
personal access token (a JWT whose payload has ``"token_type": "refresh"``) is exchanged at
``POST {LS}/api/token/refresh/`` for an access token sent as ``Authorization: Bearer <access>``,
cached until it expires and refreshed once on a 401. The header goes only to Label Studio's
origin (scheme, host and port equal), never along redirects to other hosts. Tokens never appear in
logs or errors; URLs in logs and errors have credentials and signature-like query values masked.

Limits: ``max_bytes`` while streaming, ``timeout`` seconds per connect/read and for the whole
download, ``max_pixels`` (width × height) checked from the header before decoding (decompression
bombs never reach memory). Any Pillow mode is converted to RGB (alpha composited over white,
16-bit scaled by 1/257).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import io
import json
import logging
import socket
import struct
import threading
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, parse_qsl, unquote_to_bytes, urlencode, urljoin, urlsplit, urlunsplit

import numpy as np
import requests
import urllib3
from PIL import Image, ImageOps, UnidentifiedImageError

from backend.public_peer import is_public_address, non_public_peer, public_peer_session
from samsem_plugin.cache import ByteLRUCache

logger = logging.getLogger(__name__)

CLOUD_SCHEMES = ("s3", "gs", "azure-blob")
LOCAL_FILES_PREFIX = "/data/local-files/"
MAX_REDIRECTS = 5
IMAGE_FORMATS = ("PNG", "JPEG", "WEBP", "GIF", "BMP", "TIFF")
"""Pillow formats decoded (JPEG includes MPO); others (EPS runs Ghostscript, PSD...) are "not an image"."""
TOKEN_REFRESH_PATH = "/api/token/refresh/"
ACCESS_TOKEN_MARGIN_SECONDS = 30.0

HTTP_BAD_REQUEST = 400
"""Answer for malformed task data: unusable URL, path traversal, missing task id."""
HTTP_UNPROCESSABLE = 422
"""Answer for an image refused by policy or content: host not allowed, too large, not an image."""
HTTP_FAILED_DEPENDENCY = 424
"""Answer when the source failed: upstream HTTP error, timeout, unreachable, not configured."""


class ImageFetchError(Exception):
    """A task image could not be fetched or decoded.

    Attributes:
        url: the image URL as given in the task, with credentials masked (safe to log and show).
        status: the upstream HTTP status code, or ``None`` (no HTTP answer / not an HTTP source).
        reason: what went wrong, in words.
        http_status: the status the service should answer with (400, 422 or 424, see module
            constants).
    """

    def __init__(
        self, url: str, reason: str, *, status: int | None = None, http_status: int = HTTP_FAILED_DEPENDENCY
    ) -> None:
        self.url = redact_url(url)
        self.status = status
        self.reason = reason
        self.http_status = http_status
        upstream = f" (upstream HTTP {status})" if status is not None else ""
        super().__init__(f"cannot fetch image {self.url}: {reason}{upstream}")


# ---------------------------------------------------------------------------------------------
# URL helpers


_SENSITIVE_QUERY_WORDS = ("token", "sig", "key", "credential", "secret", "password", "auth", "policy")


def redact_url(url: str) -> str:
    """``url`` safe for logs: user info removed, signature/token-like query values masked,
    ``data:`` URIs shortened to their media type and length."""
    if url[:5].lower() == "data:":
        header = url.split(",", 1)[0][:60]
        return f"{header},…({len(url)} chars)"
    try:
        parts = urlsplit(url)
    except ValueError:
        return "<unparsable url>"
    netloc = parts.netloc.rsplit("@", 1)[-1]
    query = parts.query
    if query:
        pairs = parse_qsl(query, keep_blank_values=True)
        masked = [
            (key, "***" if any(word in key.lower() for word in _SENSITIVE_QUERY_WORDS) else value)
            for key, value in pairs
        ]
        query = urlencode(masked, safe="/:")
    return urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))


def origin_of(url: str) -> tuple[str, str, int]:
    """``(scheme, lower-case host, port)`` with the scheme's default port filled in."""
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    port = parts.port or {"http": 80, "https": 443}.get(scheme, 0)
    return scheme, (parts.hostname or "").lower(), port


def join_label_studio(base_url: str, path: str) -> str:
    """``base_url`` + ``path`` with exactly one slash between them (base may carry a sub-path)."""
    return base_url.rstrip("/") + "/" + path.lstrip("/")


def presign_url(base_url: str, task_id: int, cloud_uri: str) -> str:
    """Label Studio's presign endpoint for a cloud URI of task ``task_id``."""
    encoded = base64.urlsafe_b64encode(cloud_uri.encode()).decode()
    return join_label_studio(base_url, f"/tasks/{int(task_id)}/presign/?fileuri={encoded}")


# ---------------------------------------------------------------------------------------------
# Label Studio auth


def _jwt_claims(token: str) -> dict[str, Any] | None:
    """Unverified JWT payload claims, or ``None`` when ``token`` is not a JWT."""
    parts = token.split(".")
    if len(parts) != 3:
        return None
    payload = parts[1] + "=" * (-len(parts[1]) % 4)
    try:
        claims = json.loads(base64.urlsafe_b64decode(payload.encode()))
    except (ValueError, binascii.Error):
        return None
    return claims if isinstance(claims, dict) else None


class LabelStudioAuth:
    """The ``Authorization`` header for Label Studio, and which URLs may receive it.

    ``kind`` is ``"none"`` (no key), ``"legacy"`` (``Token <key>``), ``"access"`` (a JWT access
    token, sent as ``Bearer``) or ``"refresh"`` (a personal access token, exchanged for access
    tokens). Thread-safe.
    """

    def __init__(self, base_url: str | None, api_key: str | None, *, timeout: float = 30.0) -> None:
        self.base_url = base_url.rstrip("/") if base_url else None
        self._api_key = api_key or None
        self._timeout = timeout
        self._lock = threading.Lock()
        self._access: str | None = None
        self._access_expires = 0.0
        self.refreshes = 0
        claims = _jwt_claims(self._api_key) if self._api_key else None
        if self._api_key is None:
            self.kind = "none"
        elif claims is None:
            self.kind = "legacy"
        else:
            self.kind = "refresh" if claims.get("token_type") == "refresh" else "access"

    @property
    def can_refresh(self) -> bool:
        return self.kind == "refresh"

    def owns(self, url: str) -> bool:
        """True when ``url`` is on Label Studio's origin (scheme, host and port all equal)."""
        return self.base_url is not None and origin_of(url) == origin_of(self.base_url)

    def headers_for(self, url: str) -> dict[str, str]:
        """``{"Authorization": ...}`` when ``url`` is on Label Studio's origin, else ``{}``."""
        if self.kind == "none" or not self.owns(url):
            return {}
        if self.kind == "legacy":
            return {"Authorization": f"Token {self._api_key}"}
        if self.kind == "access":
            return {"Authorization": f"Bearer {self._api_key}"}
        return {"Authorization": f"Bearer {self._current_access()}"}

    def refresh(self) -> None:
        """Exchange the personal access token for a new access token now (after a 401)."""
        if self.can_refresh:
            with self._lock:
                self._exchange()

    def _current_access(self) -> str:
        with self._lock:
            if self._access is None or time.time() >= self._access_expires:
                return self._exchange()
            return self._access

    def _exchange(self) -> str:
        """POST the refresh token to ``/api/token/refresh/``, store and return the access token.

        The caller holds the lock.
        """
        if self.base_url is None:
            raise ImageFetchError(TOKEN_REFRESH_PATH, "cannot refresh the token: LABEL_STUDIO_URL is not set")
        url = join_label_studio(self.base_url, TOKEN_REFRESH_PATH)
        hint = "check LABEL_STUDIO_API_KEY (personal access token)"
        try:
            response = requests.post(url, json={"refresh": self._api_key}, timeout=self._timeout)
        except requests.RequestException as error:
            raise ImageFetchError(url, f"token refresh failed: {type(error).__name__}; {hint}") from None
        with response:
            if response.status_code != 200:
                raise ImageFetchError(
                    url, f"Label Studio refused the token refresh; {hint}", status=response.status_code
                )
            try:
                access = response.json()["access"]
            except (ValueError, KeyError, TypeError):
                raise ImageFetchError(url, "token refresh answer has no 'access' token") from None
        claims = _jwt_claims(access) or {}
        expires = float(claims.get("exp", time.time() + 300.0))
        self._access = str(access)
        self._access_expires = expires - ACCESS_TOKEN_MARGIN_SECONDS
        self.refreshes += 1
        logger.info(
            "exchanged the personal access token for an access token (valid %.0f s)", expires - time.time()
        )
        return self._access


# ---------------------------------------------------------------------------------------------
# Host policy (no SSRF through task data)


class HostPolicy:
    """Which hosts plain ``http(s)`` image URLs may point at (Label Studio's origin is exempt).

    ``allowed_hosts`` entries (lower case): ``"host"`` (any port), ``"host:port"``,
    ``"*.domain"`` (any sub-domain), ``"*"`` (any host). A host resolving to any non-public
    address (private, loopback, link-local, reserved, multicast) is refused unless
    ``allow_private_hosts``; the download of a checked URL then connects through
    :func:`~backend.public_peer.public_peer_session`, which refuses a non-public peer again on the
    connected socket (DNS rebinding).
    """

    def __init__(self, allowed_hosts: Iterable[str] = (), allow_private_hosts: bool = False) -> None:
        self.allowed_hosts = tuple(host.strip().lower() for host in allowed_hosts if host.strip())
        self.allow_private_hosts = allow_private_hosts

    def is_listed(self, url: str) -> bool:
        _, host, port = origin_of(url)
        for entry in self.allowed_hosts:
            entry_host, _, entry_port = entry.rpartition(":") if _has_port(entry) else (entry, "", "")
            if entry_port and int(entry_port) != port:
                continue
            if entry_host == "*" or entry_host == host:
                return True
            if entry_host.startswith("*.") and host.endswith(entry_host[1:]):
                return True
        return False

    def check(self, url: str, shown_url: str) -> None:
        """Raise :class:`ImageFetchError` (422) unless ``url`` may be fetched."""
        _, host, port = origin_of(url)
        if not host:
            raise ImageFetchError(shown_url, "URL has no host", http_status=HTTP_BAD_REQUEST)
        if not self.is_listed(url):
            raise ImageFetchError(
                shown_url,
                f"host {host!r} is not Label Studio's and not in ALLOWED_IMAGE_HOSTS",
                http_status=HTTP_UNPROCESSABLE,
            )
        if self.allow_private_hosts:
            return
        try:
            infos = socket.getaddrinfo(host.strip("[]"), port, proto=socket.IPPROTO_TCP)
        except OSError:
            raise ImageFetchError(shown_url, f"cannot resolve host {host!r}") from None
        private = sorted({info[4][0] for info in infos if not is_public_address(info[4][0])})
        if private:
            raise ImageFetchError(
                shown_url,
                f"host {host!r} resolves to a non-public address {private[0]}; "
                "set ALLOW_PRIVATE_IMAGE_HOSTS=true to allow it",
                http_status=HTTP_UNPROCESSABLE,
            )


def _has_port(entry: str) -> bool:
    head, sep, tail = entry.rpartition(":")
    return bool(sep) and tail.isdigit() and not head.endswith(":")


# ---------------------------------------------------------------------------------------------
# Decoding


def decode_image(data: bytes, *, max_pixels: int, url: str = "<bytes>") -> np.ndarray:
    """Encoded image bytes → ``(H, W, 3) uint8`` RGB, EXIF orientation applied.

    ``H``/``W`` are the displayed (EXIF-transposed) size. The first frame of animated or
    multi-page files is used; only :data:`IMAGE_FORMATS` are decoded. Alpha is composited over
    white; 16-bit samples are scaled by 1/257.

    Raises:
        ImageFetchError: (422) more than ``max_pixels`` pixels (checked from the header, before
            decoding), not an image, corrupt or truncated, unsupported mode.
    """
    try:
        with Image.open(io.BytesIO(data), formats=IMAGE_FORMATS) as image:
            width, height = image.size
            if width * height > max_pixels:
                raise _too_many_pixels(url, width, height, max_pixels)
            image.load()
            upright = ImageOps.exif_transpose(image)
            return _to_rgb_array(upright)
    except Image.DecompressionBombError:
        raise ImageFetchError(
            url,
            f"image too large: more pixels than MAX_IMAGE_PIXELS={max_pixels}",
            http_status=HTTP_UNPROCESSABLE,
        ) from None
    except UnidentifiedImageError:
        raise ImageFetchError(
            url, "not an image (unrecognised format)", http_status=HTTP_UNPROCESSABLE
        ) from None
    except (OSError, SyntaxError, ValueError, EOFError, struct.error) as error:
        raise ImageFetchError(
            url,
            f"corrupt or truncated image ({type(error).__name__}: {error})",
            http_status=HTTP_UNPROCESSABLE,
        ) from None


def _too_many_pixels(url: str, width: int, height: int, max_pixels: int) -> ImageFetchError:
    return ImageFetchError(
        url,
        f"image too large: {width}x{height} = {width * height} pixels > MAX_IMAGE_PIXELS={max_pixels}",
        http_status=HTTP_UNPROCESSABLE,
    )


_SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N")
_ALPHA_MODES = ("RGBA", "RGBa", "LA", "La", "PA")


def _to_rgb_array(image: Image.Image) -> np.ndarray:
    """Any Pillow mode → contiguous ``(H, W, 3) uint8`` RGB."""
    mode = image.mode
    if mode in _SIXTEEN_BIT_MODES or mode in ("I", "F"):
        gray = _scale_to_uint8(np.asarray(image), sixteen_bit=mode in _SIXTEEN_BIT_MODES)
        return np.ascontiguousarray(np.repeat(gray[:, :, None], 3, axis=2))
    if mode in _ALPHA_MODES or "transparency" in image.info:
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        image = Image.alpha_composite(white, rgba)
    if image.mode != "RGB":
        image = image.convert("RGB")
    return np.array(image, dtype=np.uint8)


def _scale_to_uint8(values: np.ndarray, *, sixteen_bit: bool) -> np.ndarray:
    values = values.astype(np.float64)
    low, high = (float(values.min()), float(values.max())) if values.size else (0.0, 0.0)
    if sixteen_bit or (low >= 0 and 255 < high <= 65535):
        scaled = values / 257.0
    elif low >= 0 and high <= 255:
        scaled = values
    else:
        scaled = (values - low) * (255.0 / (high - low)) if high > low else np.zeros_like(values)
    return np.clip(np.rint(scaled), 0, 255).astype(np.uint8)


def decode_data_uri(uri: str, *, max_bytes: int) -> bytes:
    """The payload bytes of a ``data:[<type>][;base64],<data>`` URI.

    Raises:
        ImageFetchError: (400) malformed; (422) larger than ``max_bytes``.
    """
    header, comma, payload = uri.partition(",")
    if not comma:
        raise ImageFetchError(uri, "malformed data URI (no comma)", http_status=HTTP_BAD_REQUEST)
    is_base64 = header.lower().endswith(";base64")
    estimate = len(payload) * 3 // 4 if is_base64 else len(payload) // 3
    if estimate > max_bytes:
        raise _too_many_bytes(uri, max_bytes)
    try:
        data = base64.b64decode(payload, validate=False) if is_base64 else unquote_to_bytes(payload)
    except (binascii.Error, ValueError):
        raise ImageFetchError(uri, "malformed base64 in data URI", http_status=HTTP_BAD_REQUEST) from None
    if len(data) > max_bytes:
        raise _too_many_bytes(uri, max_bytes)
    return data


def _too_many_bytes(url: str, max_bytes: int) -> ImageFetchError:
    return ImageFetchError(
        url, f"image too large: more than MAX_IMAGE_BYTES={max_bytes} bytes", http_status=HTTP_UNPROCESSABLE
    )


# ---------------------------------------------------------------------------------------------
# The fetcher


class ImageFetcher:
    """Fetches task images (see module docstring) into a bounded LRU cache.

    Args:
        label_studio_url: Label Studio base URL with scheme (``None``: only absolute http(s),
            ``data:`` and local files work).
        api_key: legacy token or personal access token (``None``: no auth header).
        allowed_hosts: extra hosts for plain http(s) URLs (see :class:`HostPolicy`).
        allow_private_hosts: allow hosts resolving to private/loopback/link-local addresses.
        local_files_root: LOCAL_FILES_DOCUMENT_ROOT, or ``None``.
        timeout: seconds for connect, for each read, and for the whole download.
        max_bytes: largest encoded image accepted, in bytes.
        max_pixels: largest image accepted, width × height.
        cache_bytes: bound of the decoded-image cache in bytes (0 disables it).
    """

    def __init__(
        self,
        *,
        label_studio_url: str | None = None,
        api_key: str | None = None,
        allowed_hosts: Iterable[str] = (),
        allow_private_hosts: bool = False,
        local_files_root: str | Path | None = None,
        timeout: float = 30.0,
        max_bytes: int = 64 << 20,
        max_pixels: int = 50_000_000,
        cache_bytes: int = 256 << 20,
    ) -> None:
        if timeout <= 0 or max_bytes <= 0 or max_pixels <= 0:
            raise ValueError(
                f"timeout, max_bytes, max_pixels: expected > 0, got {timeout}, {max_bytes}, {max_pixels}"
            )
        self.auth = LabelStudioAuth(label_studio_url, api_key, timeout=timeout)
        self.policy = HostPolicy(allowed_hosts, allow_private_hosts)
        self.local_files_root = Path(local_files_root).resolve() if local_files_root else None
        self.timeout = float(timeout)
        self.max_bytes = int(max_bytes)
        self.max_pixels = int(max_pixels)
        self.cache: ByteLRUCache[np.ndarray] = ByteLRUCache(cache_bytes)
        self.downloads = 0
        self._sessions = threading.local()

    @classmethod
    def from_settings(cls, settings: Any) -> ImageFetcher:
        """Build from a :class:`backend.settings.Settings`."""
        return cls(
            label_studio_url=settings.label_studio_url,
            api_key=settings.label_studio_api_key,
            allowed_hosts=settings.allowed_image_hosts,
            allow_private_hosts=settings.allow_private_image_hosts,
            local_files_root=settings.local_files_root,
            timeout=settings.fetch_timeout,
            max_bytes=settings.max_image_bytes,
            max_pixels=settings.max_image_pixels,
            cache_bytes=settings.image_cache_bytes,
        )

    # ------------------------------------------------------------------ public API

    def fetch(self, url: str, task_id: int | None = None) -> np.ndarray:
        """The image at ``url`` as ``(H, W, 3) uint8`` RGB, EXIF orientation applied.

        ``task_id`` is needed for cloud URIs (``s3://``, ``gs://``, ``azure-blob://``). The
        returned array is shared with the cache and READ-ONLY: copy it before modifying it.

        Raises:
            ImageFetchError: naming the URL, the upstream status and the answer to give.
        """
        if not isinstance(url, str) or not url.strip():
            raise ImageFetchError(str(url), "empty or non-string image URL", http_status=HTTP_BAD_REQUEST)
        url = url.strip()
        key = self._cache_key(url, task_id)
        cached = self.cache.get(key)
        if cached is not None:
            return cached
        started = time.monotonic()
        data = self._load_bytes(url, task_id)
        image = decode_image(data, max_pixels=self.max_pixels, url=url)
        image.flags.writeable = False
        self.cache.put(key, image)
        logger.info(
            "fetched image %s: %dx%d, %d bytes in %.2f s",
            redact_url(url),
            image.shape[1],
            image.shape[0],
            len(data),
            time.monotonic() - started,
        )
        return image

    def get_json(self, path_or_url: str, params: Mapping[str, Any] | None = None) -> Any:
        """GET a Label Studio API path (e.g. ``/api/projects/1/``) with auth; returns the JSON.

        Refreshes a personal access token once on 401. Raises :class:`ImageFetchError` (with the
        URL and upstream status) on failure.
        """
        if self.auth.base_url is None:
            raise ImageFetchError(path_or_url, "LABEL_STUDIO_URL is not set")
        url = (
            path_or_url
            if urlsplit(path_or_url).scheme
            else join_label_studio(self.auth.base_url, path_or_url)
        )
        if params:
            url += ("&" if "?" in url else "?") + urlencode(params)
        response = self._get_with_auth_retry(url, url, stream=False)
        with response:
            if response.status_code != 200:
                raise _upstream_error(url, response.status_code, self.auth)
            try:
                return response.json()
            except ValueError:
                raise ImageFetchError(url, "Label Studio answered with invalid JSON", status=200) from None

    # ------------------------------------------------------------------ resolving

    def _cache_key(self, url: str, task_id: int | None) -> str:
        if url[:5].lower() == "data:":
            return "data:" + hashlib.blake2b(url.encode(), digest_size=16).hexdigest()
        if url.split(":", 1)[0].lower() in CLOUD_SCHEMES:
            return f"{url}#task={task_id}"
        return url

    def _load_bytes(self, url: str, task_id: int | None) -> bytes:
        if url[:5].lower() == "data:":
            return decode_data_uri(url, max_bytes=self.max_bytes)
        try:
            parts = urlsplit(url)
        except ValueError:
            raise ImageFetchError(url, "unparsable URL", http_status=HTTP_BAD_REQUEST) from None
        scheme = parts.scheme.lower()
        if scheme in CLOUD_SCHEMES or url.startswith(("s3:", "gs:", "azure-blob:")):
            return self._download(self._presign(url, task_id), url)
        if scheme in ("http", "https"):
            if not self.auth.owns(url):
                self.policy.check(url, url)
            return self._download(url, url)
        if scheme:
            raise ImageFetchError(url, f"unsupported URL scheme {scheme!r}", http_status=HTTP_BAD_REQUEST)
        local = self._local_file(parts.path, parts.query)
        if local is not None:
            return self._read_file(local, url)
        return self._download(self._label_studio_url(url), url)

    def _label_studio_url(self, path: str) -> str:
        if self.auth.base_url is None:
            raise ImageFetchError(path, "relative image path but LABEL_STUDIO_URL is not set")
        return join_label_studio(self.auth.base_url, path)

    def _presign(self, uri: str, task_id: int | None) -> str:
        if task_id is None:
            raise ImageFetchError(
                uri, "cloud storage URI needs the task id to presign", http_status=HTTP_BAD_REQUEST
            )
        if self.auth.base_url is None:
            raise ImageFetchError(uri, "cloud storage URI but LABEL_STUDIO_URL is not set")
        try:
            task = int(task_id)
        except (TypeError, ValueError):
            raise ImageFetchError(
                uri, f"task id: expected an integer, got {task_id!r}", http_status=HTTP_BAD_REQUEST
            ) from None
        return presign_url(self.auth.base_url, task, uri)

    def _local_file(self, path: str, query: str) -> Path | None:
        """The file under ``local_files_root`` this path names, ``None`` to go through Label Studio.

        Raises ImageFetchError (400) when the path escapes the root.
        """
        if self.local_files_root is None:
            return None
        if path.startswith(LOCAL_FILES_PREFIX):
            relative = parse_qs(query).get("d", [""])[0]
            if not relative:
                raise ImageFetchError(
                    path, "local-files URL without a 'd' parameter", http_status=HTTP_BAD_REQUEST
                )
            candidate = Path(relative)
            if not candidate.is_absolute():
                candidate = self.local_files_root / candidate
            must_be_inside = True
        elif path.startswith("/"):
            candidate, must_be_inside = Path(path), False
        else:
            return None
        resolved = candidate.resolve()
        if not resolved.is_relative_to(self.local_files_root):
            if must_be_inside:
                raise ImageFetchError(
                    path + ("?" + query if query else ""),
                    "local file path escapes LOCAL_FILES_DOCUMENT_ROOT",
                    http_status=HTTP_BAD_REQUEST,
                )
            return None
        return resolved if resolved.is_file() else None

    def _read_file(self, path: Path, shown_url: str) -> bytes:
        size = path.stat().st_size
        if size > self.max_bytes:
            raise _too_many_bytes(shown_url, self.max_bytes)
        return path.read_bytes()

    # ------------------------------------------------------------------ HTTP

    def _session(self, public_peer: bool = False) -> requests.Session:
        """This thread's session; ``public_peer``: the one that refuses non-public peers."""
        name = "public_peer_session" if public_peer else "session"
        session = getattr(self._sessions, name, None)
        if session is None:
            session = public_peer_session() if public_peer else requests.Session()
            setattr(self._sessions, name, session)
        return session

    def _get(
        self, url: str, shown_url: str, *, stream: bool, with_auth: bool, checked: bool = False
    ) -> requests.Response:
        """One GET; ``checked``: ``url`` passed the host policy, so (unless private hosts are
        allowed) the connection must reach a public address too."""
        public_peer = checked and not self.policy.allow_private_hosts
        try:
            return self._session(public_peer).get(
                url,
                headers=self.auth.headers_for(url) if with_auth else {},
                timeout=(self.timeout, self.timeout),
                allow_redirects=False,
                stream=stream,
            )
        except requests.Timeout:
            raise ImageFetchError(shown_url, f"timed out after {self.timeout:g} s") from None
        except requests.ConnectionError as error:
            host = origin_of(url)[1]
            address = non_public_peer(error)
            if address is not None:
                raise ImageFetchError(
                    shown_url,
                    f"host {host!r} connected to the non-public address {address} although it "
                    "resolved to a public one (DNS answer changed); set ALLOW_PRIVATE_IMAGE_HOSTS=true "
                    "to allow private addresses",
                    http_status=HTTP_UNPROCESSABLE,
                ) from None
            raise ImageFetchError(shown_url, f"cannot connect to {host!r}") from None
        except requests.RequestException as error:
            raise ImageFetchError(
                shown_url, f"request failed ({type(error).__name__})", http_status=HTTP_BAD_REQUEST
            ) from None

    def _get_with_auth_retry(
        self, url: str, shown_url: str, *, stream: bool, with_auth: bool = True, checked: bool = False
    ) -> requests.Response:
        """GET; when Label Studio answers 401 to a refreshable token, refresh once and retry."""
        response = self._get(url, shown_url, stream=stream, with_auth=with_auth, checked=checked)
        if response.status_code == 401 and with_auth and self.auth.can_refresh and self.auth.owns(url):
            response.close()
            logger.info("Label Studio answered 401: refreshing the access token once")
            self.auth.refresh()
            response = self._get(url, shown_url, stream=stream, with_auth=with_auth, checked=checked)
        return response

    def _download(self, url: str, shown_url: str) -> bytes:
        """GET ``url``, following up to :data:`MAX_REDIRECTS` redirects by hand.

        The auth header goes only to Label Studio's origin and only while every earlier hop was
        Label Studio too; a redirect target chosen by Label Studio is trusted, one chosen by any
        other host must pass the host policy.
        """
        deadline = time.monotonic() + self.timeout
        chain_is_label_studio = True
        checked = not self.auth.owns(url)  # the caller ran the host policy on a foreign URL
        for _ in range(MAX_REDIRECTS + 1):
            on_label_studio = self.auth.owns(url)
            with_auth = on_label_studio and chain_is_label_studio
            response = self._get_with_auth_retry(
                url, shown_url, stream=True, with_auth=with_auth, checked=checked
            )
            with response:
                if response.is_redirect:
                    target = urljoin(url, response.headers["Location"])
                    self._check_redirect(target, shown_url, response.status_code, from_label_studio=with_auth)
                    chain_is_label_studio = with_auth
                    checked = not with_auth  # _check_redirect ran the host policy on the target
                    url = target
                    continue
                if response.status_code != 200:
                    raise _upstream_error(shown_url, response.status_code, self.auth if with_auth else None)
                data = self._read_limited(response, shown_url, deadline)
                self.downloads += 1
                return data
        raise ImageFetchError(shown_url, f"more than {MAX_REDIRECTS} redirects")

    def _check_redirect(self, target: str, shown_url: str, status: int, *, from_label_studio: bool) -> None:
        if from_label_studio and urlsplit(target).path.rstrip("/").endswith("/user/login"):
            raise ImageFetchError(
                shown_url,
                "Label Studio redirected to its login page: check LABEL_STUDIO_API_KEY",
                status=status,
            )
        if not from_label_studio:
            self.policy.check(target, shown_url)

    def _read_limited(self, response: requests.Response, shown_url: str, deadline: float) -> bytes:
        declared = response.headers.get("Content-Length", "")
        if declared.isdigit() and int(declared) > self.max_bytes:
            raise _too_many_bytes(shown_url, self.max_bytes)
        chunks: list[bytes] = []
        total = 0
        try:
            while True:
                # read1 returns as soon as some bytes arrive, so a dripping server meets the deadline
                chunk = response.raw.read1(1 << 16, decode_content=True)
                if not chunk:
                    break
                total += len(chunk)
                if total > self.max_bytes:
                    raise _too_many_bytes(shown_url, self.max_bytes)
                if time.monotonic() > deadline:
                    raise ImageFetchError(shown_url, f"download timed out after {self.timeout:g} s")
                chunks.append(chunk)
        except (requests.RequestException, urllib3.exceptions.HTTPError, OSError) as error:
            timed_out = "timed out" in str(error).lower() or isinstance(error, TimeoutError)
            reason = f"timed out after {self.timeout:g} s" if timed_out else "download interrupted"
            raise ImageFetchError(shown_url, reason) from None
        return b"".join(chunks)


def _upstream_error(shown_url: str, status: int, auth: LabelStudioAuth | None) -> ImageFetchError:
    """An HTTP error answer; ``auth`` is given when the request went to Label Studio."""
    hint = ""
    if status in (401, 403) and auth is not None:
        hint = "; set LABEL_STUDIO_API_KEY" if auth.kind == "none" else "; check LABEL_STUDIO_API_KEY"
    return ImageFetchError(shown_url, f"the image source answered HTTP {status}{hint}", status=status)
