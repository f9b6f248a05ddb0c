"""ImageFetcher against a real loopback HTTP server: auth, redirects, limits, decoding, policy."""

from __future__ import annotations

import base64
import io
import json
import socket
import struct
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
import requests
from PIL import Image

from backend import images
from backend.images import ImageFetcher, ImageFetchError, LabelStudioAuth, decode_image, redact_url
from tests.support.http_server import LoopbackHTTPServer, RecordedRequest, Response

LEGACY_TOKEN = "0123456789abcdef0123456789abcdef01234567"


def random_rgb(height: int, width: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(height, width, 3), dtype=np.uint8)


def png_bytes(array: np.ndarray, mode: str | None = None) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array, mode=mode).save(buffer, format="PNG")
    return buffer.getvalue()


def fake_jwt(**claims: object) -> str:
    def part(obj: object) -> str:
        return base64.urlsafe_b64encode(json.dumps(obj).encode()).decode().rstrip("=")

    return f"{part({'alg': 'HS256', 'typ': 'JWT'})}.{part(claims)}.c2lnbmF0dXJl"


def png_header_only(width: int, height: int) -> bytes:
    """A valid PNG structure claiming ``width`` × ``height`` RGB with (almost) no pixel data."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\x00" * 64)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


IMAGE = random_rgb(12, 16)
IMAGE_PNG = png_bytes(IMAGE)


@pytest.fixture
def server():
    with LoopbackHTTPServer() as running:
        yield running


@pytest.fixture
def other_server():
    with LoopbackHTTPServer() as running:
        yield running


def fetcher_for(server: LoopbackHTTPServer | None, **overrides: object) -> ImageFetcher:
    options: dict[str, object] = {
        "label_studio_url": server.base_url if server else None,
        "api_key": LEGACY_TOKEN,
        "timeout": 5.0,
        "cache_bytes": 1 << 20,
    }
    options.update(overrides)
    return ImageFetcher(**options)


# ------------------------------------------------------------------------------- auth


def test_upload_path_is_fetched_from_label_studio_with_legacy_token(server):
    server.routes["/data/upload/3/a.png"] = Response(body=IMAGE_PNG)
    image = fetcher_for(server).fetch("/data/upload/3/a.png", task_id=1)
    assert image.dtype == np.uint8 and image.shape == (12, 16, 3)
    np.testing.assert_array_equal(image, IMAGE)
    (request,) = server.requests_to("/data/upload/3/a.png")
    assert request.header("Authorization") == f"Token {LEGACY_TOKEN}"


def test_personal_access_token_is_exchanged_once_and_sent_as_bearer(server):
    pat = fake_jwt(token_type="refresh", exp=int(time.time()) + 3600, jti="r1")
    access = fake_jwt(token_type="access", exp=int(time.time()) + 600, jti="a1")

    def refresh(request: RecordedRequest) -> Response:
        ok = json.loads(request.body) == {"refresh": pat}
        return Response(status=200 if ok else 401, body=json.dumps({"access": access}).encode())

    def image(request: RecordedRequest) -> Response:
        return (
            Response(body=IMAGE_PNG)
            if request.header("Authorization") == f"Bearer {access}"
            else Response(401)
        )

    server.routes.update(
        {"/api/token/refresh/": refresh, "/data/upload/1/a.png": image, "/data/upload/1/b.png": image}
    )
    fetcher = fetcher_for(server, api_key=pat)
    assert fetcher.auth.kind == "refresh"
    fetcher.fetch("/data/upload/1/a.png")
    fetcher.fetch("/data/upload/1/b.png")
    assert len(server.requests_to("/api/token/refresh/")) == 1  # access token cached
    assert all(
        r.header("Authorization") == f"Bearer {access}" for r in server.requests_to("/data/upload/1/b.png")
    )


def test_401_with_a_personal_access_token_refreshes_once_and_retries(server):
    pat = fake_jwt(token_type="refresh", exp=int(time.time()) + 3600)
    accesses = iter([fake_jwt(token_type="access", jti=str(i), exp=int(time.time()) + 600) for i in range(3)])
    issued: list[str] = []

    def refresh(request: RecordedRequest) -> Response:
        issued.append(next(accesses))
        return Response(body=json.dumps({"access": issued[-1]}).encode())

    def image(request: RecordedRequest) -> Response:  # only the newest access token is valid
        return (
            Response(body=IMAGE_PNG)
            if request.header("Authorization") == f"Bearer {issued[-1]}" and len(issued) > 1
            else Response(401)
        )

    server.routes.update({"/api/token/refresh/": refresh, "/data/upload/1/a.png": image})
    fetcher = fetcher_for(server, api_key=pat)
    np.testing.assert_array_equal(fetcher.fetch("/data/upload/1/a.png"), IMAGE)
    assert fetcher.auth.refreshes == 2 and len(server.requests_to("/data/upload/1/a.png")) == 2


def test_refused_token_refresh_names_the_refresh_url_and_status(server):
    pat = fake_jwt(token_type="refresh", exp=int(time.time()) + 3600)
    server.routes["/api/token/refresh/"] = Response(401, body=b'{"detail": "invalid"}')
    with pytest.raises(ImageFetchError) as caught:
        fetcher_for(server, api_key=pat).fetch("/data/upload/1/a.png")
    assert caught.value.status == 401 and "/api/token/refresh/" in str(caught.value)
    assert pat not in str(caught.value)


def test_redirect_to_another_host_does_not_carry_the_token(server, other_server):
    other_server.routes["/bucket/a.png"] = Response(body=IMAGE_PNG)
    server.routes["/data/upload/1/a.png"] = Response(
        302, headers={"Location": other_server.url("/bucket/a.png")}
    )
    np.testing.assert_array_equal(fetcher_for(server).fetch("/data/upload/1/a.png"), IMAGE)
    assert server.requests_to("/data/upload/1/a.png")[0].header("Authorization") == f"Token {LEGACY_TOKEN}"
    (storage_request,) = other_server.requests_to("/bucket/a.png")
    assert storage_request.header("Authorization") is None


def test_cloud_uri_is_presigned_through_label_studio_and_followed_without_token(server, other_server):
    uri = "s3://bucket/dir/image one.png"
    encoded = base64.urlsafe_b64encode(uri.encode()).decode()
    other_server.routes["/signed.png"] = Response(body=IMAGE_PNG)
    server.routes[f"/tasks/42/presign/?fileuri={encoded}"] = Response(
        303, headers={"Location": other_server.url("/signed.png?X-Amz-Signature=abc")}
    )
    np.testing.assert_array_equal(fetcher_for(server).fetch(uri, task_id=42), IMAGE)
    (presign,) = server.requests_to("/tasks/42/presign/")
    assert presign.header("Authorization") == f"Token {LEGACY_TOKEN}"
    assert other_server.requests_to("/signed.png")[0].header("Authorization") is None
    with pytest.raises(ImageFetchError) as caught:
        fetcher_for(server).fetch(uri)  # no task id
    assert caught.value.http_status == 400


def test_a_redirect_from_a_foreign_host_back_to_label_studio_gets_no_token(server, other_server):
    server.routes["/data/upload/9/secret.png"] = Response(body=IMAGE_PNG)
    other_server.routes["/a.png"] = Response(
        302, headers={"Location": server.url("/data/upload/9/secret.png")}
    )
    fetcher = fetcher_for(server, allowed_hosts=["127.0.0.1"], allow_private_hosts=True)
    fetcher.fetch(other_server.url("/a.png"))
    assert server.requests_to("/data/upload/9/secret.png")[0].header("Authorization") is None


def test_redirect_from_a_foreign_host_must_pass_the_host_policy(server, other_server):
    other_server.routes["/a.png"] = Response(302, headers={"Location": "http://localhost:9/elsewhere.png"})
    fetcher = fetcher_for(server, allowed_hosts=[f"127.0.0.1:{other_server.port}"], allow_private_hosts=True)
    with pytest.raises(ImageFetchError) as caught:
        fetcher.fetch(other_server.url("/a.png"))
    assert "ALLOWED_IMAGE_HOSTS" in caught.value.reason and caught.value.http_status == 422


def test_redirect_to_the_login_page_says_the_api_key_was_not_accepted(server):
    server.routes["/data/upload/1/a.png"] = Response(
        302, headers={"Location": "/user/login/?next=/data/upload/1/a.png"}
    )
    with pytest.raises(ImageFetchError, match="LABEL_STUDIO_API_KEY"):
        fetcher_for(server).fetch("/data/upload/1/a.png")


# ------------------------------------------------------------------------------- upstream errors


@pytest.mark.parametrize("status", [401, 403, 404, 500])
def test_upstream_http_errors_name_the_url_and_status(server, status):
    server.routes["/data/upload/1/a.png"] = Response(status, body=b"nope")
    with pytest.raises(ImageFetchError) as caught:
        fetcher_for(server).fetch("/data/upload/1/a.png")
    error = caught.value
    assert error.status == status and error.http_status == 424
    assert "/data/upload/1/a.png" in str(error) and f"HTTP {status}" in str(error)
    assert LEGACY_TOKEN not in str(error)


def test_slow_server_times_out(server):
    server.routes["/data/upload/1/slow.png"] = Response(body=IMAGE_PNG, delay=3.0)
    with pytest.raises(ImageFetchError, match="timed out"):
        fetcher_for(server, timeout=0.3).fetch("/data/upload/1/slow.png")


def test_dripping_server_hits_the_whole_download_deadline(server):
    big = png_bytes(random_rgb(64, 64))
    server.routes["/data/upload/1/drip.png"] = Response(body=big, chunk_size=256, chunk_delay=0.1)
    with pytest.raises(ImageFetchError, match="timed out"):
        fetcher_for(server, timeout=0.5).fetch("/data/upload/1/drip.png")


def test_unreachable_host_is_an_upstream_failure():
    with LoopbackHTTPServer() as gone:
        base_url = gone.base_url
    fetcher = ImageFetcher(label_studio_url=base_url, api_key=LEGACY_TOKEN, timeout=2.0)
    with pytest.raises(ImageFetchError, match="cannot connect") as caught:
        fetcher.fetch("/data/upload/1/a.png")
    assert caught.value.http_status == 424 and caught.value.status is None


def test_relative_path_without_label_studio_url_names_the_setting():
    with pytest.raises(ImageFetchError, match="LABEL_STUDIO_URL"):
        ImageFetcher().fetch("/data/upload/1/a.png")


# ------------------------------------------------------------------------------- limits and content


@pytest.mark.parametrize("send_length", [True, False])
def test_too_large_download_is_refused_with_or_without_content_length(server, send_length):
    body = png_bytes(random_rgb(64, 64))
    server.routes["/data/upload/1/big.png"] = Response(body=body, send_length=send_length)
    with pytest.raises(ImageFetchError, match="too large") as caught:
        fetcher_for(server, max_bytes=len(body) - 1).fetch("/data/upload/1/big.png")
    assert caught.value.http_status == 422


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
@pytest.mark.parametrize("side", [100_000, 10_000])
def test_decompression_bomb_header_is_refused_before_decoding(server, side):
    server.routes["/data/upload/1/bomb.png"] = Response(body=png_header_only(side, side))
    with pytest.raises(ImageFetchError, match="too large") as caught:
        fetcher_for(server).fetch("/data/upload/1/bomb.png")
    assert caught.value.http_status == 422


def test_pixel_limit_is_checked(server):
    server.routes["/data/upload/1/a.png"] = Response(body=IMAGE_PNG)
    with pytest.raises(ImageFetchError, match="MAX_IMAGE_PIXELS"):
        fetcher_for(server, max_pixels=12 * 16 - 1).fetch("/data/upload/1/a.png")
    assert fetcher_for(server, max_pixels=12 * 16).fetch("/data/upload/1/a.png").shape == (12, 16, 3)


@pytest.mark.parametrize(
    "body, message",
    [
        (IMAGE_PNG[: len(IMAGE_PNG) // 2], "corrupt or truncated"),
        (b"<html>not an image</html>", "not an image"),
    ],
    ids=["truncated", "not-an-image"],
)
def test_broken_content_is_an_error_naming_the_url(server, body, message):
    server.routes["/data/upload/1/x.png"] = Response(body=body)
    with pytest.raises(ImageFetchError, match=message) as caught:
        fetcher_for(server).fetch("/data/upload/1/x.png")
    assert "/data/upload/1/x.png" in str(caught.value) and caught.value.http_status == 422


def test_exif_orientation_is_applied(server):
    raw = np.zeros((20, 40, 3), dtype=np.uint8)
    raw[:, :20] = (255, 0, 0)  # left half red
    raw[:, 20:] = (0, 0, 255)  # right half blue
    exif = Image.Exif()
    exif[0x0112] = 6  # display rotated 90 degrees clockwise
    buffer = io.BytesIO()
    Image.fromarray(raw).save(buffer, format="JPEG", exif=exif, quality=95)
    server.routes["/data/upload/1/rotated.jpg"] = Response(body=buffer.getvalue())
    image = fetcher_for(server).fetch("/data/upload/1/rotated.jpg")
    assert image.shape == (40, 20, 3)
    expected = np.rot90(raw, k=-1)  # clockwise: the left (red) half becomes the top
    assert np.abs(image.astype(int) - expected.astype(int)).mean() < 8


# ------------------------------------------------------------------------------- modes


def _encoded(mode: str) -> tuple[bytes, np.ndarray]:
    """An 8×6 image in ``mode`` and the RGB array it must decode to."""
    gray = np.tile(np.arange(0, 240, 30, dtype=np.uint8), (6, 1))  # (6, 8)
    rgb_of_gray = np.repeat(gray[:, :, None], 3, axis=2)
    buffer = io.BytesIO()
    if mode == "L":
        Image.fromarray(gray).save(buffer, format="PNG")
        return buffer.getvalue(), rgb_of_gray
    if mode == "I;16":
        Image.fromarray(gray.astype(np.uint16) * 257).save(buffer, format="PNG")
        return buffer.getvalue(), rgb_of_gray
    if mode in ("LA", "RGBA"):
        alpha = np.where(np.arange(8) < 4, 255, 0).astype(np.uint8)[None, :].repeat(6, axis=0)
        channels = [gray, alpha] if mode == "LA" else [gray, gray, gray, alpha]
        Image.fromarray(np.stack(channels, axis=2), mode=mode).save(buffer, format="PNG")
        expected = rgb_of_gray.copy()
        expected[:, 4:] = 255  # transparent → white
        return buffer.getvalue(), expected
    if mode == "P":
        Image.fromarray(IMAGE[:6, :8]).convert("P", palette=Image.Palette.ADAPTIVE, colors=256).save(
            buffer, "PNG"
        )
        return buffer.getvalue(), np.asarray(Image.open(io.BytesIO(buffer.getvalue())).convert("RGB"))
    if mode == "CMYK":
        Image.fromarray(rgb_of_gray).convert("CMYK").save(buffer, format="TIFF")
        return buffer.getvalue(), rgb_of_gray
    if mode == "1":
        bits = gray > 100
        Image.fromarray(bits).save(buffer, format="PNG")
        return buffer.getvalue(), np.repeat((bits * 255).astype(np.uint8)[:, :, None], 3, axis=2)
    raise ValueError(mode)


@pytest.mark.parametrize("mode", ["L", "LA", "P", "RGBA", "I;16", "CMYK", "1"])
def test_every_mode_becomes_rgb_uint8(mode):
    data, expected = _encoded(mode)
    image = decode_image(data, max_pixels=10_000)
    assert image.dtype == np.uint8 and image.shape == (6, 8, 3) and image.flags.c_contiguous
    np.testing.assert_allclose(image.astype(int), expected.astype(int), atol=1)


# ------------------------------------------------------------------------------- policy


def test_plain_url_of_an_unlisted_host_is_refused_without_a_request(server, other_server):
    other_server.routes["/a.png"] = Response(body=IMAGE_PNG)
    with pytest.raises(ImageFetchError, match="ALLOWED_IMAGE_HOSTS") as caught:
        fetcher_for(server).fetch(other_server.url("/a.png"))
    assert caught.value.http_status == 422 and other_server.requests == []


def test_listed_host_resolving_to_a_private_address_is_refused_unless_allowed(server, other_server):
    other_server.routes["/a.png"] = Response(body=IMAGE_PNG)
    url = f"http://localhost:{other_server.port}/a.png"
    with pytest.raises(ImageFetchError, match="ALLOW_PRIVATE_IMAGE_HOSTS"):
        fetcher_for(server, allowed_hosts=["localhost"]).fetch(url)
    assert other_server.requests == []
    image = fetcher_for(server, allowed_hosts=["localhost"], allow_private_hosts=True).fetch(url)
    np.testing.assert_array_equal(image, IMAGE)
    assert other_server.requests[0].header("Authorization") is None  # not Label Studio's origin


def rebinding_resolver(monkeypatch, name: str, public: str = "93.184.216.34") -> list[str]:
    """Resolve ``name`` to a public address the first time, to 127.0.0.1 afterwards (DNS
    rebinding); other names resolve normally. Returns the answers given, in order."""
    real = socket.getaddrinfo
    answers: list[str] = []

    def resolve(host, port, *args, **kwargs):
        if host != name:
            return real(host, port, *args, **kwargs)
        address = public if not answers else "127.0.0.1"
        answers.append(address)
        return [(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP, "", (address, port))]

    monkeypatch.setattr(socket, "getaddrinfo", resolve)
    return answers


def test_a_host_whose_dns_answer_turns_private_after_the_check_is_refused_before_a_request(
    server, other_server, monkeypatch
):
    other_server.routes["/a.png"] = Response(body=IMAGE_PNG)
    answers = rebinding_resolver(monkeypatch, "rebind.test")
    url = f"http://rebind.test:{other_server.port}/a.png"
    with pytest.raises(ImageFetchError, match="DNS answer changed") as caught:
        fetcher_for(server, allowed_hosts=["rebind.test"]).fetch(url)
    assert caught.value.http_status == 422
    assert answers[0] == "93.184.216.34" and "127.0.0.1" in answers[1:], answers  # checked, then connected
    assert other_server.requests == [], "no byte of the request reached the internal address"


def test_without_the_connection_guard_a_rebinding_host_would_reach_the_internal_address(
    server, other_server, monkeypatch
):
    other_server.routes["/a.png"] = Response(body=IMAGE_PNG)
    rebinding_resolver(monkeypatch, "rebind.test")
    monkeypatch.setattr(images, "public_peer_session", requests.Session)  # the host policy alone
    url = f"http://rebind.test:{other_server.port}/a.png"
    np.testing.assert_array_equal(fetcher_for(server, allowed_hosts=["rebind.test"]).fetch(url), IMAGE)
    assert len(other_server.requests) == 1


def test_label_studio_host_is_exempt_from_the_private_address_rule(server):
    server.routes["/media/a.png"] = Response(body=IMAGE_PNG)
    np.testing.assert_array_equal(fetcher_for(server).fetch(server.url("/media/a.png")), IMAGE)


@pytest.mark.parametrize("scheme_url", ["ftp://example.com/a.png", "file:///etc/passwd"])
def test_unsupported_schemes_are_refused(scheme_url):
    with pytest.raises(ImageFetchError, match="unsupported URL scheme") as caught:
        ImageFetcher().fetch(scheme_url)
    assert caught.value.http_status == 400


# ------------------------------------------------------------------------------- local files


@pytest.fixture
def local_root(tmp_path: Path) -> Path:
    root = tmp_path / "root"
    (root / "sub").mkdir(parents=True)
    (root / "sub" / "a.png").write_bytes(IMAGE_PNG)
    (tmp_path / "secret.png").write_bytes(IMAGE_PNG)
    return root


def test_local_files_are_read_from_the_document_root_without_http(server, local_root):
    fetcher = fetcher_for(server, local_files_root=local_root)
    np.testing.assert_array_equal(fetcher.fetch("/data/local-files/?d=sub/a.png"), IMAGE)
    np.testing.assert_array_equal(fetcher.fetch(str(local_root / "sub" / "a.png")), IMAGE)
    assert server.requests == []


@pytest.mark.parametrize("d", ["../secret.png", "sub/../../secret.png", "/etc/passwd"])
def test_local_files_path_traversal_is_refused(server, local_root, d):
    with pytest.raises(ImageFetchError, match="escapes") as caught:
        fetcher_for(server, local_files_root=local_root).fetch(f"/data/local-files/?d={d}")
    assert caught.value.http_status == 400 and server.requests == []


def test_local_file_missing_under_the_root_goes_through_label_studio(server, local_root):
    server.routes["/data/local-files/"] = Response(body=IMAGE_PNG)
    fetcher = fetcher_for(server, local_files_root=local_root)
    np.testing.assert_array_equal(fetcher.fetch("/data/local-files/?d=sub/missing.png"), IMAGE)
    (request,) = server.requests_to("/data/local-files/")
    assert request.path == "/data/local-files/?d=sub/missing.png"
    assert request.header("Authorization") == f"Token {LEGACY_TOKEN}"


# ------------------------------------------------------------------------------- data URIs, cache


def test_data_uri_is_decoded_with_the_same_limits():
    uri = "data:image/png;base64," + base64.b64encode(IMAGE_PNG).decode()
    np.testing.assert_array_equal(ImageFetcher().fetch(uri), IMAGE)
    with pytest.raises(ImageFetchError, match="too large"):
        ImageFetcher(max_bytes=len(IMAGE_PNG) // 2).fetch(uri)


def test_cache_serves_repeats_and_stays_within_its_byte_bound(server):
    images = {name: random_rgb(20, 20, seed=i) for i, name in enumerate("abc")}
    for name, array in images.items():
        server.routes[f"/data/upload/1/{name}.png"] = Response(body=png_bytes(array))
    fetcher = fetcher_for(server, cache_bytes=2 * 20 * 20 * 3)
    first = fetcher.fetch("/data/upload/1/a.png")
    again = fetcher.fetch("/data/upload/1/a.png")
    assert again is first and not first.flags.writeable
    assert len(server.requests_to("/data/upload/1/a.png")) == 1
    for name in "bc":
        np.testing.assert_array_equal(fetcher.fetch(f"/data/upload/1/{name}.png"), images[name])
    assert fetcher.cache.nbytes <= 2 * 20 * 20 * 3 and "/data/upload/1/a.png" not in fetcher.cache
    np.testing.assert_array_equal(fetcher.fetch("/data/upload/1/a.png"), images["a"])
    assert len(server.requests_to("/data/upload/1/a.png")) == 2


# ------------------------------------------------------------------------------- helpers


def test_get_json_uses_label_studio_auth(server):
    server.routes["/api/projects/1/"] = lambda request: Response(
        body=json.dumps({"auth": request.header("Authorization")}).encode()
    )
    assert fetcher_for(server).get_json("/api/projects/1/") == {"auth": f"Token {LEGACY_TOKEN}"}


def test_token_kinds_and_origin_matching():
    assert LabelStudioAuth(None, None).kind == "none"
    assert LabelStudioAuth("http://ls:8080", LEGACY_TOKEN).kind == "legacy"
    assert LabelStudioAuth("http://ls:8080", fake_jwt(token_type="access", exp=1)).kind == "access"
    auth = LabelStudioAuth("http://LS:8080/sub/", LEGACY_TOKEN)
    assert auth.owns("http://ls:8080/data/upload/1/a.png")
    assert not auth.owns("https://ls:8080/a.png") and not auth.owns("http://ls:8081/a.png")
    assert not auth.owns("http://ls.evil.com:8080/a.png")
    assert LabelStudioAuth("https://ls", LEGACY_TOKEN).owns("https://ls:443/a.png")
    assert auth.headers_for("http://other:8080/a.png") == {}


def test_redact_url_masks_credentials_and_signatures():
    shown = redact_url("https://user:pw@bucket.s3.com/a.png?X-Amz-Signature=deadbeef&v=1&token=abc")
    assert "pw" not in shown and "deadbeef" not in shown and "abc" not in shown and "v=1" in shown
    assert redact_url("/data/local-files/?d=dir/a.png") == "/data/local-files/?d=dir/a.png"
    assert len(redact_url("data:image/png;base64," + "A" * 10_000)) < 80
