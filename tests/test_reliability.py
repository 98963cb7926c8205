"""Reliability: resume gives the same program, builds are reproducible, bad input is refused cleanly."""

from __future__ import annotations

import hashlib
import json
import textwrap

import pytest
import torch
from typer.testing import CliRunner

from edgeq.cli import app
from edgeq.context import QuietProgress
from edgeq.errors import EdgeqError
from edgeq.pipeline import BuildConfig, build, checkpoint_path
from edgeq.quant.qat import QATConfig

pytestmark = pytest.mark.slow

STEPS = 40


class Interrupt(Exception):
    pass


class KillAt(QuietProgress):
    """A progress hook that interrupts QAT at one step, as Ctrl-C or a lost machine would."""

    def __init__(self, step: int) -> None:
        self.at = step

    def step(self, i: int, loss: float) -> None:
        if i == self.at:
            raise Interrupt(f"killed at step {i}")


def _config(out, **kw):
    # No early stopping: the kill must land mid-training.
    return BuildConfig(out=out, precision="int8", qat=QATConfig(steps=STEPS, checkpoint_every=10, patience=0), **kw)


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    """One uninterrupted build of the bundled example, what the resumed and the repeated builds must equal."""
    out = tmp_path_factory.mktemp("straight") / "out"
    return build(None, _config(out)), out


def test_a_killed_build_resumes_to_the_same_program_and_ranges(tmp_path, straight):
    straight, straight_out = straight
    out = tmp_path / "resumed"
    with pytest.raises(Interrupt):
        build(None, _config(out), progress=KillAt(25))
    assert not out.exists()  # nothing half-written
    ckpt = checkpoint_path(out)
    assert ckpt.is_file()
    assert torch.load(ckpt, weights_only=True)["step"] == 20
    resumed = build(None, _config(out, resume=True))
    assert (out / "model.pte").read_bytes() == (straight_out / "model.pte").read_bytes()
    assert resumed.qat.commits == straight.qat.commits
    assert resumed.plan.to_dict() == straight.plan.to_dict()
    assert not ckpt.parent.exists()  # cleaned up after success


def test_same_recipe_seed_and_target_give_byte_identical_programs(tmp_path, straight):
    a, a_out = straight
    b = build(None, _config(tmp_path / "b"))
    pa, pb = (a_out / "model.pte").read_bytes(), (tmp_path / "b" / "model.pte").read_bytes()
    assert pa == pb
    man = json.loads((a_out / "manifest.json").read_text())
    assert man["sha256"] == hashlib.sha256(pa).hexdigest()
    assert man["build"]["seed"] == 0 and man["build"]["qat"]["steps"] == STEPS and man["recipe"]["sha256"]
    assert a.scores.program == b.scores.program


def test_a_checkpoint_needing_arbitrary_code_is_refused(tmp_path):
    from edgeq.quant import checkpoint

    class Payload:
        def __reduce__(self):
            return (print, ("this would run on load",))

    path = tmp_path / "qat.pt"
    torch.save({"step": 3, "evil": Payload()}, path)
    with pytest.raises(EdgeqError, match=r"needs arbitrary code to load \(.*\); refusing it"):
        checkpoint.load(path)


def test_a_resume_from_another_configuration_is_refused(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(Interrupt):
        build(None, _config(out), progress=KillAt(15))
    changed = BuildConfig(
        out=out, precision="int8", qat=QATConfig(steps=STEPS, lr=5e-3, checkpoint_every=10), resume=True
    )
    with pytest.raises(EdgeqError, match="from a different build"):
        build(None, changed)
    assert checkpoint_path(out).is_file() and not out.exists()


def _recipe(tmp_path, body: str, name="bad_recipe.py"):
    path = tmp_path / name
    path.write_text(textwrap.dedent(body))
    return str(path)


BASE = """
import torch
from torch import nn
def example_inputs():
    return (torch.zeros(1, 4),)
def train_data():
    return [(torch.randn(8, 4), torch.randint(0, 3, (8,))) for _ in range(4)]
def eval_data():
    return [(torch.randn(8, 4), torch.randint(0, 3, (8,)))]
"""


@pytest.mark.parametrize(
    "body,message",
    [
        (
            BASE
            + """
class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 3)
    def forward(self, x):
        if x.sum() > 0:
            return self.fc(x)
        return -self.fc(x)
def model():
    return Net().eval()
""",
            r"torch.export cannot capture the model at .*bad_recipe.py:\d+",
        ),
        (
            BASE.replace("torch.zeros(1, 4)", "torch.zeros(1, 7)")
            + """
def model():
    return nn.Linear(4, 3).eval()
""",
            r"cannot run on example_inputs\(\) of shape \(1, 7\)",
        ),
        (
            BASE.replace("for _ in range(4)]", "for _ in range(0)]")
            + """
def model():
    return nn.Sequential(nn.Linear(4, 3)).eval()
""",
            r"train_data\(\) yielded no batches",
        ),
        (
            BASE.replace("torch.randn(8, 4), torch.randint", "torch.full((8, 4), float('nan')), torch.randint", 1)
            + """
def model():
    return nn.Sequential(nn.Linear(4, 3)).eval()
""",
            "calibration data reach layer '0' with NaN or inf values",
        ),
    ],
    ids=["data-dependent-control-flow", "inputs-do-not-fit", "empty-dataset", "nan-data"],
)
def test_bad_input_catalogue(tmp_path, body, message):
    recipe = _recipe(tmp_path, body)
    out = tmp_path / "out"
    result = CliRunner().invoke(
        app, ["build", "--recipe", recipe, "--out", str(out), "--steps", "10", "--checkpoint-every", "0"]
    )
    assert result.exit_code == 2, result.output
    lines = [l for l in result.output.splitlines() if l.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in result.output
    import re

    assert re.search(message, lines[0]), lines[0]
    assert not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad_recipe.py"] + (
        ["__pycache__"] if (tmp_path / "__pycache__").exists() else []
    )


#: a loss that turns NaN after five training steps, and a model to train with it
NAN_AFTER_FIVE_STEPS = """
calls = [0]
def loss(output, target):
    calls[0] += torch.is_grad_enabled()  # training steps only: plan checks and held-out losses run without grad
    value = nn.functional.cross_entropy(output, target)
    return value * float("nan") if calls[0] > 5 else value
def model():
    return nn.Sequential(nn.Linear(4, 3)).eval()
"""


def test_nan_loss_stops_qat_and_keeps_the_last_good_checkpoint(tmp_path):
    recipe = _recipe(
        tmp_path,
        BASE + NAN_AFTER_FIVE_STEPS,
    )
    out = tmp_path / "out"
    result = CliRunner().invoke(
        app,
        [
            "build",
            "--recipe",
            recipe,
            "--out",
            str(out),
            "--steps",
            "10",
            "--precision",
            "int8",
            "--checkpoint-every",
            "2",
            "--loss",
            "task",
        ],
    )
    assert result.exit_code == 2
    assert "QAT loss became nan at step 5" in result.output and "--lr" in result.output
    assert not out.exists()
    saved = torch.load(checkpoint_path(out), weights_only=True)
    assert saved["step"] == 4 and all(l == l for l in saved["losses"])


def test_qat_that_diverges_keeps_its_best_held_out_state_and_the_build_goes_on(tmp_path):
    """QAT is one candidate of several: when its loss turns NaN after checks on held-out batches
    exist, it stops, keeps its best checked state and says so, and the build ships a program."""
    import json

    recipe = _recipe(
        tmp_path,
        BASE.replace("for _ in range(4)]", "for _ in range(20)]") + NAN_AFTER_FIVE_STEPS,
    )
    out = tmp_path / "out"
    result = CliRunner().invoke(
        app,
        ["build", "--recipe", recipe, "--out", str(out), "--steps", "10", "--precision", "int8"]
        + ["--checkpoint-every", "0", "--loss", "task", "--max-drop", "100"],
    )
    assert result.exit_code == 0, result.output
    report = json.loads((out / "report.json").read_text())
    assert report["qat"]["steps"] == 5 and report["qat"]["best_step"] is not None
    assert any("became non-finite at step 6" in w for w in report["warnings"]), report["warnings"]
    assert "became non-finite at step 6" in result.output
    assert (out / "model.pte").is_file()


def test_invalid_target_file_is_refused_cleanly(tmp_path):
    target = tmp_path / "mine.toml"
    target.write_text('name = "mine"\nbackend = "xnnpack"\n')
    out = tmp_path / "out"
    result = CliRunner().invoke(app, ["build", "--target", str(target), "--out", str(out)])
    assert result.exit_code == 2 and "missing field 'precisions'" in result.output
    assert not out.exists()


@pytest.mark.parametrize(
    "device, message",
    [
        ("mps", "edgeq trains on cpu or cuda"),
        ("gpu0", "unknown device 'gpu0'"),
        pytest.param(
            "cuda",
            "sees no CUDA device",
            marks=pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is present"),
        ),
    ],
)
def test_a_device_qat_cannot_use_is_refused_before_any_work(tmp_path, device, message):
    out = tmp_path / "out"
    result = CliRunner().invoke(app, ["build", "--device", device, "--out", str(out), "--steps", "5"])
    assert result.exit_code == 2, result.output
    lines = [l for l in result.output.splitlines() if l.startswith("error:")]
    assert len(lines) == 1 and message in lines[0] and "Traceback" not in result.output
    assert not out.exists()
