"""What `ghostproj evaluate` writes: every setting's LDS as JSON, and a bar plot of them
with their intervals as PNG."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from ..store.files import atomic_write

if TYPE_CHECKING:
    from .evaluate import EvaluateResult


def write_report(result: EvaluateResult, path: Path) -> None:
    """Every setting's LDS, interval and per-query values, the comparison and the removals."""
    doc = {
        "subsets": result.subsets, "train_examples": result.n_train, "queries": result.n_query,
        "rank": result.rank_setting, "layers": result.layers_setting,
        "settings": [{"metric": s.metric, "normalize": s.normalize, "checkpoints": s.checkpoints, "vectors": s.vectors,
                      "lds": s.lds.value, "interval95": [s.lds.low, s.lds.high],
                      "per_query": [None if np.isnan(v) else float(v) for v in s.lds.per_query]}
                     for s in result.settings],
        "best": result.best.name if result.best else None,
        "baseline": result.baseline.name if result.baseline else None,
        "best_minus_baseline": list(result.difference) if result.difference else None,
        "all_checkpoints_minus_final": list(result.ensemble_gain) if result.ensemble_gain else None,
        "recommended": result.recommended.name if result.recommended else None,
        "recommended_minus_baseline": list(result.recommended_difference) if result.recommended_difference else None,
        "removal": result.removal,
    }
    atomic_write(path, (json.dumps(doc, indent=1) + "\n").encode())


def plot_report(result: EvaluateResult, path: Path, notes: list[str]) -> Path | None:
    """A bar per setting with its 95% interval, as PNG (needs matplotlib: the plot extra)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        notes.append("No PNG plot: matplotlib is not installed (pip install 'ghostproj[plot]').")
        return None
    labels = [f"{s.metric}/{s.normalize}/{s.checkpoints}" + ({"adam": "/adam", "eigen": "/eigen"}.get(s.vectors, ""))
              for s in result.settings]
    values = np.array([s.lds.value for s in result.settings])
    errors = np.array([[s.lds.value - s.lds.low for s in result.settings],
                       [s.lds.high - s.lds.value for s in result.settings]])
    fig, ax = plt.subplots(figsize=(max(6.0, 0.5 * len(labels) + 2), 4.0))
    ax.bar(range(len(labels)), values, yerr=errors, capsize=3, color="#4c72b0")
    ax.set_xticks(range(len(labels)), labels, rotation=60, ha="right", fontsize=8)
    ax.set_ylabel("LDS (mean Spearman over queries)")
    ax.set_title(f"LDS over {result.subsets} subset models, {result.n_query} queries (95% bootstrap intervals)",
                 fontsize=9)
    ax.axhline(0.0, color="black", linewidth=0.5)
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    tmp.replace(path)
    return path
