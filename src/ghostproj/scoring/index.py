"""Approximate top-k over millions of training vectors: an index of the training vectors
after the very transform ``score`` applies (centering, normalization), searched by inner
product with the query vectors after theirs (for influence, the damped inverse Fisher's
square root on both sides: IndexColumns).

The default indexes need only torch (scan_index: ``Flat`` below 100,000 rows, ``Scan``
above); any other ``--factory`` string is a FAISS index, from the optional extra ``pip
install 'ghostproj[index]'``. An index directory holds ``index.safetensors`` (torch
indexes) or ``index.faiss``, ``index.json`` (the settings, the training run's manifest
without its shards, the chosen index) and, where the metric needs them, the training mean
and the Fisher sums.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from .. import defaults
from ..errors import GhostprojError
from ..store.files import atomic_write
from ..store.fingerprint import differing_part
from ..store.manifest import Manifest
from ..store.reader import Run
from ..store.shards import encode_safetensors, safetensors_parts
from .columns import chunks, column_index, relative_blocks, selected_layers
from .feed import chunk_rows_for
from .fisher import compute_fisher
from .influence import (
    FisherSums,
    apply_blocks,
    check_fisher,
    ekfac_scale,
    inverse_square_roots,
    is_eigenbasis,
    mean_squares,
)
from .scan_index import (
    DEFAULT_CANDIDATES,
    FlatIndex,
    ScanIndex,
    parse_factory,
)
from .score import (
    DEFAULT_METRIC,
    DEFAULT_NORMALIZE,
    METRICS,
    check_choices,
    query_side,
    stream_scores,
    training_mean,
)
from .topk import StreamingTopK, ranked
from .transform import Transform

INDEX_FILE, TORCH_INDEX_FILE = "index.faiss", "index.safetensors"
SETTINGS_FILE, EXTRAS_FILE = "index.json", "transform.safetensors"
# Below this many rows the exact flat index is the index: it is as fast to search as an
# approximate one would be to build, and it is exact.
FLAT_MAX_ROWS = 100_000
INSTALL_HINT = "pip install 'ghostproj[index]'"
# 2: torch indexes; influence rows and queries each carry the inverse Fisher's square root
INDEX_VERSION = 2


def faiss_module():
    try:
        import faiss
    except ImportError:
        raise GhostprojError(f"The index needs FAISS, which is not installed; install it with {INSTALL_HINT} "
                             "(faiss-cpu; on a CUDA machine faiss-gpu also searches on the GPU).") from None
    return faiss


@dataclass
class IndexSettings:
    metric: str = DEFAULT_METRIC
    normalize: str = DEFAULT_NORMALIZE
    center: bool = False
    damping: float = defaults.DAMPING
    layers: list[str] | None = None
    factory: str = ""  # Flat, Scan[d] or a FAISS index factory string; chosen from the size when empty
    nprobe: int | None = None  # FAISS IVF lists searched per query; None: chosen from the index
    candidates: int | None = None  # Scan: rows per query re-ranked with the full codes; None: the default
    rows: int = 0
    width: int = 0
    train_manifest: dict = field(default_factory=dict)
    seconds: float = 0.0
    version: int = INDEX_VERSION


def default_factory(rows: int) -> str:
    """Exact below FLAT_MAX_ROWS, the scan index above it: gradient-like vectors are close
    to isotropic, so FAISS's inverted files prune little of them, and the scan index keeps
    far more recall at equal speed (benchmarks/README.md, "The index on gradient-like
    vectors")."""
    return "Flat" if rows < FLAT_MAX_ROWS else "Scan"


def uses_faiss(factory: str) -> bool:
    return bool(factory) and factory != "Flat" and parse_factory(factory) is None


def check_settings(s: IndexSettings) -> None:
    check_choices(s.metric, s.normalize, None, s.damping)
    if s.metric not in METRICS[:3]:
        raise GhostprojError("The index supports --metric cosine, dot and influence (influence-full needs the "
                             "full Fisher; score it exactly with `ghostproj score`).")
    check_search_counts(s.nprobe, s.candidates)
    if parse_factory(s.factory) == 0 and s.factory != "Scan":
        raise GhostprojError(f"--factory {s.factory}: a scan index needs at least one head direction (Scan<d>, d >= 1).")


def check_search_counts(nprobe: int | None, candidates: int | None) -> None:
    """--nprobe and --candidates, when given (None: chosen from the index), at building and
    at querying alike."""
    for flag, value in (("--nprobe", nprobe), ("--candidates", candidates)):
        if value is not None and value < 1:
            raise GhostprojError(f"{flag} must be at least 1, got {value}.")


def _check_search_options(s: IndexSettings) -> None:
    """--nprobe and --candidates each belong to one kind of index: checked once the size
    has chosen the kind."""
    scan = parse_factory(s.factory) is not None
    if s.nprobe and not uses_faiss(s.factory):
        hint = "; the scan index takes --candidates" if scan else ""
        raise GhostprojError(f"--nprobe applies to FAISS IVF indexes (--factory IVF...){hint}.")
    if s.candidates and not scan:
        raise GhostprojError(f"--candidates applies to the scan index (--factory Scan), not to {s.factory}.")


class IndexColumns:
    """The columns, blocks and transform of a training run under given settings. For
    influence, the damped inverse Fisher is split between the two sides, its square root
    on the training rows and on the queries alike: the rows an index holds then look like
    the queries it will be asked (a one-sided preconditioner would make the queries weigh
    most the directions in which the rows vary least, which no index of the rows learns)."""

    def __init__(self, train_run: Run, s: IndexSettings, extras: dict | None = None):
        selected = selected_layers(train_run.layers, s.layers)
        self.settings = s
        self.cols = column_index(selected, train_run.dim)
        self.blocks = relative_blocks(selected)
        self.width = sum(b.size for b in self.blocks)
        self.transform = Transform(self.blocks, normalize=s.normalize, unit_last=(s.metric == "cosine"),
                                   mean=(extras or {}).get("mean"), scale=(extras or {}).get("scale"))
        fishers = [extras[k] for k in sorted(k for k in extras or {} if k.startswith("fisher."))]
        self.roots = inverse_square_roots(fishers, s.damping) if s.metric == "influence" and fishers else None

    def rows(self, x: torch.Tensor) -> torch.Tensor:
        """Stored training rows as the index holds them."""
        return self.as_queries(self.transform(x))

    def as_queries(self, q: torch.Tensor) -> torch.Tensor:
        """Transformed rows as the index holds or searches them: for influence, times the
        damped inverse Fisher's square root."""
        return q if self.roots is None else apply_blocks(q, self.roots, self.blocks)


def build_index(train_run: Run, s: IndexSettings, device: torch.device, fisher: FisherSums | None = None,
                log=None) -> tuple[object, IndexSettings, dict]:
    """(the FAISS index of the transformed training rows, the settings as built, the
    extra tensors the query side needs)."""
    t0 = time.perf_counter()
    check_settings(s)
    prep = IndexColumns(train_run, s)
    rows = train_run.rows
    if rows == 0:
        raise GhostprojError("The training run is empty.")
    chunk_rows = chunk_rows_for(device, None, prep.width, train_run.store_dtype, rows)
    s.factory = s.factory or default_factory(rows)
    _check_search_options(s)
    s.rows, s.width = rows, prep.width
    s.train_manifest = {k: v for k, v in train_run.manifest.to_json().items() if k not in ("shards", "summary")}
    extras: dict[str, torch.Tensor] = {}
    if s.center:
        prep.transform.mean = extras["mean"] = training_mean(train_run, prep.cols, chunk_rows, prep.width, device)
    if s.metric == "influence" and is_eigenbasis(train_run):  # EK-FAC: a weight per coordinate, on both sides
        if fisher is not None:
            check_fisher(fisher, train_run, prep.blocks, "none", False, False)
            diagonal = torch.cat([f.diagonal() for f in fisher.fishers()])
        else:
            diagonal = mean_squares(train_run, prep.cols, chunk_rows, device)
        extras["scale"] = ekfac_scale(diagonal, prep.blocks, train_run, s.damping)
    elif s.metric == "influence":
        if fisher is None:
            fisher = compute_fisher(train_run, layers=s.layers, normalize=s.normalize, full=False, part=None,
                                    chunk_rows=None, device=device)
        else:
            check_fisher(fisher, train_run, prep.blocks, s.normalize, False, s.center)
        extras.update({f"fisher.{i:05d}": f for i, f in enumerate(fisher.fishers())})
    prep = IndexColumns(train_run, s, extras)
    if uses_faiss(s.factory):
        index = _build_faiss(train_run, prep, s, chunk_rows, log)
    else:
        index = _build_torch(train_run, prep, s, chunk_rows, log)
    s.seconds = time.perf_counter() - t0
    return index, s, extras


def _build_torch(train_run: Run, prep: IndexColumns, s: IndexSettings, chunk_rows: int, log):
    def transformed():
        return ((idx, prep.rows(x)) for idx, x in chunks(train_run, prep.cols, chunk_rows))

    if s.factory == "Flat":
        return FlatIndex.build(s.rows, s.width, transformed)
    head_dims = parse_factory(s.factory)  # 0: as many as hold 70% of the variance
    # the principal directions from a strided sample of at most 2^16 rows (and 256 MiB)
    n = min(s.rows, max(2 * head_dims, 1024, min(2 ** 16, 2 ** 26 // s.width)))
    sample = _training_sample(train_run, prep, chunk_rows, n)
    if log:
        log(f"fitting the head directions on {sample.shape[0]} sampled rows, then encoding")
    s.candidates = s.candidates or DEFAULT_CANDIDATES
    index = ScanIndex.build(sample, s.rows, transformed, head_dims, s.candidates)
    s.factory = f"Scan{index.head_dims}"
    return index


def _build_faiss(train_run: Run, prep: IndexColumns, s: IndexSettings, chunk_rows: int, log):
    faiss = faiss_module()
    try:
        index = faiss.index_factory(prep.width, s.factory, faiss.METRIC_INNER_PRODUCT)
    except Exception as exc:
        raise GhostprojError(f"FAISS cannot build --factory '{s.factory}' ({_first_line(exc)}).") from None
    ivf = _ivf(faiss, index)
    if ivf is None:  # flat, HNSW, ...: keep the dataset indices beside the index
        index = faiss.IndexIDMap2(index)
    if not index.is_trained:
        sample = _training_sample(train_run, prep, chunk_rows, _training_rows(faiss, index, s.rows))
        if log:
            log(f"training the {s.factory} index on {sample.shape[0]} sampled rows")
        index.train(sample.numpy())
    for idx, x in chunks(train_run, prep.cols, chunk_rows):
        index.add_with_ids(prep.rows(x).numpy(), idx.numpy())
    if ivf is not None:
        s.nprobe = s.nprobe or max(1, ivf.nlist // 16)
        ivf.nprobe = s.nprobe
    return index


def _ivf(faiss, index):
    try:
        return faiss.extract_index_ivf(index)
    except RuntimeError:
        return None


def _training_rows(faiss, index, rows: int) -> int:
    """Rows to train on: 64 per IVF list (the k-means guideline is 39 to 256), at least
    2^16 for the codes' own training, never more than the run has."""
    ivf = _ivf(faiss, index)
    want = max(2 ** 16, 64 * ivf.nlist if ivf is not None else 0)
    return min(rows, want)


def _training_sample(train_run: Run, prep: IndexColumns, chunk_rows: int, n: int) -> torch.Tensor:
    """``n`` transformed training rows at a fixed stride over the run (the same rows every
    build; a stride covers every shard, unlike the run's first n rows)."""
    wanted = torch.linspace(0, train_run.rows - 1, n).round().long().unique()
    _, rows = _rows_at(chunks(train_run, prep.cols, chunk_rows), wanted)
    return prep.rows(rows)


def _rows_at(stream, wanted: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(dataset indices, rows) at the sorted run positions ``wanted`` of a chunk stream."""
    idx_out, rows_out, row = [], [], 0
    for idx, x in stream:
        m = x.shape[0]
        picked = wanted[(wanted >= row) & (wanted < row + m)] - row
        if picked.numel():
            idx_out.append(idx[picked])
            rows_out.append(x[picked])
        row += m
    return torch.cat(idx_out), torch.cat(rows_out)


def save_index(path: Path, index, s: IndexSettings, extras: dict) -> None:
    path.mkdir(parents=True, exist_ok=True)
    if isinstance(index, (ScanIndex, FlatIndex)):
        atomic_write(path / TORCH_INDEX_FILE, safetensors_parts(index.tensors()))
    else:
        faiss = faiss_module()
        writer = faiss.VectorIOWriter()
        faiss.write_index(index, writer)
        atomic_write(path / INDEX_FILE, faiss.vector_to_array(writer.data).tobytes())
    if extras:
        atomic_write(path / EXTRAS_FILE, encode_safetensors(extras))
    # written last: a directory with index.json is a finished index
    atomic_write(path / SETTINGS_FILE, (json.dumps(asdict(s), indent=1) + "\n").encode())


def load_index(path: Path) -> tuple[object, IndexSettings, dict]:
    from safetensors.torch import load_file

    if not (path / SETTINGS_FILE).is_file():
        raise GhostprojError(f"{path} is not a finished index (no {SETTINGS_FILE}); build it with "
                             "`ghostproj index build`.")
    try:
        settings = json.loads((path / SETTINGS_FILE).read_text())
        if settings.get("version", 1) != INDEX_VERSION:
            raise GhostprojError(f"The index in {path} was built by another version of ghostproj; rebuild it with "
                                 "`ghostproj index build`.")
        s = IndexSettings(**settings)
        if uses_faiss(s.factory):
            index = faiss_module().read_index(str(path / INDEX_FILE))  # straight from the file: one copy in memory
        elif s.factory == "Flat":
            index = FlatIndex.from_tensors(load_file(str(path / TORCH_INDEX_FILE)))
        else:
            index = ScanIndex.from_tensors(load_file(str(path / TORCH_INDEX_FILE)), s.candidates)
        extras = {}
        if (path / EXTRAS_FILE).is_file():
            extras = load_file(str(path / EXTRAS_FILE))
    except (OSError, ValueError, TypeError, RuntimeError, KeyError) as exc:
        raise GhostprojError(f"Cannot read the index in {path} ({_first_line(exc)}); rebuild it.") from None
    return index, s, extras


def query_vectors(query_run: Run, s: IndexSettings, extras: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """(query dataset indices, the query block as the index searches it: transformed, and
    for influence multiplied by the damped inverse Fisher)."""
    train_manifest = Manifest.from_json(dict(s.train_manifest, shards=[]), "the index's training-run record")
    part = differing_part(train_manifest, query_run.manifest)
    if part is not None:
        raise GhostprojError(f"The query run does not fit the index: their {part} differ (project the queries "
                             "with --like TRAIN_DIR).")
    if query_run.rows == 0:
        raise GhostprojError("The query set is empty.")
    prep = IndexColumns(Run(query_run.path, train_manifest, []), s, extras)
    index, q = query_side(query_run, prep.cols, 8192, prep.transform)
    return index, prep.as_queries(q)


def search(index, q: torch.Tensor, k: int, nprobe: int | None = None,
           candidates: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(scores [M, k'], dataset indices [M, k']) best first, ties by the smaller dataset index;
    k' = min(k, rows). A query whose probed lists hold fewer than k rows gets -inf scores
    and index -1 in the missing places."""
    if isinstance(index, ScanIndex):
        return index.search(q, k, candidates)
    if isinstance(index, FlatIndex):
        return index.search(q, k)
    faiss = faiss_module()
    ivf = _ivf(faiss, index)
    if ivf is not None and nprobe:
        ivf.nprobe = nprobe
    k = min(k, index.ntotal)
    # one more than k, so that a tie at the k-th place is broken by index like score's top-k
    scores, ids = index.search(q.numpy(), min(k + 1, index.ntotal))
    scores, ids = torch.from_numpy(scores), torch.from_numpy(ids)
    scores = torch.where(ids < 0, torch.full_like(scores, float("-inf")), scores)
    ids = torch.where(ids < 0, torch.full_like(ids, torch.iinfo(torch.int64).max), ids)
    scores, ids = ranked(scores, ids, k)
    return scores, torch.where(scores == float("-inf"), torch.full_like(ids, -1), ids)


def exact_topk(train_run: Run, s: IndexSettings, q: torch.Tensor, k: int, device: torch.device,
               extras: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """The exact answer for query vectors ``q`` (as the index searches them): a streaming
    score over the training run."""
    prep = IndexColumns(train_run, s, extras)
    best = StreamingTopK(min(k, train_run.rows))
    chunk_rows = chunk_rows_for(device, None, prep.width, train_run.store_dtype, train_run.rows)
    # the rows' square root moves to the query side too (the matrix is symmetric), so the
    # training rows need only score's transform
    exact_q = prep.as_queries(q)
    stream_scores(train_run, prep.cols, chunk_rows, device, prep.transform, exact_q.t().contiguous(),
                  torch.empty(train_run.rows, dtype=torch.long), None, None, None, best, None)
    vals, ids = best.result()
    return vals.cpu(), ids.cpu()


def rows_as_queries(raw: torch.Tensor, s: IndexSettings, extras: dict, train_run: Run) -> torch.Tensor:
    """Stored training rows (float32, all columns) turned into query vectors exactly as a
    query run's rows would be."""
    prep = IndexColumns(train_run, s, extras)
    return prep.as_queries(prep.transform(raw if prep.cols is None else raw[:, prep.cols].contiguous()))


def recall_at_k(approx: torch.Tensor, exact: torch.Tensor) -> float:
    """Mean over queries of |approximate top-k ∩ exact top-k| / k."""
    hits = [len(set(a.tolist()) & set(e.tolist())) / e.numel() for a, e in zip(approx, exact)]
    return sum(hits) / len(hits)


def sample_rows(run: Run, n: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` (dataset index, stored vector as float32) rows of ``run``, drawn at random
    with ``seed``."""
    g = torch.Generator().manual_seed(seed)
    wanted = torch.randperm(run.rows, generator=g)[: min(n, run.rows)].sort().values
    return _rows_at(run.iter_chunks(8192, convert=lambda t: t.float()), wanted)


def index_bytes(path: Path) -> int:
    return sum((path / name).stat().st_size for name in (INDEX_FILE, TORCH_INDEX_FILE) if (path / name).is_file())


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[-1] if text else type(exc).__name__


def on_device(index, device: torch.device):
    """The index on the GPU where FAISS has GPU support and ``device`` is one, else itself
    (the torch indexes search on the CPU)."""
    if isinstance(index, (ScanIndex, FlatIndex)):
        return index
    faiss = faiss_module()
    if device.type != "cuda" or not hasattr(faiss, "StandardGpuResources"):
        return index
    try:
        return faiss.index_cpu_to_gpu(faiss.StandardGpuResources(), device.index or 0, index)
    except Exception:  # an index type without a GPU version: search it on the CPU
        return index
