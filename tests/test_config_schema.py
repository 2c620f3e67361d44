"""`lumos config schema` documents every field: each property of every config carries a
description (what the field is; the field's comment in the source says why)."""

from __future__ import annotations

import json
import subprocess
import sys
from typing import Any

from lumos.config import config_schema


def _undescribed(schema: dict[str, Any]) -> list[str]:
    """`Model.field` for every property without a description, in the root and every $def."""
    models = {"PipelineConfig": schema, **schema.get("$defs", {})}
    return [
        f"{name}.{field}"
        for name, model in models.items()
        for field, prop in model.get("properties", {}).items()
        if not str(prop.get("description", "")).strip()
    ]


def test_every_field_of_every_config_has_a_description() -> None:
    schema = config_schema()
    # The walk reaches every stage's config, nested models included.
    assert {"TrainConfig", "EncodersConfig", "DistributedConfig", "Toleration"} <= set(
        schema["$defs"]
    )
    assert _undescribed(schema) == []


def test_the_walk_finds_a_field_without_one() -> None:
    schema = {
        "properties": {"a": {"description": "x"}, "b": {}},
        "$defs": {"M": {"properties": {"c": {"description": " "}}}},
    }
    assert _undescribed(schema) == ["PipelineConfig.b", "M.c"]


def test_lumos_config_schema_prints_them() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "lumos.cli", "config", "schema"],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    schema = json.loads(out.stdout)
    assert _undescribed(schema) == []
    assert (
        "AdamW learning rate" in schema["$defs"]["TrainConfig"]["properties"]["lr"]["description"]
    )
