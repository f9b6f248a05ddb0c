"""Runtime model building from settings: the embedding space names what the embedder really is,
the precision setting reaches both models."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch

from backend.runtime import build_models, embedder_space
from backend.settings import Settings, SettingsError
from samsem_plugin.embedder import MULTI_SCALE_SUFFIX
from samsem_plugin.prompts import Prompt


def _settings(tmp_path, **overrides) -> Settings:
    values = dict(
        sam_model_type="tiny-random",
        embedder_model="test_efficientnet",
        embedder_weights="random",
        model_dir=tmp_path,
        points_per_side=4,
    )
    values.update(overrides)
    return Settings(**values)


def test_multi_scale_setting_reaches_the_embedder_and_its_memory_space(tmp_path):
    settings = _settings(tmp_path, embedder_multi_scale=True)
    models = build_models(settings)
    assert models.embedder.multi_scale is True
    assert models.embedder.embedder_id == embedder_space(settings)
    assert embedder_space(settings).endswith(MULTI_SCALE_SUFFIX)


def test_single_scale_space_differs_so_memories_never_mix(tmp_path):
    single = _settings(tmp_path)
    multi = _settings(tmp_path, embedder_multi_scale=True)
    assert embedder_space(single) != embedder_space(multi)
    assert build_models(single).embedder.embedder_id == embedder_space(single)


def test_multi_scale_env_var_is_parsed(tmp_path):
    env = {"EMBEDDER_MULTI_SCALE": "true", "MODEL_DIR": str(tmp_path)}
    assert Settings.from_env(env).embedder_multi_scale is True
    assert Settings.from_env({"MODEL_DIR": str(tmp_path)}).embedder_multi_scale is False


def test_precision_defaults_to_float32_on_cpu_and_bf16_reaches_both_models(tmp_path):
    exact = build_models(_settings(tmp_path))
    assert exact.proposer.autocast_dtype is None and exact.embedder._autocast_dtype is None
    fast = build_models(_settings(tmp_path, precision="bf16"))
    assert fast.proposer.autocast_dtype is torch.bfloat16
    assert fast.embedder._autocast_dtype is torch.bfloat16
    image = np.random.default_rng(0).integers(0, 255, (48, 64, 3), dtype=np.uint8)
    masks = np.zeros((2, 48, 64), bool)
    masks[0, :20, :30], masks[1, 25:, 30:] = True, True
    vectors = fast.embedder.embed(image, masks)  # the backbone runs under autocast, float32 out
    assert vectors.dtype == np.float32 and np.allclose(np.linalg.norm(vectors, axis=1), 1, atol=1e-5)
    prompt = fast.proposer.predict_prompt(image, Prompt(np.array([[10.0, 10.0]]), np.array([1])))
    assert prompt.masks.shape == (3, 48, 64) and prompt.extra["predicted_iou"].dtype == np.float32


@pytest.mark.parametrize(
    ("env", "problem"),
    [
        ({"PRECISION": "half"}, "PRECISION='half': expected one of"),
        ({"PRECISION": "fp16", "DEVICE": "cpu"}, "PRECISION=fp16: expected a CUDA device"),
    ],
)
def test_bad_precision_is_refused_at_start(tmp_path, env, problem):
    with pytest.raises(SettingsError, match=re.escape(problem)):
        Settings.from_env({"MODEL_DIR": str(tmp_path), **env})


def test_fp16_with_automatic_device_is_refused_when_it_resolves_to_cpu(tmp_path):
    settings = Settings.from_env({"MODEL_DIR": str(tmp_path), "PRECISION": "fp16"})
    with pytest.raises(SettingsError, match="expected a CUDA device"):
        settings.autocast_dtype("cpu")
    assert settings.autocast_dtype("cuda") is torch.float16
