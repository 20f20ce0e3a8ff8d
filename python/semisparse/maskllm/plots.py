"""Pictures of a MaskLLM run (matplotlib, an optional dependency: ``pip install matplotlib``)."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path

__all__ = ["plot_run", "read_metrics"]


def read_metrics(path: str | os.PathLike) -> list[dict]:
    """The records of a metrics JSONL file (as :mod:`semisparse.train` writes it)."""
    import json

    out = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            line = line.strip()
            if line:
                out.append(json.loads(line))
    return out


def _eval_points(history: Sequence[Mapping], key: str) -> tuple[list[int], list[float]]:
    xs, ys = [], []
    for rec in history:
        ev = rec.get("eval")
        v = ev.get(key) if isinstance(ev, Mapping) else rec.get(f"eval_{key}")
        if v is not None:
            xs.append(int(rec["step"]))
            ys.append(float(v))
    return xs, ys


def plot_run(history: Sequence[Mapping], changed: Mapping[str, float] | None, out_dir: str | os.PathLike,
             title: str = "MaskLLM") -> list[Path]:
    """Write ``loss.png`` (training loss, and the task loss without the regulariser),
    ``eval_ppl.png`` (evaluation perplexity, when the run evaluated) and
    ``changed_vs_prior.png`` (per layer, the fraction of groups whose learned pattern differs
    from the prior's) into ``out_dir``. Returns the paths written."""
    try:
        import matplotlib

        matplotlib.use("Agg", force=True)
        import matplotlib.pyplot as plt
    except ImportError as e:
        raise ImportError("--plot needs matplotlib (pip install matplotlib)") from e
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = []

    def save(fig, name):
        p = out / name
        tmp = out / f".{name}.tmp.png"
        fig.savefig(tmp, dpi=120, bbox_inches="tight")
        plt.close(fig)
        os.replace(tmp, p)
        written.append(p)

    train = [r for r in history if "loss" in r]
    if train:
        fig, ax = plt.subplots(figsize=(7, 4))
        ax.plot([r["step"] for r in train], [r["loss"] for r in train], label="loss (with regulariser)")
        if any("task_loss" in r for r in train):
            tl = [r for r in train if "task_loss" in r]
            ax.plot([r["step"] for r in tl], [r["task_loss"] for r in tl], label="task loss")
        ax.set_xlabel("step")
        ax.set_ylabel("loss")
        ax.set_title(f"{title}: training loss")
        ax.legend()
        ax.grid(alpha=0.3)
        save(fig, "loss.png")
    xs, ys = _eval_points(history, "ppl")
    if xs:
        fig, ax = plt.subplots(figsize=(7, 4))
        ax.plot(xs, ys, marker="o")
        ax.set_xlabel("step")
        ax.set_ylabel("perplexity (argmax masks)")
        ax.set_title(f"{title}: evaluation perplexity")
        ax.grid(alpha=0.3)
        save(fig, "eval_ppl.png")
    if changed:
        names = list(changed)
        fig, ax = plt.subplots(figsize=(max(6, 0.25 * len(names) + 2), 4.5))
        ax.bar(range(len(names)), [100 * changed[k] for k in names])
        ax.set_xticks(range(len(names)))
        ax.set_xticklabels(names, rotation=90, fontsize=7)
        ax.set_ylabel("groups changed vs prior (%)")
        ax.set_title(f"{title}: learned pattern differs from the prior")
        ax.grid(axis="y", alpha=0.3)
        save(fig, "changed_vs_prior.png")
    return written
