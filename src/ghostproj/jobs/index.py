"""The index jobs: build an approximate top-k index of a training run (and measure its
recall against exact scoring), and query it with a projected query run."""

from __future__ import annotations

import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from .. import defaults
from ..errors import GhostprojError
from ..models import resolve_device
from ..scoring.index import (
    SETTINGS_FILE,
    IndexSettings,
    build_index,
    check_search_counts,
    exact_topk,
    faiss_module,
    index_bytes,
    load_index,
    on_device,
    parse_factory,
    query_vectors,
    recall_at_k,
    rows_as_queries,
    sample_rows,
    save_index,
    search,
    uses_faiss,
)
from ..scoring.influence import FisherSums
from ..scoring.result_files import write_topk
from ..scoring.score import ScoreResult
from ..store.manifest import MANIFEST
from ..store.outputs import check_output_dir, check_outputs
from ..store.reader import open_run


@dataclass
class RecallCheck:
    queries: int
    k: int
    recall: float
    exact_qps: float
    index_qps: float
    source: str  # where the check's queries came from


def check_index_out(out: str, inputs: list, overwrite: bool) -> Path:
    """Refuse an index directory that would land on or hold an input, lie inside a run, or
    replace an existing index (without ``overwrite``), before any work."""
    path = check_output_dir(out, "--out", inputs, replaced=True)
    if (path / MANIFEST).exists() or (path.parent / MANIFEST).exists():
        raise GhostprojError(f"--out {out} is a projection run or inside one; write the index elsewhere.")
    if path.exists() and not path.is_dir():
        raise GhostprojError(f"--out {out} is a file; give a directory for the index.")
    if path.is_dir() and any(path.iterdir()):
        if not (path / SETTINGS_FILE).is_file():
            raise GhostprojError(f"--out {out} is a directory with other files in it; give a new or empty one.")
        if not overwrite:
            raise GhostprojError(f"--out {out} already holds an index; pass --overwrite to replace it.")
    if not path.parent.is_dir():
        raise GhostprojError(f"--out {out}: the directory {path.parent} does not exist.")
    return path


@dataclass
class IndexBuildOptions:
    """Options of ``ghostproj index build``: the training run, where the index goes, the
    scoring transform it is built for (as ``score``'s) and the recall check."""

    train: str
    out: str
    metric: str = defaults.METRIC
    normalize: str = defaults.NORMALIZE
    center: bool = False
    damping: float = defaults.DAMPING
    layers: list[str] | None = None
    fisher: str | None = None
    factory: str | None = None  # None: chosen from the size (default_factory)
    nprobe: int | None = None
    candidates: int | None = None
    check: int = 100
    check_query: str | None = None
    top_k: int = 10
    device: str = "auto"
    overwrite: bool = False

    def __post_init__(self):
        check_search_counts(self.nprobe, self.candidates)
        if self.check < 0:
            raise GhostprojError(f"--check must be 0 or more, got {self.check}.")
        if self.top_k < 1:
            raise GhostprojError(f"--top-k must be at least 1, got {self.top_k}.")

    @property
    def settings(self) -> IndexSettings:
        return IndexSettings(metric=self.metric, normalize=self.normalize, center=self.center, damping=self.damping,
                             layers=self.layers, factory=self.factory or "", nprobe=self.nprobe,
                             candidates=self.candidates)


@dataclass
class IndexQueryOptions:
    """Options of ``ghostproj index query``."""

    index_dir: str
    query: str
    top_k: int = 10
    nprobe: int | None = None  # None: as built
    candidates: int | None = None
    topk_out: str | None = None
    device: str = "auto"
    overwrite: bool = False

    def __post_init__(self):
        if self.top_k < 1:
            raise GhostprojError(f"--top-k must be at least 1, got {self.top_k}.")
        check_search_counts(self.nprobe, self.candidates)


def run_index_build(opts: IndexBuildOptions, log=None) -> tuple[IndexSettings, int, RecallCheck | None]:
    """Build, save and (with ``check`` > 0) measure the index. Returns (settings as built,
    index bytes, the recall check); ``log(message)`` takes what the build says."""
    log = log or (lambda message: None)
    train, out, settings, fisher = opts.train, opts.out, opts.settings, opts.fisher
    check, check_query, check_k, device, overwrite = opts.check, opts.check_query, opts.top_k, opts.device, opts.overwrite
    if uses_faiss(settings.factory):
        faiss_module()  # the one-sentence install hint before any work
    path = check_index_out(out, [train, fisher, check_query], overwrite)
    where = resolve_device(device)
    train_run = open_run(train)
    fisher_sums = FisherSums.load(fisher) if fisher else None
    if fisher and settings.metric != "influence":
        raise GhostprojError("--fisher only applies to --metric influence.")
    query_run = open_run(check_query) if check_query else None
    index, built, extras = build_index(train_run, settings, where, fisher_sums, log)
    staging = path.with_name(f".{path.name}.building")
    shutil.rmtree(staging, ignore_errors=True)
    save_index(staging, index, built, extras)
    if path.exists():
        shutil.rmtree(path)
    staging.rename(path)  # an existing index is replaced only by a finished one
    recall = _recall_check(index, built, extras, train_run, query_run, check, check_k, where) if check else None
    return built, index_bytes(path), recall


def _recall_check(index, s: IndexSettings, extras: dict, train_run, query_run, n: int, k: int,
                  device: torch.device) -> RecallCheck:
    """recall@k of the index against exact streaming scoring on ``n`` sampled queries:
    rows of the check's query run, or else training rows, each without itself in either
    answer (it would be its own best match)."""
    if query_run is not None:
        qidx, q = query_vectors(query_run, s, extras)
        pick = torch.randperm(qidx.numel(), generator=torch.Generator().manual_seed(0))[:n]
        qidx, q, own, source = qidx[pick], q[pick], None, f"{pick.numel()} rows of the query run"
    else:
        own, raw = sample_rows(train_run, n)
        q = rows_as_queries(raw, s, extras, train_run)
        source = f"{own.numel()} training rows, each without itself"
    extra = 0 if own is None else 1
    t0 = time.perf_counter()
    exact_scores, exact_ids = exact_topk(train_run, s, q, k + extra, device, extras)
    t_exact = time.perf_counter() - t0
    searchable = on_device(index, device)
    t0 = time.perf_counter()
    _, approx_ids = search(searchable, q, k + extra)
    t_index = time.perf_counter() - t0
    if own is not None:
        exact_ids = _without(exact_ids, own, k)
        approx_ids = _without(approx_ids, own, k)
    m = q.shape[0]
    return RecallCheck(m, k, recall_at_k(approx_ids, exact_ids), m / t_exact, m / t_index, source)


def _without(ids: torch.Tensor, own: torch.Tensor, k: int) -> torch.Tensor:
    """Each row's first k ids other than its own."""
    out = torch.full((ids.shape[0], k), -1, dtype=torch.long)
    for j in range(ids.shape[0]):
        kept = ids[j][ids[j] != own[j]][:k]
        out[j, : kept.numel()] = kept
    return out


def run_index_query(opts: IndexQueryOptions) -> ScoreResult:
    index_dir, query, top_k, topk_out, nprobe = opts.index_dir, opts.query, opts.top_k, opts.topk_out, opts.nprobe
    device, candidates = opts.device, opts.candidates
    check_outputs([(topk_out, "--topk-out")], [index_dir, query], opts.overwrite)
    path = Path(index_dir)
    index, s, extras = load_index(path)
    if nprobe is not None and not uses_faiss(s.factory):
        raise GhostprojError(f"--nprobe applies to FAISS IVF indexes; {index_dir} is a {s.factory} index"
                             + (" (it takes --candidates)." if parse_factory(s.factory) is not None else "."))
    if candidates is not None and parse_factory(s.factory) is None:
        raise GhostprojError(f"--candidates applies to scan indexes; {index_dir} is a {s.factory} index.")
    query_run = open_run(query)
    t0 = time.perf_counter()
    qidx, q = query_vectors(query_run, s, extras)
    scores, ids = search(on_device(index, resolve_device(device)), q, top_k, nprobe, candidates)
    result = ScoreResult(torch.empty(0, dtype=torch.long), qidx, topk_scores=scores, topk_train=ids,
                         seconds=time.perf_counter() - t0)
    if top_k > s.rows:
        result.notes.append(f"--top-k {top_k} is more than the {s.rows} indexed rows; keeping all {s.rows}.")
    if topk_out:
        write_topk(topk_out, result)
    return result
