"""The service's JSON responses: orjson output equal to the standard library's for its payloads."""

from __future__ import annotations

import datetime
import decimal
import json

import numpy as np
from flask import Flask

from backend.json_responses import OrjsonProvider


def provider() -> OrjsonProvider:
    return OrjsonProvider(Flask("test"))


def test_prediction_payload_is_written_as_the_standard_library_writes_it():
    rle = np.random.default_rng(0).integers(0, 256, 5000).tolist()
    payload = {
        "results": [
            {
                "result": [{"id": "t1-0", "value": {"rle": rle, "brushlabels": ["Cat"]}, "score": 0.875}],
                "score": 0.875,
                "model_version": "samsem-x-3",
                "ünïcode": "✓",
                "none": None,
                "flag": True,
            }
        ]
    }
    text = provider().dumps(payload)
    assert text == json.dumps(payload, separators=(",", ":"), ensure_ascii=False)
    assert json.loads(text) == payload


def test_numpy_values_non_finite_floats_dates_and_flask_defaults():
    text = provider().dumps(
        {
            "a": np.float32(0.5),
            "b": np.arange(3),
            "nan": float("nan"),
            "day": datetime.date(2026, 11, 30),
            "price": decimal.Decimal("1.25"),  # not orjson's: Flask's default writes it
        }
    )
    expected = {"a": 0.5, "b": [0, 1, 2], "nan": None, "day": "2026-11-30", "price": "1.25"}
    assert json.loads(text) == expected


def test_the_app_answers_with_it(tmp_path):
    from backend.app import create_app
    from backend.settings import Settings

    app = create_app(Settings(model_dir=tmp_path))
    assert isinstance(app.json, OrjsonProvider)
    answer = app.test_client().get("/health")
    assert answer.status_code == 200 and answer.get_json()["status"] == "UP"
