"""Configs validate on construction; overrides cannot misspell; the CLI reads its defaults from them."""

from __future__ import annotations

import dataclasses

import pytest

from edgeq.configs import BuildConfig, QATConfig, RangeConfig, VoteConfig
from edgeq.errors import EdgeqError


def test_configs_are_frozen_and_replace_rejects_unknown_fields():
    config = BuildConfig()
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.max_drop = 3  # type: ignore[misc]
    with pytest.raises(TypeError):
        dataclasses.replace(config, max_dorp=3)


def test_build_rejects_a_misspelt_override_in_one_line(tmp_path):
    from edgeq.pipeline import build

    with pytest.raises(EdgeqError, match="unknown build setting") as info:
        build(None, BuildConfig(out=tmp_path / "o"), max_dorp=2.0)
    assert "\n" not in str(info.value) and "max_drop" in str(info.value)
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"optimizer": "rmsprop"}, "unknown optimizer 'rmsprop'"),
        ({"steps": -1}, "steps must be >= 0"),
        ({"lr": 0}, "lr must be > 0"),
        ({"freeze_ranges": 1.5}, "shares of the steps"),
        ({"intermediate_bits": 4}, "intermediate_bits"),
    ],
)
def test_qat_config_validates_on_construction(kwargs, message):
    with pytest.raises(EdgeqError, match=message):
        QATConfig(**kwargs)


def test_enumerated_settings_accept_their_values_and_store_plain_strings():
    assert QATConfig(optimizer="adam").optimizer == "adam"
    assert type(RangeConfig(mode="ema-fused").mode) is str
    assert VoteConfig(rule="step").rule == "step"
    with pytest.raises(ValueError, match="ranges must be one of"):
        RangeConfig(mode="minmax")
    with pytest.raises(ValueError, match="rule must be one of"):
        VoteConfig(rule="median")


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"size_budget": 0}, "not positive"),
        ({"max_drop": -1}, "negative"),
        ({"plan": "p.json", "precision": "int8"}, "not both"),
    ],
)
def test_build_config_validates_on_construction(kwargs, message):
    with pytest.raises(EdgeqError, match=message):
        BuildConfig(**kwargs)


def test_cli_defaults_and_choices_come_from_the_configs():
    from typer.testing import CliRunner

    from edgeq.cli import app

    out = CliRunner().invoke(app, ["build", "--help"], terminal_width=200).output
    assert "ema-fused" in out and "adaptive" in out  # --ranges lists every mode
    assert "sgd" in out and "adam" in out
    assert f"default: {QATConfig().epochs}" in out
    bad = CliRunner().invoke(app, ["build", "--ranges", "minmax"])
    assert bad.exit_code == 2 and "minmax" in bad.output
