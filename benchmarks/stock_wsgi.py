"""WSGI app of the click baseline: what the official Label Studio SAM backends do per click.

The samsem service (same routes, same models and settings) whose SAM runs segment-anything's stock
image-encoder attention and keeps no image embedding, so every click pays a full stock encoder
pass (``SamPredictor.set_image`` per request in the official backends). Served by gunicorn as
``benchmarks.stock_wsgi:app`` with ``SAM_CACHE_MB=0`` (see :mod:`benchmarks.bench_click`).
"""

from __future__ import annotations

from segment_anything.modeling.image_encoder import Attention

from backend.app import create_app
from backend.messages import configure_logging
from backend.runtime import Models, Runtime, build_models
from backend.settings import Settings
from samsem_plugin.sam_models import FusedAttention


def stock_models(settings: Settings) -> Models:
    """The service's models with the SAM encoder's attention switched back to segment-anything's."""
    models = build_models(settings)
    for module in models.proposer.sam.image_encoder.modules():
        if type(module) is FusedAttention:
            module.__class__ = Attention
    return models


settings = Settings.from_env()
configure_logging(settings.log_level)
app = create_app(settings, Runtime(settings, models_factory=stock_models))
