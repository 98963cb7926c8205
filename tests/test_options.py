"""`edgeq build`'s options are generated from the config dataclasses: they cannot drift apart."""

from __future__ import annotations

import dataclasses

import typer.main

from edgeq.cli import app
from edgeq.configs import BuildConfig, QATConfig, RangeConfig, VoteConfig, field_docs
from edgeq.options import OPTIONS

#: fields the command line sets another way: the config itself, QAT's seed (the build's --seed), eps
NOT_ON_THE_COMMAND_LINE = {(BuildConfig, "qat"), (QATConfig, "seed"), (QATConfig, "ranges"), (RangeConfig, "vote"),
                           (VoteConfig, "eps")}  # fmt: skip


def _command():
    return typer.main.get_command(app).commands["build"]  # type: ignore[attr-defined]


def test_every_config_field_is_an_option_with_the_fields_default_and_doc():
    exposed = {(option.config, option.field) for option in OPTIONS}
    for config in (BuildConfig, QATConfig, RangeConfig, VoteConfig):
        for field in dataclasses.fields(config):
            assert (config, field.name) in exposed | NOT_ON_THE_COMMAND_LINE, (config.__name__, field.name)
    params = {param.name: param for param in _command().params}
    for option in OPTIONS:
        param = params[option.name]
        default = param.default.value if hasattr(param.default, "value") else param.default
        field = next(f for f in dataclasses.fields(option.config) if f.name == option.field)
        assert default == field.default, option.name
        assert param.help == field_docs(option.config)[option.field] and param.help, option.name


def test_the_command_line_builds_the_configs_the_api_would():
    from edgeq.options import split

    values = {option.name: option.default() for option in OPTIONS}
    values.update(steps=30, rule="step", max_drop=2.0, dropout=False)
    config, qat = split(values, given={"steps", "dropout"})
    assert config == BuildConfig(max_drop=2.0)
    # Only the QAT flags the user gave override the recipe's settings; the range method always comes along.
    assert qat == {"steps": 30, "dropout": False, "ranges": RangeConfig(vote=VoteConfig(rule="step"))}
