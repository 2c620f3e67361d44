"""The pipeline config: presets, overrides, strict validation with messages naming each field."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from lumos.config import (
    PRESETS,
    ConfigError,
    PipelineConfig,
    config_schema,
    load_config,
    parse_set,
)


@pytest.mark.parametrize("preset", PRESETS)
def test_presets_validate(preset: str) -> None:
    cfg = load_config(preset=preset)
    assert cfg.preset == preset
    assert cfg.pretrain.head == "i2i"
    assert {cfg.finetune.t2i.head, cfg.finetune.novel_view.head, cfg.finetune.video.head} == {
        "t2i",
        "novel_view",
        "video",
    }


def test_defaults_are_the_paper_recipe() -> None:
    cfg = PipelineConfig()
    assert cfg.pretrain.model_size == "XL/2"
    assert cfg.pretrain.lr == pytest.approx(1e-4)
    assert cfg.pretrain.weight_decay == pytest.approx(0.03)
    assert cfg.pretrain.ema_decay == pytest.approx(0.9999)
    assert cfg.evaluate.guidance_scale == pytest.approx(4.5)
    assert cfg.ingest.paired_fraction == pytest.approx(0.1)


def test_set_overrides_nested_fields() -> None:
    cfg = load_config(preset="tiny", overrides=["pretrain.steps=7", "evaluate.seed=3"])
    assert cfg.pretrain.steps == 7
    assert cfg.evaluate.seed == 3


def test_invalid_config_names_every_bad_field(tmp_path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("pretrain:\n  steps: -3\n  warmup: 10\ningest:\n  resolution: big\n")
    with pytest.raises(ConfigError) as err:
        load_config(preset="tiny", config_file=bad)
    text = str(err.value)
    assert "pretrain.steps" in text
    assert "pretrain.warmup" in text  # unknown field: strict configs forbid extras
    assert "ingest.resolution" in text


def test_wrong_head_in_finetune_section_is_rejected() -> None:
    with pytest.raises(ConfigError, match="finetune.t2i.head"):
        load_config(preset="tiny", overrides=["finetune.t2i.head=video"])


def test_snr_floor_above_snr_gamma_is_rejected() -> None:
    with pytest.raises(ConfigError, match="snr_floor 6.0 is above snr_gamma 5.0"):
        load_config(preset="tiny", overrides=["finetune.video.snr_floor=6"])
    with pytest.raises(ConfigError, match="snr_floor"):
        load_config(preset="tiny", overrides=["pretrain.snr_floor=0"])


def test_unknown_preset_and_bad_set_syntax() -> None:
    with pytest.raises(ConfigError, match="unknown preset"):
        load_config(preset="huge")
    with pytest.raises(ConfigError, match="key.path=value"):
        parse_set(["pretrain.steps"])


def test_missing_config_file() -> None:
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(config_file="/nonexistent/lumos.yaml")


def test_json_round_trip_is_what_components_receive() -> None:
    cfg = load_config(preset="tiny")
    again = PipelineConfig.model_validate_json(cfg.model_dump_json())
    assert again == cfg


def test_cli_prints_schema_and_fails_before_work_on_bad_config() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "lumos.cli", "config", "schema"],
        capture_output=True,
        text=True,
        check=True,
    )
    schema = json.loads(out.stdout)
    assert schema == config_schema()
    assert "pretrain" in schema["properties"]
    bad = subprocess.run(
        [sys.executable, "-m", "lumos.cli", "run", "--set", "pretrain.steps=-1"],
        capture_output=True,
        text=True,
    )
    assert bad.returncode == 2
    assert "pretrain.steps" in bad.stderr


def test_partial_finetune_override_keeps_the_fine_tune_recipe() -> None:
    """A head's section naming only some keys (a ConfigMap's overrides.yaml) keeps that head's
    steps and name, not TrainConfig's pretraining defaults."""
    cfg = load_config(
        preset="xl",
        overrides=["finetune.t2i.lr=0.0002", "finetune.video.pushgateway_url=http://pg"],
    )
    assert cfg.finetune.t2i.steps == PipelineConfig().finetune.t2i.steps == 65_000
    assert cfg.finetune.t2i.head == "t2i" and cfg.finetune.t2i.lr == pytest.approx(2e-4)
    assert cfg.finetune.video.steps == 20_000 and cfg.finetune.video.head == "video"


def test_config_text_is_read_like_a_config_file(tmp_path) -> None:
    text = "pretrain:\n  steps: 7\n"
    path = tmp_path / "overrides.yaml"
    path.write_text(text)
    from_text = load_config(preset="tiny", config_text=("ConfigMap x", text))
    assert from_text == load_config(preset="tiny", config_file=path)
    assert from_text.pretrain.steps == 7
    with pytest.raises(ConfigError, match="ConfigMap x must hold a mapping"):
        load_config(preset="tiny", config_text=("ConfigMap x", "- a\n"))
