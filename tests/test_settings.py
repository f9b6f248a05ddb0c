"""Settings.from_env: defaults, parsing, every problem reported at once, secrets hidden, files."""

from __future__ import annotations

from pathlib import Path

import pytest

from backend.settings import RANDOM_WEIGHTS, Settings, SettingsError

SECRET_KEY = "s3cr3t-api-key-value"


def test_defaults_from_an_empty_environment():
    settings = Settings.from_env({})
    assert settings.sam_model_type == "vit_b" and settings.port == 9090 and settings.workers == 1
    assert settings.threads == 8 and settings.log_level == "INFO" and settings.device == "auto"
    assert settings.sam_checkpoint == Path("model_dir/weights/sam_vit_b_01ec64.pth")
    assert settings.embedder_weights == Path(
        "model_dir/weights/vit_small_patch14_reg4_dinov2.lvd142m.safetensors"
    )
    assert settings.max_image_bytes == 64 << 20 and settings.max_image_pixels == 50_000_000
    assert settings.sam_cache_bytes == 1024 << 20 and settings.image_cache_bytes == 256 << 20
    assert settings.allowed_image_hosts == () and settings.allow_private_image_hosts is False
    assert settings.basic_auth_enabled is False and settings.prefetch_sam_embedding is True


def test_empty_values_count_as_unset():
    assert Settings.from_env({"PORT": "", "LABEL_STUDIO_URL": "  "}) == Settings.from_env({})


def test_values_are_parsed():
    env = {
        "SAM_MODEL_TYPE": "VIT_H",
        "MODEL_DIR": "/srv/models",
        "EMBEDDER_MODEL": "test_vit",
        "EMBEDDER_WEIGHTS": "Random",
        "EMBEDDER_LONG_SIDE": "448",
        "DEVICE": "cuda:1",
        "LABEL_STUDIO_URL": "https://ls.example.com/sub/",
        "LABEL_STUDIO_API_KEY": SECRET_KEY,
        "BASIC_AUTH_USER": "u",
        "BASIC_AUTH_PASS": "p",
        "WEBHOOK_SECRET": "w",
        "PORT": "8000",
        "LOG_LEVEL": "debug",
        "AUTO_PRED_IOU_THRESH": "0.5",
        "UNKNOWN_POLICY": "drop",
        "CLASSIFIER_METHOD": "knn",
        "MIN_MARGIN": "0.1",
        "MAX_IMAGE_BYTES": "16M",
        "ALLOWED_IMAGE_HOSTS": "Images.Example.com, *.cdn.net:8443 ,",
        "ALLOW_PRIVATE_IMAGE_HOSTS": "yes",
        "LOCAL_FILES_DOCUMENT_ROOT": "/data",
        "FETCH_TIMEOUT": "2.5",
        "PREFETCH_SAM_EMBEDDING": "off",
    }
    settings = Settings.from_env(env)
    assert settings.sam_model_type == "vit_h"
    assert settings.sam_checkpoint == Path("/srv/models/weights/sam_vit_h_4b8939.pth")
    assert settings.embedder_weights == RANDOM_WEIGHTS and settings.embedder_long_side == 448
    assert settings.device == "cuda:1" and settings.port == 8000 and settings.log_level == "DEBUG"
    assert settings.label_studio_url == "https://ls.example.com/sub"
    assert settings.basic_auth_enabled and settings.webhook_secret == "w"
    assert settings.unknown_policy == "drop" and settings.max_image_bytes == 16 << 20
    assert settings.allowed_image_hosts == ("images.example.com", "*.cdn.net:8443")
    assert settings.allow_private_image_hosts is True and settings.prefetch_sam_embedding is False
    assert settings.local_files_root == Path("/data") and settings.fetch_timeout == 2.5
    assert settings.classifier_options() == {
        "method": "knn",
        "knn_k": 5,
        "unknown_policy": "drop",
        "min_margin": 0.1,
    }


@pytest.mark.parametrize(
    "text, expected",
    [
        ("1048576", 1 << 20),
        ("1024K", 1 << 20),
        ("64M", 64 << 20),
        ("64mb", 64 << 20),
        ("1GiB", 1 << 30),
        ("10 B", 10),
    ],
)
def test_sizes_accept_binary_suffixes(text, expected):
    assert Settings.from_env({"MAX_IMAGE_BYTES": text}).max_image_bytes == expected


@pytest.mark.parametrize(
    "env, variable, shown",
    [
        ({"SAM_MODEL_TYPE": "vit_x"}, "SAM_MODEL_TYPE", "'vit_x'"),
        ({"PORT": "http"}, "PORT", "'http'"),
        ({"PORT": "70000"}, "PORT", "70000"),
        ({"WORKERS": "0"}, "WORKERS", "0"),
        ({"DEVICE": "gpu"}, "DEVICE", "'gpu'"),
        ({"LABEL_STUDIO_URL": "localhost:8080"}, "LABEL_STUDIO_URL", "'localhost:8080'"),
        ({"LABEL_STUDIO_URL": "ftp://ls"}, "LABEL_STUDIO_URL", "'ftp://ls'"),
        ({"LOG_LEVEL": "chatty"}, "LOG_LEVEL", "'chatty'"),
        ({"AUTO_PRED_IOU_THRESH": "1.5"}, "AUTO_PRED_IOU_THRESH", "1.5"),
        ({"AUTO_BOX_NMS_THRESH": "nan"}, "AUTO_BOX_NMS_THRESH", "'nan'"),
        ({"UNKNOWN_POLICY": "guess"}, "UNKNOWN_POLICY", "'guess'"),
        ({"CLASSIFIER_METHOD": "svm"}, "CLASSIFIER_METHOD", "'svm'"),
        ({"MAX_IMAGE_BYTES": "64 lots"}, "MAX_IMAGE_BYTES", "'64 lots'"),
        ({"SAM_CACHE_MB": "-1"}, "SAM_CACHE_MB", "-1"),
        ({"FETCH_TIMEOUT": "0"}, "FETCH_TIMEOUT", "0.0"),
        ({"ALLOWED_IMAGE_HOSTS": "https://a.com/x"}, "ALLOWED_IMAGE_HOSTS", "'https://a.com/x'"),
        ({"ALLOW_PRIVATE_IMAGE_HOSTS": "maybe"}, "ALLOW_PRIVATE_IMAGE_HOSTS", "'maybe'"),
        ({"EMBEDDER_LONG_SIDE": "8"}, "EMBEDDER_LONG_SIDE", "8"),
        ({"BASIC_AUTH_USER": "u", "WEBHOOK_SECRET": "w"}, "BASIC_AUTH_PASS", "BASIC_AUTH_USER is set"),
        ({"BASIC_AUTH_PASS": "p", "WEBHOOK_SECRET": "w"}, "BASIC_AUTH_USER", "BASIC_AUTH_PASS is set"),
        ({"BASIC_AUTH_USER": "u", "BASIC_AUTH_PASS": "p"}, "WEBHOOK_SECRET", "X-Samsem-Webhook-Secret"),
    ],
)
def test_each_bad_variable_is_named_with_its_value_and_expectation(env, variable, shown):
    with pytest.raises(SettingsError) as caught:
        Settings.from_env(env)
    (problem,) = caught.value.problems
    assert problem.startswith(variable) and "expected" in problem and shown in problem


def test_all_problems_are_reported_together():
    env = {"PORT": "x", "DEVICE": "gpu", "AUTO_PRED_IOU_THRESH": "2", "BASIC_AUTH_USER": "u"}
    with pytest.raises(SettingsError) as caught:
        Settings.from_env(env)
    names = [problem.split("=")[0].split(":")[0] for problem in caught.value.problems]
    assert sorted(names) == ["AUTO_PRED_IOU_THRESH", "BASIC_AUTH_PASS", "DEVICE", "PORT"]
    assert "4 problems" in str(caught.value) and isinstance(caught.value, ValueError)


def test_secrets_never_appear_in_repr_describe_or_errors():
    env = {
        "LABEL_STUDIO_API_KEY": SECRET_KEY,
        "BASIC_AUTH_USER": "u",
        "BASIC_AUTH_PASS": "pass-" + SECRET_KEY,
        "WEBHOOK_SECRET": "hook-" + SECRET_KEY,
    }
    settings = Settings.from_env(env)
    described = settings.describe()
    assert SECRET_KEY not in repr(settings) and SECRET_KEY not in str(described)
    assert described["label_studio_api_key"] == "***" and described["basic_auth_pass"] == "***"
    assert described["webhook_secret"] == "***" and described["basic_auth_user"] == "u"
    assert Settings.from_env({}).describe()["label_studio_api_key"] is None
    with pytest.raises(SettingsError) as caught:
        Settings.from_env({**env, "PORT": "x", "BASIC_AUTH_USER": ""})
    assert SECRET_KEY not in str(caught.value)


def test_describe_is_json_able():
    import json

    described = Settings.from_env(
        {"ALLOWED_IMAGE_HOSTS": "a.com", "LOCAL_FILES_DOCUMENT_ROOT": "/x"}
    ).describe()
    assert json.loads(json.dumps(described))["allowed_image_hosts"] == ["a.com"]


def test_direct_construction_is_validated_too():
    with pytest.raises(SettingsError, match="PORT"):
        Settings(port=0)
    with pytest.raises(SettingsError, match="UNKNOWN_POLICY"):
        Settings(unknown_policy="maybe")
    assert Settings(sam_model_type="tiny-random").sam_checkpoint is None


def test_validate_files_lists_every_missing_file(tmp_path):
    settings = Settings(model_dir=tmp_path, local_files_root=tmp_path / "missing-root")
    with pytest.raises(SettingsError) as caught:
        settings.validate_files()
    problems = caught.value.problems
    assert [p.split("=")[0] for p in problems] == [
        "SAM_CHECKPOINT",
        "EMBEDDER_WEIGHTS",
        "LOCAL_FILES_DOCUMENT_ROOT",
    ]
    assert "samsem_plugin.weights download" in problems[0] and str(tmp_path) in problems[0]
    weights = tmp_path / "weights"
    weights.mkdir()
    (weights / "sam_vit_b_01ec64.pth").write_bytes(b"x")
    (weights / "vit_small_patch14_reg4_dinov2.lvd142m.safetensors").write_bytes(b"x")
    Settings(model_dir=tmp_path).validate_files()  # nothing missing now
    Settings(
        model_dir=tmp_path / "new", sam_model_type="tiny-random", embedder_weights="random"
    ).validate_files()


def test_resolved_device(monkeypatch):
    import torch

    assert Settings(device="cpu").resolved_device() == "cpu"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert Settings(device="auto").resolved_device() == "cpu"
    with pytest.raises(SettingsError, match="DEVICE='cuda:0'"):
        Settings(device="cuda:0").resolved_device()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert Settings(device="auto").resolved_device() == "cuda"
    assert Settings(device="cuda:1").resolved_device() == "cuda:1"
    with pytest.raises(SettingsError, match="2 CUDA device"):
        Settings(device="cuda:2").resolved_device()


def test_weights_dir_sets_default_weight_paths(tmp_path):
    settings = Settings.from_env({"MODEL_DIR": str(tmp_path / "m"), "WEIGHTS_DIR": str(tmp_path / "w")})
    assert settings.weights_dir == tmp_path / "w"
    assert settings.sam_checkpoint == tmp_path / "w" / "sam_vit_b_01ec64.pth"
    assert settings.embedder_weights == tmp_path / "w" / "vit_small_patch14_reg4_dinov2.lvd142m.safetensors"
    default = Settings.from_env({"MODEL_DIR": str(tmp_path / "m")})
    assert default.weights_dir == tmp_path / "m" / "weights"
