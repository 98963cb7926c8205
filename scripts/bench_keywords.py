"""A keyword spotter on real speech: float vs edgeq's programs, accuracy with intervals, side by side.

Data: the Free Spoken Digit Dataset (../shared/data/fsdd/fsdd.npz or $EDGEQ_FSDD; 3,000
recordings of the digits 0-9 by 6 speakers, 8 kHz, CC BY-SA 4.0), split by speaker: all 500
recordings of one speaker evaluate, the other 2,500 train (the official split, index 0-4 of
every speaker, leaves the float model at 100%). No pretrained keyword model
for it ships in a wheel, so the float model is trained here (a small CNN on 40 log-mel bands x
61 frames, ``edgeq.tasks.audio.LogMel``, the features the bundle's AudioFeatures.java computes),
cached under $EDGEQ_CACHE, and then built as a user would:

- uniform int8 (``--precision int8``);
- edgeq default (``edgeq build --target android``).

    python scripts/bench_keywords.py [--target android] [--builds int8 default] [--no-write] [--from-json F]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_report import build_facts, commit, machine, table, task_build_settings, timed_build, top1_pair, write_section  # noqa: E402

from edgeq.examples._cache import cache_path, cached_model  # noqa: E402
from edgeq.recipe import Recipe  # noqa: E402
from edgeq.tasks.audio import LogMel  # noqa: E402

DATA = Path(os.environ.get("EDGEQ_FSDD", Path(__file__).resolve().parents[2] / "shared" / "data" / "fsdd" / "fsdd.npz"))
FEATURES = LogMel(sample_rate=8000, samples=8000, n_fft=256, hop=128, n_mels=40)
EPOCHS = 20
HELD_OUT_SPEAKER = "theo"
BATCH = 32


class KeywordNet(nn.Module):
    def __init__(self, classes: int = 10) -> None:
        super().__init__()

        def block(cin: int, cout: int) -> nn.Sequential:
            return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU())

        self.features = nn.Sequential(
            nn.BatchNorm2d(1),
            block(1, 16),
            nn.MaxPool2d(2),
            block(16, 32),
            nn.MaxPool2d(2),
            block(32, 64),
            block(64, 64),
        )
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Linear(64, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.flatten(self.pool(self.features(x)), 1))


def load() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    data = np.load(DATA)
    audio, offsets = data["audio"], data["offsets"]
    clips = [
        torch.from_numpy(audio[offsets[k] : offsets[k + 1]].astype(np.float32) / 32768.0)
        for k in range(len(offsets) - 1)
    ]
    x = FEATURES.batch(clips)
    y = torch.from_numpy(data["label"].astype(np.int64))
    # A speaker the model never heard evaluates (all 500 of their recordings): the official split
    # (index 0-4 of every speaker) leaves the float CNN at 100%, where no quantization loss shows.
    test = torch.from_numpy(data["speaker"] == list(data["speaker_names"]).index(HELD_OUT_SPEAKER))
    return x[~test], y[~test], x[test], y[test]


def train_float(xtr: torch.Tensor, ytr: torch.Tensor) -> KeywordNet:
    """The float keyword CNN, trained once on the training speakers and cached like the bundled examples."""
    settings = f"{KeywordNet()}{FEATURES}{EPOCHS}{BATCH}{HELD_OUT_SPEAKER}"

    def train() -> KeywordNet:
        torch.manual_seed(0)  # before the model: its initial weights are part of what is cached
        net = KeywordNet()
        opt = torch.optim.Adam(net.parameters(), lr=2e-3)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, EPOCHS)
        for epoch in range(EPOCHS):
            net.train()
            order = torch.randperm(len(xtr), generator=torch.Generator().manual_seed(epoch))
            for i in range(0, len(xtr), BATCH):
                idx = order[i : i + BATCH]
                shift = int(torch.randint(-4, 5, (1,), generator=torch.Generator().manual_seed(epoch * 1000 + i)))
                opt.zero_grad()
                nn.functional.cross_entropy(net(torch.roll(xtr[idx], shift, dims=-1)), ytr[idx]).backward()
                opt.step()
            sched.step()
        return net.eval()

    return cached_model(cache_path("fsdd-keywords", settings), KeywordNet(), train)


def make_recipe() -> Recipe:
    xtr, ytr, xte, yte = load()
    net = train_float(xtr, ytr)
    order = torch.randperm(len(xtr), generator=torch.Generator().manual_seed(1))

    def train_data():
        for i in range(0, len(xtr), 64):
            idx = order[i : i + 64]
            yield xtr[idx], ytr[idx]

    def eval_data():
        for i in range(0, len(xte), 100):
            yield xte[i : i + 100], yte[i : i + 100]

    return Recipe(
        name="fsdd_keywords",
        model=lambda: net,
        example_inputs=lambda: (torch.zeros(1, 1, *FEATURES.shape),),
        train_data=train_data,
        eval_data=eval_data,
        labels=[str(d) for d in range(10)],
        features=FEATURES,
        source="scripts/bench_keywords.py",
    )


def java_parity() -> float | None:
    """The bundle's AudioFeatures.java on the 300 evaluation recordings against LogMel: the largest
    difference of any feature (None without a JDK)."""
    import shutil

    if shutil.which("javac") is None:
        return None
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from test_audio import java_features  # the harness the tests use

    data = np.load(DATA)
    audio, offsets = data["audio"], data["offsets"]
    clips = [
        torch.from_numpy(audio[offsets[k] : offsets[k + 1]].astype(np.float32) / 32768.0)
        for k in range(len(offsets) - 1)
        if data["speaker_names"][data["speaker"][k]] == HELD_OUT_SPEAKER
    ]
    with tempfile.TemporaryDirectory() as tmp:
        java = java_features(Path(tmp), FEATURES, clips)
    return float((java - torch.stack([FEATURES(c) for c in clips])).abs().max())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--builds", nargs="+", default=["int8", "default"], choices=["int8", "default"])
    parser.add_argument("--target", default="android")
    parser.add_argument("--no-write", action="store_true")
    parser.add_argument("--from-json", type=Path)
    args = parser.parse_args()
    if args.from_json:
        write_section(f"keywords-{args.target}", body(json.loads(args.from_json.read_text())))
        return
    if not DATA.exists():
        sys.exit(f"{DATA} not found: this benchmark reads the shared FSDD recordings")
    from edgeq.backends import get_backend, load_target
    from edgeq.checks.evaluate import collect
    from edgeq.checks.stats import interval, paired
    from edgeq.recipe import top1_accuracy

    recipe = make_recipe()
    float_out, targets = collect(recipe.model(), recipe.eval_data())
    results: dict = {"machine": machine(), "commit": commit(), "target": args.target, "clips": len(targets)}
    results["java_features_max_difference"] = java_parity()
    results["float"] = interval(top1_accuracy, float_out, targets).to_dict()
    results["weights"] = sum(p.numel() for p in recipe.model().parameters())
    results["precision"] = load_target(args.target).default_precision
    with tempfile.TemporaryDirectory() as tmp_name:
        for kind in args.builds:
            out = Path(tmp_name) / kind
            report = timed_build(recipe, out, **task_build_settings(kind, args.target))
            runner = get_backend(report["backend"]).runner(out / "model.pte")
            outputs, _ = collect(runner, recipe.eval_data())
            results[kind] = {
                **build_facts(report, out / "model.pte"),
                "top1": interval(top1_accuracy, outputs, targets).to_dict(),
                "drop": paired(top1_accuracy, float_out, outputs, targets).to_dict(),
                "float_bytes": report["size"]["float_program_bytes"],
                "bundle": sorted(p.name for p in (out / "bundle").iterdir()),
            }
            print(json.dumps(results[kind], default=str)[:1500])
    path = Path(__file__).with_name(f"bench_keywords_{args.target}.json")
    path.write_text(json.dumps(results, indent=2, default=str) + "\n")
    if not args.no_write:
        write_section(f"keywords-{args.target}", body(results))


def body(results: dict) -> str:
    f, precision = results["float"], results.get("precision", "int8")
    rows = [["float (eager)", f"{f['value']:.2f} [{f['low']:.2f}, {f['high']:.2f}]", "", "", "", "", ""]]
    for kind in ("int8", "default"):
        r = results.get(kind)
        if not r:
            continue
        t, d = r["top1"], top1_pair(r["drop"])
        rows.append(
            [
                {"int8": f"uniform {precision} (`--precision {precision}`)", "default": "edgeq default"}[kind]
                + f", shipped {r['shipped']}",
                f"{t['value']:.2f} [{t['low']:.2f}, {t['high']:.2f}]",
                f"{d['difference']:+.2f} [{d['low']:+.2f}, {d['high']:+.2f}], p {d['p_value']:.2g}",
                f"{r['bytes']:,} ({r['bytes'] / r['float_bytes']:.3f}x float {r['float_bytes']:,})",
                ", ".join(f"{n} {p}" for p, n in r.get("plan", {}).items()) or "(not recorded)",
                f"{r['wall_seconds']:.0f}",
                ", ".join(n for n in r["bundle"] if n.endswith((".java", ".kt"))),
            ]
        )
    header = ["program (.pte in ExecuTorch's runtime)", "top-1 % [95%]", "drop vs float (paired, McNemar p)",
              "bytes", "plan (layers per precision)", "build s", "app code in the bundle"]  # fmt: skip
    return f"""## Keyword spotting: spoken digits (FSDD) ({results["target"]})

`python scripts/bench_keywords.py --target {results["target"]}` on {results["machine"]}, edgeq at {results.get("commit", "unknown")}.
The Free Spoken Digit Dataset split by speaker: all {results["clips"]} recordings of a speaker the model never
heard ("{HELD_OUT_SPEAKER}") evaluate, the other five speakers' 2,500 train; real 8 kHz speech. No pretrained
keyword model for it ships in a wheel: the float CNN ({results["weights"]:,} weights) is trained by the script on the training recordings, on 40-band log-mel features
(`edgeq.tasks.audio.LogMel`, n_fft 256, hop 128, 1 s clips), which the bundle's AudioFeatures.java computes.

{table(header, rows)}

The bundle's AudioFeatures.java against `LogMel` on the {results["clips"]} evaluation recordings: largest
difference of any feature {results.get("java_features_max_difference")} (log-mel units).
{"".join(chr(10) + "- " + note for note in results.get("notes", []))}
"""


if __name__ == "__main__":
    main()
