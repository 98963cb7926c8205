"""Target files: every shipped file validates; a broken one is refused with field and reason."""

from __future__ import annotations

import subprocess
import sys

import pytest

from edgeq.backends import load_target
from edgeq.errors import EdgeqError
from edgeq.targets import builtin_targets


def test_every_shipped_target_validates():
    names = builtin_targets()
    assert "android" in names
    for name in names:
        target = load_target(name)
        assert target.default_precision in target.precisions


GOOD = """
name = "mine"
backend = "xnnpack"
default_precision = "int8"
[precisions.int8]
weight_bits = 8
activation_bits = 8
activations = "static"
ops = ["conv", "linear"]
weight_bytes = 1.0
"""


def test_a_users_own_file_loads(tmp_path):
    path = tmp_path / "mine.toml"
    path.write_text(GOOD)
    assert load_target(str(path)).name == "mine"


def test_channel_bytes_are_per_kind_or_for_every_kind():
    android = load_target("android").precisions
    assert android["int8"].channel_cost("linear") == 8 and android["int8"].channel_cost("embedding") == 4
    assert android["w8dyn"].channel_cost("linear") == 4 and android["float"].channel_cost("conv") == 0


@pytest.mark.parametrize(
    "edit,message",
    [
        (lambda s: s.replace('backend = "xnnpack"', 'backend = "tpu"'), "unknown backend 'tpu'"),
        (lambda s: s.replace('default_precision = "int8"', 'default_precision = "int3"'), "default_precision 'int3'"),
        (lambda s: s.replace("weight_bits = 8", 'weight_bits = "eight"'), "field 'weight_bits' must be int"),
        (lambda s: s.replace('ops = ["conv", "linear"]', 'ops = ["attention"]'), "field 'ops'"),
        (lambda s: s.replace('activations = "static"\n', ""), "missing field 'activations'"),
        (lambda s: s.replace("[precisions.int8]", "[precisions.int8\n"), "not valid TOML"),
        (
            lambda s: s.replace("weight_bits = 8", "weight_bits = 8\nchannel_bytes = { embedding = 4 }"),
            "field 'channel_bytes' is {'embedding': 4}",
        ),
    ],
)
def test_a_broken_file_is_refused_naming_field_and_reason(tmp_path, edit, message):
    path = tmp_path / "broken.toml"
    path.write_text(edit(GOOD))
    with pytest.raises(EdgeqError) as err:
        load_target(str(path))
    assert message in str(err.value)
    assert "\n" not in str(err.value)


def test_unknown_target_names_the_valid_ones():
    with pytest.raises(EdgeqError, match="unknown target 'iphone'.*android"):
        load_target("iphone")


def test_cli_lists_targets():
    out = subprocess.run([sys.executable, "-m", "edgeq", "targets"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "android" in out.stdout and "int8" in out.stdout
