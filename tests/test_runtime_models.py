"""Runtime model building from settings: the embedding space names what the embedder really is."""

from __future__ import annotations

from backend.runtime import build_models, embedder_space
from backend.settings import Settings


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
    assert embedder_space(settings).endswith("+ms")


def test_single_scale_space_differs_so_memories_never_mix(tmp_path):
    single = _settings(tmp_path)
    multi = _settings(tmp_path, embedder_multi_scale=True)
    assert embedder_space(single) != embedder_space(multi)
    assert build_models(single).embedder.embedder_id == embedder_space(single)


def test_multi_scale_env_var_is_parsed(tmp_path):
    env = {"EMBEDDER_MULTI_SCALE": "true", "MODEL_DIR": str(tmp_path)}
    assert Settings.from_env(env).embedder_multi_scale is True
    assert Settings.from_env({"MODEL_DIR": str(tmp_path)}).embedder_multi_scale is False
