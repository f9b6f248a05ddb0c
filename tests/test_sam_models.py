"""samsem_plugin.sam_models (building SAM, reading checkpoints) and samsem_plugin.weights (the
download / verify command, against a real HTTP server on 127.0.0.1; no internet)."""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path

import numpy as np
import pytest
import requests
import torch
from segment_anything import SamAutomaticMaskGenerator, SamPredictor
from skimage import data as skimage_data
from skimage.transform import resize

from samsem_plugin import sam_models, weights
from samsem_plugin.errors import WeightsError
from samsem_plugin.sam_models import (
    OFFICIAL_CHECKPOINTS,
    SAM_MODEL_TYPES,
    build_sam,
    build_tiny_sam,
    load_sam_state,
    sam_info,
)
from tests.support.http_server import LoopbackHTTPServer, RecordedRequest, Response

# -- helpers -------------------------------------------------------------------------------------


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """Tiny-model ops are too small to gain from threads, and on a busy shared runner two threads per
    op wait on each other (3-20x slower measured here); results are compared within one setting."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def photo(name: str = "astronaut", size: tuple[int, int] = (96, 128)) -> np.ndarray:
    """A scikit-image photo resized to ``size = (H, W)``, ``uint8`` RGB."""
    image = getattr(skimage_data, name)()
    return resize(image, size, anti_aliasing=True, preserve_range=True).astype(np.uint8)


def prompt_outputs(sam, image: np.ndarray, click=(40, 30)):
    """SamPredictor masks, scores and low-res logits for one positive click (XY pixels)."""
    predictor = SamPredictor(sam)
    predictor.set_image(image)
    return predictor.predict(np.array([click], np.float32), np.array([1]))


def mask_iou(a: np.ndarray, b: np.ndarray) -> float:
    union = np.logical_or(a, b).sum()
    return float(np.logical_and(a, b).sum() / union) if union else 1.0


@pytest.fixture(scope="module")
def tiny():
    return build_tiny_sam()


@pytest.fixture(scope="module")
def tiny_state(tiny):
    return {k: v.clone() for k, v in tiny.state_dict().items()}


class _RecordsIfUnpickled:
    """Unpickling this object would call ``_touch(path)``: a stand-in for arbitrary code."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return (_touch, (self.path,))


def _touch(path: str) -> None:
    Path(path).write_text("code ran")


# -- sam_info ------------------------------------------------------------------------------------


@pytest.mark.parametrize("model_type", ["vit_b", "vit_l", "vit_h"])
def test_sam_info_gives_the_official_file_with_its_md5_prefix_in_the_name(model_type):
    info = sam_info(model_type)
    assert info["filename"] == f"sam_{model_type}_{info['md5'][:6]}.pth"
    assert info["filename_hash"] == info["md5"][:6]
    assert info["url"] == "https://dl.fbaipublicfiles.com/segment_anything/" + info["filename"]
    assert len(info["sha256"]) == 64 and info["size"] > 300_000_000


def test_sam_info_of_the_tiny_model_has_no_file_and_unknown_types_are_refused():
    assert sam_info("tiny-random") == {"model_type": "tiny-random", "filename": None, "url": None}
    with pytest.raises(ValueError, match="expected one of vit_b, vit_l, vit_h, tiny-random, got 'vit_x'"):
        sam_info("vit_x")


# -- the tiny model ------------------------------------------------------------------------------


def test_tiny_model_is_deterministic_and_leaves_the_global_rng_alone(tiny_state):
    torch.manual_seed(123)
    before = torch.get_rng_state()
    again = build_tiny_sam().state_dict()
    assert torch.equal(torch.get_rng_state(), before)
    assert again.keys() == tiny_state.keys()
    assert all(torch.equal(again[k], tiny_state[k]) for k in tiny_state)
    other = build_tiny_sam(seed=1).state_dict()
    assert not all(torch.equal(other[k], tiny_state[k]) for k in tiny_state)


def test_tiny_model_warns_loudly(caplog):
    with caplog.at_level(logging.WARNING, logger="samsem_plugin.sam_models"):
        build_sam("tiny-random")
    assert any("UNTRAINED" in r.getMessage() and r.levelno == logging.WARNING for r in caplog.records)


def test_tiny_model_gives_three_nested_levels_that_depend_on_the_click(tiny):
    image = photo()
    masks_a, scores, low_res = prompt_outputs(tiny, image, click=(20, 20))
    masks_b, _, _ = prompt_outputs(tiny, image, click=(110, 85))
    assert masks_a.shape == (3, 96, 128) and scores.shape == (3,) and low_res.shape == (3, 64, 64)
    areas = masks_a.reshape(3, -1).sum(axis=1)
    assert 0 < areas[0] <= areas[1] <= areas[2] < 96 * 128
    assert (masks_a[0] <= masks_a[2]).all()  # nested: small level inside the large one
    assert all(mask_iou(masks_a[k], masks_b[k]) < 0.5 for k in range(3))
    assert masks_a[2][20, 20] and masks_b[2][85, 110]  # each contains its click


def test_tiny_model_gives_automatic_masks_at_sams_default_thresholds(tiny):
    records = SamAutomaticMaskGenerator(tiny, points_per_side=12).generate(photo())
    assert len(records) >= 3
    areas = sorted(r["area"] for r in records)
    assert areas[0] < areas[-1] / 4  # a variety of sizes, not one mask repeated
    assert all(r["predicted_iou"] > 0.88 and r["stability_score"] >= 0.95 for r in records)


# -- checkpoints ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "wrap",
    [
        lambda sd: sd,
        lambda sd: {"model": sd},
        lambda sd: {"state_dict": sd, "epoch": 3},
        lambda sd: {f"module.{k}": v for k, v in sd.items()},
        lambda sd: {"model": {f"module.{k}": v for k, v in sd.items()}},
    ],
    ids=["plain", "model", "state_dict", "module-prefix", "model+module-prefix"],
)
def test_checkpoint_round_trip_reproduces_the_model(tmp_path, wrap):
    source = build_tiny_sam(seed=7)
    path = tmp_path / "tiny.pth"
    torch.save(wrap(source.state_dict()), path)
    loaded = build_sam("tiny-random", path)
    image = photo("coffee")
    for expected, got in zip(prompt_outputs(source, image), prompt_outputs(loaded, image), strict=True):
        np.testing.assert_array_equal(expected, got)
    default = build_tiny_sam(seed=0)  # proves the file was read: seed 0 differs from seed 7
    assert not np.array_equal(prompt_outputs(default, image)[2], prompt_outputs(loaded, image)[2])


def test_missing_checkpoint_names_the_file_the_url_and_the_setting(tmp_path):
    path = tmp_path / "nowhere" / "sam_vit_b_01ec64.pth"
    with pytest.raises(WeightsError) as error:
        build_sam("vit_b", path)
    message = str(error.value)
    assert str(path) in message and "file not found" in message
    assert OFFICIAL_CHECKPOINTS["vit_b"].url in message
    assert "SAM_CHECKPOINT" in message and "python -m samsem_plugin.weights download --sam vit_b" in message


def test_official_type_without_checkpoint_says_where_to_get_one():
    with pytest.raises(
        WeightsError, match="SAM vit_h checkpoint: a checkpoint file is needed.*sam_vit_h_4b8939"
    ):
        build_sam("vit_h", None)


def test_unknown_model_type_lists_the_valid_ones():
    with pytest.raises(ValueError, match="vit_b, vit_l, vit_h, tiny-random"):
        build_sam("vit_s")
    assert SAM_MODEL_TYPES == ("vit_b", "vit_l", "vit_h", "tiny-random")


@pytest.mark.parametrize(
    "content, problem",
    [
        (b"this is not a checkpoint at all", "not a readable PyTorch checkpoint"),
        (b"PK\x03\x04" + bytes(64), "not a readable PyTorch checkpoint"),  # a broken zip
    ],
    ids=["text", "broken-zip"],
)
def test_corrupt_checkpoint_is_a_weights_error_naming_the_file(tmp_path, content, problem):
    path = tmp_path / "corrupt.pth"
    path.write_bytes(content)
    with pytest.raises(WeightsError, match=problem) as error:
        build_sam("tiny-random", path)
    assert str(path) in str(error.value)


def test_truncated_checkpoint_is_a_weights_error(tmp_path, tiny_state):
    path = tmp_path / "truncated.pth"
    torch.save(tiny_state, path)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(WeightsError, match=f"not a readable PyTorch checkpoint.*{path.name}"):
        build_sam("tiny-random", path)


def test_checkpoint_without_tensors_is_a_weights_error(tmp_path):
    path = tmp_path / "empty.pth"
    torch.save({"epoch": 3, "note": "no tensors"}, path)
    with pytest.raises(WeightsError, match="no tensors found"):
        build_sam("tiny-random", path)


def test_pickled_objects_are_refused_without_running_their_code(tmp_path, tiny_state):
    marker = tmp_path / "marker.txt"
    path = tmp_path / "evil.pth"
    torch.save({"model": tiny_state, "extra": _RecordsIfUnpickled(str(marker))}, path)
    with pytest.raises(WeightsError, match="refused to unpickle") as error:
        build_sam("tiny-random", path)
    assert str(path) in str(error.value)
    assert not marker.exists()


def test_wrong_architecture_file_lists_the_mismatch(tmp_path, tiny_state):
    path = tmp_path / "tiny-as-vit-b.pth"
    torch.save(tiny_state, path)
    with pytest.raises(WeightsError) as error:
        build_sam("vit_b", path)
    message = str(error.value)
    assert "wrong architecture" in message and str(path) in message and "wrong shape" in message


def test_partial_state_dict_reports_missing_and_unexpected_keys(tmp_path, tiny_state):
    state = {k: v for k, v in tiny_state.items() if not k.startswith("mask_decoder.")}
    state["extra_head.weight"] = torch.zeros(3)
    path = tmp_path / "partial.pth"
    torch.save(state, path)
    with pytest.raises(
        WeightsError, match=r"missing \(e\.g\. mask_decoder\..*1 unexpected \(e\.g\. extra_head"
    ):
        build_sam("tiny-random", path)


def test_a_checkpoint_of_another_official_size_is_recognised():
    vit_b_state = sam_models._official_architecture("vit_b").state_dict()  # meta tensors: shapes only
    with pytest.raises(WeightsError, match="looks like a SAM vit_b checkpoint"):
        load_sam_state(sam_models._official_architecture("vit_l"), vit_b_state, Path("x.pth"), "vit_l")


def test_official_model_adopts_the_checkpoint_tensors_without_random_init(monkeypatch, tmp_path):
    shapes = sam_models._official_architecture("vit_b").state_dict()
    state = {k: torch.empty(v.shape, dtype=v.dtype) for k, v in shapes.items()}
    path = tmp_path / "sam_vit_b_01ec64.pth"
    path.write_bytes(b"read by the patched reader")
    monkeypatch.setattr(sam_models, "read_sam_checkpoint", lambda p, t: state if Path(p) == path else None)
    sam = build_sam("vit_b", path)
    loaded = sam.state_dict()
    assert all(loaded[k].data_ptr() == state[k].data_ptr() for k in state)  # adopted, not copied
    assert not any(t.is_meta for t in (*sam.parameters(), *sam.buffers()))
    assert torch.allclose(sam.pixel_mean.flatten(), torch.tensor(sam_models.SAM_PIXEL_MEAN))
    assert not sam.training


# -- weights: download and verify against a loopback HTTP server ---------------------------------

PAYLOAD = bytes(range(256)) * 700  # 179 200 bytes: several 64 KiB chunks


def spec_for(url: str, content: bytes = PAYLOAD, **overrides) -> weights.WeightsSpec:
    values = dict(
        filename="sam_test.pth",
        url=url,
        sha256=hashlib.sha256(content).hexdigest(),
        md5=hashlib.md5(content).hexdigest(),
        size=len(content),
        setting="SAM_CHECKPOINT",
        label="SAM test",
    )
    values.update(overrides)
    return weights.WeightsSpec(**values)


def hub_route(content: bytes, linked: bytes, target: str):
    """Hugging-Face-like ``resolve`` route: HEAD/GET answer 302 to ``target`` with the SHA-256 and
    size of ``linked`` in ``X-Linked-Etag`` / ``X-Linked-Size``."""

    def answer(request: RecordedRequest) -> Response:
        headers = {
            "Location": target,
            "X-Linked-Etag": f'"{hashlib.sha256(linked).hexdigest()}"',
            "X-Linked-Size": str(len(linked)),
        }
        return Response(status=302, headers=headers)

    return answer


@pytest.fixture
def server():
    with LoopbackHTTPServer({"/files/good.bin": Response(body=PAYLOAD)}) as running:
        yield running


def leftovers(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.name.startswith("."))


def test_download_streams_verifies_and_renames_atomically(server, tmp_path):
    path = weights.download(spec_for(server.url("/files/good.bin")), tmp_path, progress=False)
    assert path == tmp_path / "sam_test.pth" and path.read_bytes() == PAYLOAD
    assert leftovers(tmp_path) == []
    sidecar = (tmp_path / "sam_test.pth.sha256").read_text()
    assert sidecar == f"{hashlib.sha256(PAYLOAD).hexdigest()}  sam_test.pth\n"


@pytest.mark.parametrize(
    "field, wrong",
    [("sha256", "0" * 64), ("md5", "0" * 32), ("size", len(PAYLOAD) + 1)],
)
def test_corrupt_download_is_refused_and_leaves_nothing(server, tmp_path, field, wrong):
    spec = spec_for(server.url("/files/good.bin"), **{field: wrong})
    with pytest.raises(weights.ChecksumError, match=f"{field} expected {wrong}, got"):
        weights.download(spec, tmp_path, progress=False)
    assert list(tmp_path.iterdir()) == []


def test_present_good_file_is_not_downloaded_again_and_a_bad_one_is_replaced(server, tmp_path):
    spec = spec_for(server.url("/files/good.bin"))
    weights.download(spec, tmp_path, progress=False)
    gets = len(server.requests_to("/files/good.bin"))
    weights.download(spec, tmp_path, progress=False)
    assert len(server.requests_to("/files/good.bin")) == gets
    (tmp_path / "sam_test.pth").write_bytes(b"damaged")
    weights.download(spec, tmp_path, progress=False)
    assert len(server.requests_to("/files/good.bin")) == gets + 1
    assert (tmp_path / "sam_test.pth").read_bytes() == PAYLOAD


def test_hub_file_is_checked_against_the_linked_etag(server, tmp_path):
    server.routes["/timm/resolve/good"] = hub_route(PAYLOAD, PAYLOAD, "/files/good.bin")
    server.routes["/timm/resolve/corrupt"] = hub_route(PAYLOAD, PAYLOAD + b"x", "/files/good.bin")
    unknown = dict(sha256=None, md5=None, size=None, filename="dino.safetensors")
    path = weights.download(spec_for(server.url("/timm/resolve/good"), **unknown), tmp_path, progress=False)
    assert path.read_bytes() == PAYLOAD
    heads = [r for r in server.requests_to("/timm/resolve/good") if r.method == "HEAD"]
    assert len(heads) == 1
    with pytest.raises(weights.ChecksumError, match="size expected"):
        weights.download(
            spec_for(server.url("/timm/resolve/corrupt"), **dict(unknown, filename="bad.safetensors")),
            tmp_path,
            progress=False,
        )
    assert not (tmp_path / "bad.safetensors").exists() and leftovers(tmp_path) == []


def test_hub_metadata_reads_sha256_and_size_without_following_the_redirect(server):
    server.routes["/r"] = hub_route(PAYLOAD, PAYLOAD, "/files/good.bin")
    sha256, size = weights.hub_metadata(server.url("/r"), requests.Session())
    assert sha256 == hashlib.sha256(PAYLOAD).hexdigest() and size == len(PAYLOAD)
    assert server.requests_to("/files/good.bin") == []
    server.routes["/plain"] = Response(headers={"ETag": '"abc"'})
    assert weights.hub_metadata(server.url("/plain"), requests.Session()) == (None, None)


def test_http_errors_are_download_errors(server, tmp_path):
    with pytest.raises(weights.DownloadError, match="HTTP 404"):
        weights.download(spec_for(server.url("/files/missing.bin")), tmp_path, progress=False)
    assert list(tmp_path.iterdir()) == []


def test_verify_checks_present_files_offline(server, tmp_path):
    spec = spec_for(server.url("/files/good.bin"))
    with pytest.raises(weights.DownloadError, match="not found"):
        weights.verify(spec, tmp_path)
    weights.download(spec, tmp_path, progress=False)
    assert weights.verify(spec, tmp_path) == tmp_path / "sam_test.pth"
    unknown = spec_for(spec.url, sha256=None, md5=None, size=None)
    assert weights.verify(unknown, tmp_path) == tmp_path / "sam_test.pth"  # via the sidecar
    (tmp_path / "sam_test.pth").write_bytes(PAYLOAD[:-1] + b"\x00")
    with pytest.raises(weights.ChecksumError, match="sha256 expected"):
        weights.verify(spec, tmp_path)
    with pytest.raises(weights.ChecksumError, match="sha256 expected"):
        weights.verify(unknown, tmp_path)
    (tmp_path / "sam_test.pth.sha256").unlink()
    with pytest.raises(weights.DownloadError, match="no known SHA-256"):
        weights.verify(unknown, tmp_path)


def test_command_line_downloads_verifies_and_prints_the_settings(server, tmp_path, monkeypatch, capsys):
    good = spec_for(server.url("/files/good.bin"), filename="sam_vit_b_01ec64.pth")
    monkeypatch.setattr(weights, "sam_spec", lambda model_type: good)
    assert weights.main(["download", "--sam", "vit_b", "--dir", str(tmp_path), "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert f"export SAM_CHECKPOINT={tmp_path / 'sam_vit_b_01ec64.pth'}" in out
    assert "export SAM_MODEL_TYPE=vit_b" in out and f"export WEIGHTS_DIR={tmp_path}" in out
    assert weights.main(["verify", "--sam", "vit_b", "--dir", str(tmp_path)]) == 0
    (tmp_path / "sam_vit_b_01ec64.pth").write_bytes(b"damaged")
    assert weights.main(["verify", "--sam", "vit_b", "--dir", str(tmp_path)]) == 1
    assert "size expected" in capsys.readouterr().err
    assert weights.main(["download", "--dir", str(tmp_path)]) == 2
    requests_before = len(server.requests)
    assert weights.main(["download", "--sam", "tiny-random", "--dir", str(tmp_path / "tiny")]) == 0
    assert len(server.requests) == requests_before and "no weights file needed" in capsys.readouterr().err


def test_specs_of_the_official_files():
    spec = weights.sam_spec("vit_l")
    assert spec.url.endswith("/sam_vit_l_0b3195.pth") and spec.md5.startswith("0b3195")
    dino = weights.dinov2_spec("vit_small_patch14_reg4_dinov2.lvd142m")
    assert dino.url == (
        "https://huggingface.co/timm/vit_small_patch14_reg4_dinov2.lvd142m/resolve/main/model.safetensors"
    )
    assert dino.filename == "vit_small_patch14_reg4_dinov2.lvd142m.safetensors"
    assert dino.setting == "EMBEDDER_WEIGHTS"
    with pytest.raises(ValueError, match="expected a timm model name with weights"):
        weights.dinov2_spec("no_such_model_anywhere")
    with pytest.raises(ValueError, match="expected one of vit_b, vit_l, vit_h"):
        weights.sam_spec("tiny-random")
