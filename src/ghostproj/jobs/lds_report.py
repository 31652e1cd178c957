"""What `ghostproj evaluate` writes: every setting's LDS as JSON, and a bar plot of them
with their intervals as PNG."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..engines.factors import EIGEN
from ..scoring.lds import LdsEstimate
from ..store.files import atomic_write


@dataclass
class Setting:
    metric: str
    normalize: str
    checkpoints: int
    lds: LdsEstimate
    vectors: str = "grad"

    @property
    def key(self) -> tuple[str, str, int, str]:
        return self.metric, self.normalize, self.checkpoints, self.vectors

    @property
    def name(self) -> str:
        kind = {"adam": ", Adam directions", EIGEN: ", Kronecker eigenbasis"}.get(self.vectors, "")
        return f"{self.metric}, --normalize {self.normalize}, {self.checkpoints} checkpoint(s){kind}"


@dataclass
class EvaluateResult:
    out: Path
    subsets: int
    n_train: int
    n_query: int  # queries with a label position, the ones evaluated
    trained: int = 0  # subset models trained by this call (the rest were cached)
    settings: list[Setting] = field(default_factory=list)
    best: Setting | None = None
    baseline: Setting | None = None
    difference: tuple[float, float, float] | None = None  # best - baseline, with its interval
    ensemble_gain: tuple[float, float, float] | None = None  # all checkpoints - the final one, best's scoring
    recommended: Setting | None = None  # score's defaults with every checkpoint, as the README recommends
    recommended_difference: tuple[float, float, float] | None = None  # recommended - baseline
    removal: list[dict] = field(default_factory=list)
    finished: bool = True  # False: a part that trained its subsets only, or a torchrun rank other than 0
    rank: int | None = None  # the torchrun rank
    rank_setting: int | None = None  # --rank and --layers the runs were projected with
    layers_setting: list[str] | None = None
    plot: Path | None = None
    seconds: float = 0.0
    notes: list[str] = field(default_factory=list)


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
