"""Tables and plots of an ablation, rendered from its stored cells only (so they can be redrawn at any time).

Writes results.csv, results.json, results.md, speed.csv and three figures after the paper's: quality by method
(Figure 4: held-out loss, and each lm-eval task of the recipe beside it), quality against uptraining fraction
(Figure 5), and decode time and KV-cache bytes against groups (Figure 6).
"""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

from .downstream import headline
from .errors import EvalError
from .outputs import write_files
from .results_dir import DESTINATION

QUALITY_COLUMNS = ["method", "groups", "fraction", "uptrain_steps", "heldout_loss", "perplexity", "kl",
                   "top1_agreement"]
SPEED_COLUMNS = ["model", "kv_heads", "kv_bytes_per_token", "context", "batch_size", "decode", "prefill_tokens_per_s",
                 "decode_tokens_per_s", "decode_ms_per_step", "decode_vs_original", "device", "attention"]


PAPER_ORDER = ("mean", "first", "random")  # the paper's ranking, best first; other methods follow by name


def method_order(method: str) -> tuple[int, str]:
    return (PAPER_ORDER.index(method) if method in PAPER_ORDER else len(PAPER_ORDER), method)


def groups_label(groups: int) -> str:
    return "G=1 (MQA)" if groups == 1 else f"G={groups}"


def task_columns(rows: list[dict]) -> list[str]:
    """'task metric' of every task the rows were scored on, in order of first appearance (the headline metric of
    each, as `task_column_values` gives it)."""
    columns = []
    for row in rows:
        for column in task_column_values(row):
            if column not in columns:
                columns.append(column)
    return columns


def task_column_values(row: dict) -> dict[str, float]:
    """{'task metric': value} of one stored row, e.g. {'python_next_line acc': 0.41}."""
    out = {}
    for task, scores in (row.get("tasks") or {}).items():
        shown = headline(scores)
        if shown:
            out[f"{task} {shown[0]}"] = shown[1]
    return out


def load_cells(root: Path) -> tuple[dict | None, list[dict], list[dict]]:
    original, cells, speed = None, [], []
    for path in sorted((root / "cells").glob("*.json")):
        data = _read_cell(path)
        data.update(task_column_values(data))
        if data["kind"] == "original":
            original = data
        elif data["kind"] == "cell":
            cells.append(data)
        else:
            speed.extend({"model": data["model"], "kv_heads": data["kv_heads"],
                          "kv_bytes_per_token": data["kv_bytes_per_token"], **p} for p in data["points"])
    cells.sort(key=lambda c: (-c["groups"], c["fraction"], method_order(c["method"])))  # the README's order
    for s in speed:
        s.setdefault("decode", "dynamic")  # cells stored before the static loop existed
    base = {(s["context"], s["batch_size"], s["decode"]): s["decode_tokens_per_s"] for s in speed
            if s["model"] == "original"}
    for s in speed:  # decode speed-up over the MHA original at the same point, in the same loop
        original_speed = base.get((s["context"], s["batch_size"], s["decode"]))
        s["decode_vs_original"] = s["decode_tokens_per_s"] / original_speed if original_speed else None
    return original, cells, speed


def _read_cell(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise EvalError(f"cannot read the stored cell {path} ({exc}); delete it and rerun to measure it again") \
            from None
    if not isinstance(data, dict) or data.get("kind") not in ("original", "cell", "speed"):
        raise EvalError(f"{path} is not a stored ablation cell; delete it and rerun to measure it again")
    return data


def _fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return "" if value is None else str(value)


def csv_text(rows: list[dict], columns: list[str]) -> str:
    out = io.StringIO(newline="")
    writer = csv.DictWriter(out, columns, extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
    return out.getvalue()


def markdown(original: dict | None, cells: list[dict], speed: list[dict]) -> str:
    tasks = task_columns(([original] if original else []) + cells)
    lines = ["| method | KV heads | fraction | uptrain steps | held-out loss | perplexity | KL to original | "
             "top-1 agreement |" + "".join(f" {t} |" for t in tasks), "|---|---|---|---|---|---|---|---|" +
             "---|" * len(tasks)]
    if original:
        lines.append(f"| original (MHA) | {original['groups']} | | {original['original_steps']} (pretraining) | "
                     f"{_fmt(original['heldout_loss'])} | {_fmt(original['perplexity'])} | 0 | 1 |" +
                     "".join(f" {_fmt(original.get(t))} |" for t in tasks))
    for c in cells:
        lines.append(f"| {c['method']} | {c['groups']} | {c['fraction']:g} | {c['uptrain_steps']} | "
                     f"{_fmt(c['heldout_loss'])} | {_fmt(c['perplexity'])} | {_fmt(c['kl'])} | "
                     f"{_fmt(c['top1_agreement'])} |" + "".join(f" {_fmt(c.get(t))} |" for t in tasks))
    if speed:
        lines += ["", "| model | KV heads | KV bytes/token | context | batch | decode loop | prefill tok/s | "
                      "decode tok/s | decode ms/step | decode vs MHA | device, attention |",
                  "|---|---|---|---|---|---|---|---|---|---|---|"]
        lines += [f"| {s['model']} | {s['kv_heads']} | {s['kv_bytes_per_token']:.0f} | {s['context']} | "
                  f"{s['batch_size']} | {s['decode']} | {s['prefill_tokens_per_s']:.0f} | "
                  f"{s['decode_tokens_per_s']:.0f} | {s['decode_ms_per_step']:.2f} | "
                  f"{_ratio(s['decode_vs_original'])} | {s.get('device', '')}, {s.get('attention', '')} |"
                  for s in speed]
    return "\n".join(lines) + "\n"


def _ratio(value: float | None) -> str:
    return "" if value is None else f"{value:.2f}x"


def plot(original: dict | None, cells: list[dict], speed: list[dict]) -> dict[str, bytes]:
    """The figures as PNG bytes by file name."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figures = {}
    methods = sorted({c["method"] for c in cells}, key=method_order)
    groups = sorted({c["groups"] for c in cells}, reverse=True)
    colours = {m: f"C{i}" for i, m in enumerate(methods)}
    styles = {g: ("-", "--", ":", "-.")[i % 4] for i, g in enumerate(groups)}
    fractions = sorted({c["fraction"] for c in cells})

    # Figure 4: held-out loss by method, one bar group per (KV heads, fraction); each task's score in a panel beside
    tasks = task_columns(([original] if original else []) + cells)
    fig, axes = plt.subplots(1, 1 + len(tasks), figsize=(7 * (1 + len(tasks)), 4), squeeze=False)
    slots = [(g, f) for g in groups for f in fractions]
    width = 0.8 / max(1, len(methods))
    for ax, column in zip(axes[0], ["heldout_loss", *tasks]):
        for i, method in enumerate(methods):
            values = [next((c.get(column, float("nan")) for c in cells if (c["method"], c["groups"], c["fraction"])
                            == (method, g, f)), float("nan")) for g, f in slots]
            ax.bar([s + i * width for s in range(len(slots))], values, width, label=method, color=colours[method])
        if original and original.get(column) is not None:
            ax.axhline(original[column], color="black", linestyle="--", label="original MHA")
        if column == "heldout_loss":
            lowest = min([c["heldout_loss"] for c in cells] + ([original["heldout_loss"]] if original else []))
            ax.set_ylim(bottom=lowest - 0.1 * abs(lowest))  # losses differ in the first decimal: not from zero
        ax.set_xticks([s + width * (len(methods) - 1) / 2 for s in range(len(slots))])
        ax.set_xticklabels([f"{groups_label(g)}\nα={f:g}" for g, f in slots])
        ax.set_xlabel("KV heads G and uptraining fraction α")
        ax.set_ylabel("held-out loss" if column == "heldout_loss" else column)
        ax.legend(fontsize=8)
    axes[0][0].set_title("Conversion method (cf. GQA paper, Figure 4)")
    for ax, column in zip(axes[0][1:], tasks):
        ax.set_title(f"lm-eval task: {column}")
    figures["fig4_methods.png"] = _png(fig)

    # Figure 5: held-out loss against uptraining fraction
    fig, ax = plt.subplots(figsize=(7, 4))
    for method in methods:
        for g in groups:
            pts = sorted((c["fraction"], c["heldout_loss"]) for c in cells if c["method"] == method and c["groups"] == g)
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", color=colours[method], linestyle=styles[g],
                    label=f"{method}, {groups_label(g)}")
    if original:
        ax.axhline(original["heldout_loss"], color="black", linestyle="--", label="original MHA")
    ax.set_xlabel("uptraining fraction α of original steps")
    ax.set_ylabel("held-out loss")
    ax.set_title("Uptraining proportion (cf. GQA paper, Figure 5)")
    ax.legend(fontsize=8)
    figures["fig5_fractions.png"] = _png(fig)

    # Figure 6: decode time per step and KV bytes per token against KV heads
    if speed:
        fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
        loops = sorted({s["decode"] for s in speed})
        for (context, batch, loop) in sorted({(s["context"], s["batch_size"], s["decode"]) for s in speed}):
            pts = sorted((s["kv_heads"], s["decode_ms_per_step"]) for s in speed
                         if (s["context"], s["batch_size"], s["decode"]) == (context, batch, loop))
            ax1.plot([p[0] for p in pts], [p[1] for p in pts], marker="o",
                     linestyle=("-", "--", ":")[loops.index(loop) % 3],
                     label=f"context {context}, batch {batch}, {loop}")
        kv = sorted({(s["kv_heads"], s["kv_bytes_per_token"]) for s in speed})
        ax2.bar(range(len(kv)), [b / 1024 for _, b in kv])
        heads = sorted({s["kv_heads"] for s in speed})
        ax1.set_xticks(heads, [groups_label(k).removeprefix("G=") for k in heads])
        ax1.set_xlabel("KV heads (G)")
        ax1.set_ylabel("decode ms per step")
        ax1.set_title("Decode time per step")
        ax1.legend(fontsize=8)
        ax2.set_xticks(range(len(kv)), [groups_label(k).removeprefix("G=") for k, _ in kv])
        ax2.set_xlabel("KV heads (G)")
        ax2.set_ylabel("KV cache KiB per token")
        ax2.set_title("KV cache per token")
        fig.suptitle("Number of groups (cf. GQA paper, Figure 6)")
        figures["fig6_speed.png"] = _png(fig)
    return figures


def _png(fig) -> bytes:
    fig.tight_layout()
    out = io.BytesIO()
    fig.savefig(out, format="png", dpi=120)
    import matplotlib.pyplot as plt

    plt.close(fig)
    return out.getvalue()


def render(root: Path) -> Path:
    """Write the tables and plots into `root`, all of them or (on a disk fault) none; returns the markdown table's
    path."""
    original, cells, speed = load_cells(root)
    rows = ([{**original, "method": "original"}] if original else []) + cells
    files = {
        "results.csv": csv_text(rows, QUALITY_COLUMNS + task_columns(rows)),
        "speed.csv": csv_text(speed, SPEED_COLUMNS),
        "results.json": json.dumps({"original": original, "cells": cells, "speed": speed}, indent=2) + "\n",
        "results.md": markdown(original, cells, speed),
        **plot(original, cells, speed),
    }
    write_files({root / name: data for name, data in files.items()}, DESTINATION)
    return root / "results.md"
