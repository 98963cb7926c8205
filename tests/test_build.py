"""End to end: the bundled example and an unseen user recipe through the real stack."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest
import torch
from typer.testing import CliRunner

from edgeq.cli import app

pytestmark = pytest.mark.slow


def test_bundled_build_writes_every_artifact(digits_build):
    out = digits_build.out_dir
    for name in ("model.pte", "plan.json", "report.json", "report.html", "manifest.json"):
        assert (out / name).is_file(), name
    assert not list(out.parent.glob(".digits.partial-*"))


def test_program_accuracy_is_within_one_point_of_float(digits_build):
    s = digits_build.scores
    assert s.float > 90.0
    assert s.float - s.program <= 1.0
    assert s.agreement["reference_vs_program"] >= 99.0


def test_report_has_accuracies_sizes_delegation_and_timings(digits_build):
    report = json.loads((digits_build.out_dir / "report.json").read_text())
    acc = report["accuracy"]
    assert acc["program"] == pytest.approx(digits_build.scores.program)
    assert set(acc) >= {"float", "qat", "reference", "program"}
    # The planner's prediction sits beside what the program measured.
    assert report["planner"]["measured_drop"] == pytest.approx(acc["float"] - acc["program"])
    assert report["size"]["program_bytes"] < report["size"]["float_program_bytes"]
    assert report["delegation"]["outside_ops"] == 0 and report["delegation"]["delegated_ops"] > 0
    assert report["delegation"]["flops_in_delegate"] == pytest.approx(1.0)
    timings = report["timings"]
    for stage in ("export", "prepare", "qat", "convert", "lower", "validate", "package", "debug"):
        assert timings[stage] > 0, stage
    # Stages are timed one after another inside the build: together they fit in its wall time.
    assert sum(timings.values()) <= digits_build.wall_seconds
    # The training loop runs inside the QAT stage (which also calibrates).
    assert 0 < report["qat"]["seconds"] <= timings["qat"]
    # Adaptive ranges were used, and some grids moved during training.
    assert report["qat"]["commits"] and sum(report["qat"]["commits"].values()) > 0
    html = (digits_build.out_dir / "report.html").read_text()
    shipped = report["accuracy"]["shipped"]
    assert f"model.pte (lowered from {shipped.upper()}), run on the host CPU" in html and "Numeric debugging" in html
    sqnr = report["layer_sqnr"]["reference_vs_float_db"]
    assert list(sqnr) == ["stem.0", "dw.0", "pw.0", "head"] and min(sqnr.values()) > 20
    assert report["layer_sqnr"]["first_divergence"] is None


def test_manifest_describes_the_program(digits_build):
    import hashlib

    man = json.loads((digits_build.out_dir / "manifest.json").read_text())
    data = (digits_build.out_dir / "model.pte").read_bytes()
    assert man["sha256"] == hashlib.sha256(data).hexdigest()
    assert man["inputs"] == [{"name": "x", "shape": [1, 1, 8, 8], "dtype": "float32"}]
    assert man["outputs"][0]["shape"] == [1, 10]
    assert man["labels"] == [str(i) for i in range(10)]
    assert set(man["versions"]) >= {"edgeq", "executorch", "torch"}
    assert man["preprocessing"]["layout"] == "NCHW"


def test_host_validation_equals_a_direct_runtime_run(digits_build):
    from executorch.runtime import Runtime

    from edgeq.checks.validate import run_program
    from edgeq.recipe import load_recipe

    data = (digits_build.out_dir / "model.pte").read_bytes()
    x, _ = next(iter(load_recipe(None).eval_data()))
    ours = run_program(data)(x[:7])
    method = Runtime.get().load_program(data).load_method("forward")
    direct = torch.cat([method.execute((x[i : i + 1],))[0] for i in range(7)])
    assert torch.equal(ours, direct)


def test_default_build_plans_per_layer_within_the_size_budget(digits_build):
    report = digits_build.report
    assert report["size"]["program_bytes"] <= 0.9 * report["size"]["float_program_bytes"]
    assert (digits_build.out_dir / "analysis.json").is_file()
    assert report["planner"]["considered"][-1]["chosen"]
    assert all(layer["reason"] for layer in report["plan"])
    html = (digits_build.out_dir / "report.html").read_text()
    assert "Per-layer analysis" in html and html.count("data:image/png;base64,") == 3


def test_edited_plan_builds_with_an_intermediate_width(tmp_path, digits_build):
    plan = json.loads((digits_build.out_dir / "plan.json").read_text())
    for layer in plan["layers"]:
        if layer["name"] in ("pw.0", "head"):
            layer["precision"], layer["reason"] = "w4a8", "edited: 4-bit weights"
    edited = tmp_path / "plan.json"
    edited.write_text(json.dumps(plan))
    out = tmp_path / "out"
    code, output = _run_cli(["build", "--plan", str(edited), "--out", str(out), "--steps", "40", "--max-drop", "5"])
    assert code == 0, output
    report = json.loads((out / "report.json").read_text())
    used = {l["name"]: (l["precision"], l["reason"]) for l in report["plan"]}
    assert used["head"] == ("w4a8", "edited: 4-bit weights") and used["stem.0"][0] == "int8"
    # Claim 8: the two 4-bit layers trained at 8-bit weights first (30% of the steps), then at 4 bits.
    inter = report["qat"]["intermediate"]
    assert inter["bits"] == 8 and inter["steps"] == 12
    assert sorted(inter["tensors"].values()) == [[-7, 7], [-7, 7]]
    assert json.loads((out / "plan.json").read_text())["layers"] == plan["layers"]


def test_plan_json_round_trips(digits_build):
    from edgeq.planning.plan import Plan

    plan = Plan.load(digits_build.out_dir / "plan.json")
    assert [l.name for l in plan.layers] == [l.name for l in digits_build.plan.layers]
    assert [l.precision for l in plan.layers] == [l.precision for l in digits_build.plan.layers]
    assert plan.other_ops == digits_build.plan.other_ops


USER_RECIPE = '''
"""A recipe the tests have never seen: an MLP on scikit-learn's wine data."""
import torch
from torch import nn
from sklearn.datasets import load_wine
from sklearn.model_selection import train_test_split

labels = ["class_0", "class_1", "class_2"]
# QAT settings for this model; the command line's --steps overrides the recipe's
qat = {"steps": 30, "weight_decay": 1e-5}
_x, _y = load_wine(return_X_y=True)
_x = (_x - _x.mean(0)) / _x.std(0)
xtr, xte, ytr, yte = train_test_split(_x, _y, test_size=0.3, random_state=1, stratify=_y)
xtr, xte = torch.tensor(xtr, dtype=torch.float32), torch.tensor(xte, dtype=torch.float32)
ytr, yte = torch.tensor(ytr), torch.tensor(yte)

def model():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(13, 32), nn.ReLU(), nn.Linear(32, 3))
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    for _ in range(200):
        opt.zero_grad()
        nn.functional.cross_entropy(net(xtr), ytr).backward()
        opt.step()
    return net.eval()

def example_inputs():
    return (torch.zeros(1, 13),)

def train_data():
    return [(xtr[i:i + 16], ytr[i:i + 16]) for i in range(0, len(xtr), 16)]

def eval_data():
    return [(xte, yte)]
'''


def test_an_unseen_user_recipe_builds_through_the_cli(tmp_path):
    recipe = tmp_path / "wine_recipe.py"
    recipe.write_text(textwrap.dedent(USER_RECIPE))
    out = tmp_path / "out"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "edgeq",
            "build",
            "--target",
            "android",
            "--recipe",
            str(recipe),
            "--out",
            str(out),
            "--steps",
            "60",
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads((out / "report.json").read_text())
    assert report["recipe"] == "wine_recipe"
    settings = report["qat"]["config"]
    assert (settings["steps"], settings["weight_decay"], settings["lr"]) == (60, 1e-5, 1e-3)
    assert report["accuracy"]["float"] - report["accuracy"]["program"] <= 1.0
    man = json.loads((out / "manifest.json").read_text())
    assert man["labels"] == ["class_0", "class_1", "class_2"]
    assert man["inputs"][0]["shape"] == [1, 13]


def _run_cli(args):
    result = CliRunner().invoke(app, args)
    return result.exit_code, result.output


@pytest.mark.parametrize(
    "args,message",
    [
        (["--target", "iphone"], "unknown target 'iphone'"),
        (["--recipe", "missing_recipe.py"], "recipe file missing_recipe.py not found"),
    ],
)
def test_bad_input_is_one_line_nonzero_and_leaves_nothing(tmp_path, monkeypatch, args, message):
    monkeypatch.chdir(tmp_path)
    code, output = _run_cli(["build", *args, "--out", str(tmp_path / "out")])
    assert code != 0
    assert message in output
    assert len([l for l in output.splitlines() if l.strip()]) == 1
    assert not (tmp_path / "out").exists()
    assert list(tmp_path.iterdir()) == []


def test_recipe_without_model_is_refused(tmp_path):
    recipe = tmp_path / "nomodel.py"
    recipe.write_text("def example_inputs(): return ()\ndef train_data(): return []\ndef eval_data(): return []\n")
    code, output = _run_cli(["build", "--recipe", str(recipe), "--out", str(tmp_path / "out")])
    assert code != 0 and "lacks model()" in output
    assert not (tmp_path / "out").exists()


def test_unwritable_output_directory(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a directory")
    code, output = _run_cli(["build", "--out", str(blocker / "out")])
    assert code != 0 and "cannot write the output directory" in output and "--out" in output
    assert blocker.read_text() == "not a directory"


def test_failed_build_leaves_an_earlier_output_as_it_was(tmp_path, digits_build):
    import shutil

    out = tmp_path / "out"
    shutil.copytree(digits_build.out_dir, out)
    before = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    bad_plan = tmp_path / "plan.json"
    plan = json.loads((out / "plan.json").read_text())
    plan["layers"][0]["name"] = "no.such.layer"
    bad_plan.write_text(json.dumps(plan))
    code, output = _run_cli(["build", "--plan", str(bad_plan), "--out", str(out)])
    assert code != 0 and "unknown layers: no.such.layer" in output and "stem.0" in output
    assert {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "plan.json"]
