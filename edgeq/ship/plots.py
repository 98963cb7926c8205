"""Figures for report.html, drawn with matplotlib and embedded as base64 PNG."""

from __future__ import annotations

import base64
import io
from typing import Any


def _png(fig) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90, bbox_inches="tight")
    import matplotlib.pyplot as plt

    plt.close(fig)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _legend(ax: Any) -> None:
    # beside the axes, never over the bars: matplotlib's default "best" searches for a free corner,
    # which is slow on many points and warns when it takes over a second (an error under pytest)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0.0)


def ranges_figure(layers: list[dict[str, Any]]) -> str:
    plt = _pyplot()
    names = [l["name"] for l in layers]
    x = range(len(names))
    fig, ax = plt.subplots(figsize=(max(4, 0.6 * len(names) + 2), 3))
    ax.bar(
        [i - 0.2 for i in x], [max(abs(l["act_min"]), abs(l["act_max"])) for l in layers], 0.4, label="input max |x|"
    )
    ax.bar([i + 0.2 for i in x], [l["act_p999"] for l in layers], 0.4, label="input p99.9 |x|")
    ax.plot(list(x), [l["weight_absmax"] for l in layers], "k^", label="weight absmax")
    ax.set_xticks(list(x), names, rotation=45, ha="right")
    ax.set_ylabel("range")
    ax.set_title("Range per layer")
    _legend(ax)
    return _png(fig)


def sensitivity_figure(layers: list[dict[str, Any]]) -> str:
    plt = _pyplot()
    names = [l["name"] for l in layers]
    precisions = sorted({p for l in layers for p in l["loss_delta"]})
    fig, ax = plt.subplots(figsize=(max(4, 0.6 * len(names) + 2), 3))
    width = 0.8 / max(1, len(precisions))
    for k, p in enumerate(precisions):
        ax.bar(
            [i + (k - (len(precisions) - 1) / 2) * width for i in range(len(names))],
            [l["loss_delta"].get(p, 0.0) for l in layers],
            width,
            label=p,
        )
    ax.set_xticks(range(len(names)), names, rotation=45, ha="right")
    ax.set_ylabel("Δ task loss, layer alone quantized")
    ax.set_title("Sensitivity per layer")
    _legend(ax)
    return _png(fig)


def tradeoff_figure(
    points: list[dict[str, Any]], float_metric: float, measured: tuple[int, float] | None = None
) -> str:
    """The planner's predicted metric per plan considered, and what the shipped program measured."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5, 3))
    xs = [p["program_bytes"] for p in points]
    ys = [float_metric - p["predicted_drop"] for p in points]
    ax.plot(xs, ys, "o-", color="tab:blue", label="plans considered")
    chosen = [p for p in points if p["chosen"]]
    if chosen:
        ax.plot([chosen[0]["program_bytes"]], [float_metric - chosen[0]["predicted_drop"]], "r*", ms=14, label="chosen")
    if measured is not None:
        ax.plot([measured[0]], [measured[1]], "gD", ms=9, label="measured (model.pte)")
    ax.set_xlabel("program bytes (estimated; measured for model.pte)")
    ax.set_ylabel("metric")
    ax.set_title("Predicted and measured accuracy against size")
    _legend(ax)
    return _png(fig)
