"""``python -m samsem_plugin.weights``: download and verify the official SAM and DINOv2 weights.

A command-line tool for machines with internet access (users, the Docker build). It is the only
module of the package that uses the network, and nothing in the library imports it::

    python -m samsem_plugin.weights download --sam vit_b \\
        [--dinov2 vit_small_patch14_reg4_dinov2.lvd142m] --dir DIR
    python -m samsem_plugin.weights verify --dir DIR [--sam vit_b] [--dinov2 NAME]

Files land in ``DIR`` under the names the service expects by default (``WEIGHTS_DIR``):
``sam_vit_b_01ec64.pth`` (official name) and ``<timm model name>.safetensors``.

What is checked:

* SAM checkpoints (``dl.fbaipublicfiles.com``): size, full SHA-256 and full MD5 as published
  (the hex suffix of the official file name, e.g. ``01ec64``, is the start of the **MD5**).
* DINOv2 / timm weights (Hugging Face hub, ``model.safetensors`` of the model's timm repo): a
  SHA-256 from the table below when known, otherwise the hub's own record of the file: a ``HEAD``
  of the ``resolve`` URL without following its redirect returns ``X-Linked-Etag`` (the SHA-256 of
  the LFS object) and ``X-Linked-Size``. If the hub gives neither, only the size can be checked and
  the tool says so.

After a verified download a ``<file>.sha256`` sidecar (``sha256sum`` format) is written, so
``verify`` can check hub files offline. Downloads stream to a temporary file in ``DIR`` (with a
progress bar on stderr), are verified, then renamed atomically over the target; nothing partial or
unverified is ever left under the target name. A file already present and verified is not
downloaded again. There is no resume: an interrupted download starts over.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import re
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import requests

from samsem_plugin.sam_models import OFFICIAL_CHECKPOINTS, TINY_MODEL_TYPE

__all__ = [
    "ChecksumError",
    "Digests",
    "DownloadError",
    "WeightsSpec",
    "dinov2_spec",
    "download",
    "file_digests",
    "hub_metadata",
    "main",
    "sam_spec",
    "verify",
]

HUB_URL = "https://huggingface.co"
HUB_FILENAME = "model.safetensors"
SIDECAR_SUFFIX = ".sha256"
CHUNK_BYTES = 1 << 20
TIMEOUT_SECONDS = 60.0

KNOWN_HUB_SHA256: dict[str, str] = {
    # SHA-256 of model.safetensors as shown on the hub's file pages (Git LFS details).
    "timm/vit_base_patch14_dinov2.lvd142m": (
        "55cbb5d887b336d430e649c277b85a1429e724871f9d02ac16203235886d8c7b"
    ),
}

_SHA256_HEX = re.compile(r"^[0-9a-f]{64}$")


class DownloadError(RuntimeError):
    """A download or verification failed (network, HTTP status, missing file)."""


class ChecksumError(DownloadError):
    """A file's size or digest differs from the expected one (message: expected vs actual)."""


@dataclass(frozen=True)
class WeightsSpec:
    """One weights file to fetch.

    Attributes:
        filename: name of the file in the target directory.
        url: where to download it.
        sha256 / md5: expected full hex digests, or ``None`` when unknown in advance.
        size: expected size in bytes, or ``None``.
        setting: the service setting (environment variable) that points to the file.
        label: human name for messages, e.g. ``"SAM vit_b"``.
    """

    filename: str
    url: str
    sha256: str | None
    md5: str | None
    size: int | None
    setting: str
    label: str


def sam_spec(model_type: str) -> WeightsSpec:
    """The official checkpoint of SAM ``model_type`` (``vit_b`` / ``vit_l`` / ``vit_h``).

    Raises:
        ValueError: another model type.
    """
    if model_type not in OFFICIAL_CHECKPOINTS:
        raise ValueError(f"--sam: expected one of {', '.join(OFFICIAL_CHECKPOINTS)}, got {model_type!r}")
    info = OFFICIAL_CHECKPOINTS[model_type]
    return WeightsSpec(
        info.filename, info.url, info.sha256, info.md5, info.size, "SAM_CHECKPOINT", f"SAM {model_type}"
    )


def hub_repo(model_name: str) -> str:
    """The Hugging Face repository of a timm model name (its pretrained config's ``hf_hub_id``).

    Raises:
        ValueError: timm knows no pretrained weights on the hub under that name.
    """
    import timm  # imported here: only this command needs it

    cfg = timm.models.get_pretrained_cfg(model_name)
    if cfg is None or not cfg.hf_hub_id:
        raise ValueError(
            f"--dinov2: expected a timm model name with weights on the Hugging Face hub "
            f"(e.g. vit_small_patch14_reg4_dinov2.lvd142m), got {model_name!r}"
        )
    return str(cfg.hf_hub_id)


def dinov2_spec(model_name: str, hub_url: str = HUB_URL) -> WeightsSpec:
    """``model.safetensors`` of timm model ``model_name`` on the hub, saved as ``<name>.safetensors``.

    Raises:
        ValueError: unknown timm model name or no hub weights.
    """
    repo = hub_repo(model_name)
    return WeightsSpec(
        filename=f"{model_name}.safetensors",
        url=f"{hub_url}/{repo}/resolve/main/{HUB_FILENAME}",
        sha256=KNOWN_HUB_SHA256.get(repo),
        md5=None,
        size=None,
        setting="EMBEDDER_WEIGHTS",
        label=f"DINOv2/timm {model_name}",
    )


# -- digests -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Digests:
    """Size in bytes and full hex SHA-256 / MD5 of a file's content."""

    size: int
    sha256: str
    md5: str


class _Hasher:
    def __init__(self) -> None:
        self.size = 0
        self._sha256 = hashlib.sha256()
        self._md5 = hashlib.md5(usedforsecurity=False)

    def update(self, chunk: bytes) -> None:
        self.size += len(chunk)
        self._sha256.update(chunk)
        self._md5.update(chunk)

    def digests(self) -> Digests:
        return Digests(self.size, self._sha256.hexdigest(), self._md5.hexdigest())


def file_digests(path: str | Path) -> Digests:
    """Size, SHA-256 and MD5 of a file (read in 1 MiB chunks)."""
    hasher = _Hasher()
    with open(path, "rb") as handle:
        while chunk := handle.read(CHUNK_BYTES):
            hasher.update(chunk)
    return hasher.digests()


def check_digests(actual: Digests, spec: WeightsSpec, where: str) -> None:
    """Compare ``actual`` with every value ``spec`` knows.

    Raises:
        ChecksumError: naming ``where`` (a path or URL), the field, expected and actual values.
    """
    for field, expected, got in (
        ("size", spec.size, actual.size),
        ("sha256", spec.sha256, actual.sha256),
        ("md5", spec.md5, actual.md5),
    ):
        if expected is not None and expected != got:
            raise ChecksumError(f"{spec.label}: {where}: {field} expected {expected}, got {got}")


def read_sidecar(path: Path) -> str | None:
    """The SHA-256 recorded next to ``path`` (``<path>.sha256``), or None."""
    sidecar = path.with_name(path.name + SIDECAR_SUFFIX)
    if not sidecar.is_file():
        return None
    words = sidecar.read_text(encoding="utf-8").split()
    return words[0].lower() if words and _SHA256_HEX.match(words[0].lower()) else None


def write_sidecar(path: Path, sha256: str) -> None:
    path.with_name(path.name + SIDECAR_SUFFIX).write_text(f"{sha256}  {path.name}\n", encoding="utf-8")


# -- network --------------------------------------------------------------------------------------


def hub_metadata(
    url: str, session: requests.Session, timeout: float = TIMEOUT_SECONDS
) -> tuple[str | None, int | None]:
    """SHA-256 and size the Hugging Face hub records for an LFS file, from a ``HEAD`` of its
    ``resolve`` URL that does not follow the redirect (``X-Linked-Etag``, ``X-Linked-Size``).

    Returns:
        ``(sha256 or None, size or None)``; None where the headers are absent or not a SHA-256.
    """
    try:
        response = session.head(url, allow_redirects=False, timeout=timeout)
    except requests.RequestException as error:
        raise DownloadError(f"{url}: cannot reach the server ({error})") from error
    if response.status_code >= 400:
        raise DownloadError(f"{url}: HTTP {response.status_code} on HEAD")
    etag = (response.headers.get("X-Linked-Etag") or "").strip().strip('"').removeprefix("W/").strip('"')
    sha256 = etag.lower() if _SHA256_HEX.match(etag.lower()) else None
    size_text = response.headers.get("X-Linked-Size")
    size = int(size_text) if size_text and size_text.isdigit() else None
    return sha256, size


def _stream_to(
    url: str, handle: BinaryIO, session: requests.Session, timeout: float, progress: bool, label: str
) -> Digests:
    from tqdm import tqdm

    try:
        with session.get(url, stream=True, timeout=timeout) as response:
            if response.status_code != 200:
                raise DownloadError(f"{url}: HTTP {response.status_code}")
            total = int(response.headers.get("Content-Length", 0)) or None
            hasher = _Hasher()
            with tqdm(
                total=total,
                unit="B",
                unit_scale=True,
                unit_divisor=1024,
                desc=label,
                file=sys.stderr,
                disable=not progress,
            ) as bar:
                for chunk in response.iter_content(CHUNK_BYTES):
                    handle.write(chunk)
                    hasher.update(chunk)
                    bar.update(len(chunk))
    except requests.RequestException as error:
        raise DownloadError(f"{url}: download failed ({error})") from error
    return hasher.digests()


def download(
    spec: WeightsSpec,
    directory: str | Path,
    *,
    session: requests.Session | None = None,
    progress: bool = True,
    timeout: float = TIMEOUT_SECONDS,
) -> Path:
    """Fetch ``spec`` into ``directory`` (created if needed) and verify it; returns the file's path.

    A present file that verifies is kept as is. Hub files without a known SHA-256 are checked
    against the hub's ``X-Linked-Etag`` / ``X-Linked-Size`` (see module docstring).

    Raises:
        DownloadError: network or HTTP failure.
        ChecksumError: the downloaded bytes differ from what is expected (nothing is kept).
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    target = directory / spec.filename
    session = session or requests.Session()
    if spec.sha256 is None:
        sha256, size = hub_metadata(spec.url, session, timeout)
        spec = WeightsSpec(
            spec.filename, spec.url, sha256, spec.md5, spec.size or size, spec.setting, spec.label
        )
        if sha256 is None:
            print(
                f"warning: {spec.label}: the server gives no SHA-256 for {spec.url}; "
                f"checking the size only ({spec.size if spec.size is not None else 'unknown'})",
                file=sys.stderr,
            )
    if target.is_file():
        try:
            check_digests(file_digests(target), spec, str(target))
        except ChecksumError as error:
            print(f"{error}; downloading it again", file=sys.stderr)
        else:
            print(f"{spec.label}: {target} already present, checksums OK", file=sys.stderr)
            return target
    descriptor, temporary = tempfile.mkstemp(dir=directory, prefix=f".{spec.filename}.", suffix=".part")
    try:
        with os.fdopen(descriptor, "wb") as handle:
            digests = _stream_to(spec.url, handle, session, timeout, progress, spec.label)
            handle.flush()
            os.fsync(handle.fileno())
        check_digests(digests, spec, spec.url)
        os.replace(temporary, target)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    write_sidecar(target, digests.sha256)
    print(f"{spec.label}: saved {target} (sha256 {digests.sha256})", file=sys.stderr)
    return target


def verify(spec: WeightsSpec, directory: str | Path) -> Path:
    """Check a file already in ``directory`` against ``spec`` (or its ``.sha256`` sidecar when the
    spec has no SHA-256). Offline.

    Raises:
        DownloadError: the file is missing, or neither the spec nor a sidecar gives a SHA-256.
        ChecksumError: it differs.
    """
    target = Path(directory) / spec.filename
    if not target.is_file():
        raise DownloadError(f"{spec.label}: {target} not found")
    if spec.sha256 is None:
        recorded = read_sidecar(target)
        if recorded is None:
            raise DownloadError(
                f"{spec.label}: no known SHA-256 for {target} and no {SIDECAR_SUFFIX} sidecar; "
                "run `download` to fetch and record it"
            )
        spec = WeightsSpec(spec.filename, spec.url, recorded, spec.md5, spec.size, spec.setting, spec.label)
    check_digests(file_digests(target), spec, str(target))
    return target


# -- command line -------------------------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m samsem_plugin.weights",
        description="Download (with checksums) or verify the official SAM and DINOv2 weights.",
    )
    commands = parser.add_subparsers(dest="command", required=True)
    for name, help_text in (
        ("download", "download the weights into DIR and verify them"),
        ("verify", "verify weights already in DIR (offline)"),
    ):
        command = commands.add_parser(name, help=help_text)
        command.add_argument(
            "--sam",
            action="append",
            default=[],
            choices=[*OFFICIAL_CHECKPOINTS, TINY_MODEL_TYPE],
            help=f"SAM model type ({TINY_MODEL_TYPE} needs no file and is skipped)",
        )
        command.add_argument("--dinov2", action="append", default=[], metavar="TIMM_NAME")
        command.add_argument("--dir", required=True, type=Path, help="directory of the weight files")
        if name == "download":
            command.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser


def _settings_text(args: argparse.Namespace, paths: dict[str, Path]) -> str:
    lines = ["# settings for the samsem service:", f"export WEIGHTS_DIR={args.dir.resolve()}"]
    if args.sam:
        lines.append(f"export SAM_MODEL_TYPE={args.sam[-1]}")
    if args.dinov2:
        lines.append(f"export EMBEDDER_MODEL={args.dinov2[-1]}")
    lines += [f"export {setting}={path.resolve()}" for setting, path in paths.items()]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status (0 ok, 1 failure, 2 usage error)."""
    args = _parser().parse_args(argv)
    if not args.sam and not args.dinov2:
        print("error: name at least one file: --sam MODEL_TYPE and/or --dinov2 TIMM_NAME", file=sys.stderr)
        return 2
    if TINY_MODEL_TYPE in args.sam:
        print(f"{TINY_MODEL_TYPE}: built in code, no weights file needed", file=sys.stderr)
    try:
        sam_types = [t for t in args.sam if t != TINY_MODEL_TYPE]
        specs = [sam_spec(t) for t in sam_types] + [dinov2_spec(n) for n in args.dinov2]
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    paths: dict[str, Path] = {}
    failures = 0
    session = requests.Session()
    for spec in specs:
        try:
            if args.command == "download":
                path = download(spec, args.dir, session=session, progress=not args.no_progress)
            else:
                path = verify(spec, args.dir)
                print(f"{spec.label}: {path} OK", file=sys.stderr)
            paths[spec.setting] = path
        except DownloadError as error:
            print(f"error: {error}", file=sys.stderr)
            failures += 1
    if args.command == "download" and paths:
        print(_settings_text(args, paths))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
