"""The score job: open two runs, score them, write the requested files, print tables."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .. import defaults
from ..data.records import record_field, records_for_run
from ..distributed import device_for_this_process, distributed_rank
from ..errors import GhostprojError
from ..progress import RateProgress
from ..scoring.fisher import compute_fisher
from ..scoring.result_files import write_scores, write_selection, write_topk
from ..scoring.score import ScoreResult, score
from ..store.files import atomic_write
from ..store.outputs import check_outputs
from ..store.reader import open_run
from ..store.shards import encode_safetensors


def _fisher_files(fisher: str | list[str] | None) -> list[str]:
    return [] if fisher is None else [fisher] if isinstance(fisher, str) else list(fisher)


@dataclass
class ScoreOptions:
    """Options of ``ghostproj score``: TRAIN QUERY run pairs (one per checkpoint of an
    ensemble) and how to score, keep and write their scores."""

    runs: list[str] = field(default_factory=list)
    metric: str = defaults.METRIC
    normalize: str = defaults.NORMALIZE
    center: bool = False
    damping: float = defaults.DAMPING
    layers: list[str] | None = None
    top_k: int = 10
    reduce: str | None = None
    group_field: str | None = None
    out: str | None = None
    topk_out: str | None = None
    select_out: str | None = None
    overwrite: bool = False
    chunk_rows: int | None = None
    device: str = "auto"
    fisher: str | list[str] | None = None  # one file, or one per checkpoint (comma-separated on the command line)
    num_parts: int = 1
    part: int = 0
    part_out: str | None = None
    keep_matrix: bool = False

    def __post_init__(self):
        if len(self.runs) < 2 or len(self.runs) % 2:
            raise GhostprojError("score takes TRAIN QUERY pairs: an even number of run paths.")
        if self.num_parts < 1:
            raise GhostprojError(f"--num-parts must be at least 1, got {self.num_parts}.")
        if self.num_parts == 1 and (self.part != 0 or self.part_out is not None):
            raise GhostprojError("--part and --part-out split the scoring into parts: give --num-parts 2 or more.")
        if isinstance(self.fisher, str) and len(self.runs) > 2:
            self.fisher = [f.strip() for f in self.fisher.split(",") if f.strip()]

    @property
    def train(self) -> str | list[str]:
        return self.runs[0] if len(self.runs) == 2 else self.runs[0::2]

    @property
    def query(self) -> str | list[str]:
        return self.runs[1] if len(self.runs) == 2 else self.runs[1::2]


# What a part's file records of how it was scored: parts merge only when these agree.
PART_SETTINGS = ("metric", "normalize", "center", "damping", "layers", "top_k", "reduce")


def run_score_command(opts: ScoreOptions, report=None, log=None) -> ScoreResult:
    """``report(train_run, query_run, result)`` shows a finished result (rank 0 only);
    ``log(message)`` takes the status lines."""
    log = log or (lambda message: None)
    train, query, metric, normalize, center = opts.train, opts.query, opts.metric, opts.normalize, opts.center
    damping, layers, top_k, reduce, group_field = opts.damping, opts.layers, opts.top_k, opts.reduce, opts.group_field
    out, topk_out, select_out, overwrite, fisher = opts.out, opts.topk_out, opts.select_out, opts.overwrite, opts.fisher
    chunk_rows, device, part_out, keep_matrix = opts.chunk_rows, opts.device, opts.part_out, opts.keep_matrix
    parts = (opts.part, opts.num_parts) if opts.num_parts > 1 else None
    trains = list(train) if isinstance(train, (list, tuple)) else [train]
    queries = list(query) if isinstance(query, (list, tuple)) else [query]
    ranks = _torchrun_ranks()
    if ranks is not None and parts is not None:
        raise GhostprojError("Under torchrun each rank scores its own part; drop --num-parts and --part.")
    if ranks is None or ranks[0] == 0:
        check_outputs([(out, "--out"), (topk_out, "--topk-out"), (select_out, "--select-out")],
                      trains + queries + _fisher_files(fisher), overwrite)
    if select_out and not reduce:
        raise GhostprojError("--select-out needs --reduce mean or --reduce max.")
    if group_field and reduce != "max":
        raise GhostprojError("--group-field only applies with --reduce max.")
    if fisher and not metric.startswith("influence"):
        raise GhostprojError("--fisher only applies to --metric influence and influence-full.")
    if parts is not None:
        if part_out is None or out or topk_out or select_out:
            raise GhostprojError("A part (--num-parts/--part) writes --part-out FILE only; `ghostproj merge-scores` "
                                 "writes --out, --topk-out and --select-out from all the parts.")
        check_outputs([(part_out, "--part-out")], trains + queries + _fisher_files(fisher), overwrite)
    train_runs, query_runs = [open_run(t) for t in trains], [open_run(q) for q in queries]
    train_run, query_run = train_runs[0], query_runs[0]
    groups = _groups(query_run, group_field) if group_field else None
    settings = dict(metric=metric, normalize=normalize, center=center, damping=damping, layers=layers, top_k=top_k,
                    reduce=reduce, query_groups=groups, chunk_rows=chunk_rows, fisher=fisher)
    if ranks is not None:
        return _score_under_torchrun(train_runs, query_runs, ranks, dict(
            settings, keep_matrix=out is not None, device=device_for_this_process(device)),
            (out, topk_out, select_out), (train, query), group_field, report, log)
    with RateProgress("scoring", total=train_run.rows, unit="rows", extra_unit=None, lazy=True) as bar:
        result = score(train_runs, query_runs, keep_matrix=out is not None or keep_matrix, progress=bar, part=parts,
                       device=device, **settings)
    for note in result.notes:
        log(f"[yellow]note:[/yellow] {note}")
    if parts is not None:
        _write_own_part(part_out, result, parts, train_runs, query_runs, group_field,
                        **{k: settings[k] for k in PART_SETTINGS})
        log(f"[green]scored[/green] part {parts[0]} of {parts[1]} ({result.train_index.numel()} x "
                     f"{query_run.rows}); wrote {part_out}")
        return result
    _write_and_show(result, (out, topk_out, select_out), train_run, query_run, report)
    log(f"[green]scored[/green] {train_run.rows} x {query_run.rows} ({metric}) in {result.seconds:.1f} s"
                 + "".join(f"; wrote {p}" for p in (out, topk_out, select_out) if p))
    return result


def _write_and_show(result: ScoreResult, outputs: tuple, train_run, query_run, report) -> None:
    out, topk_out, select_out = outputs
    if out:
        write_scores(out, result)
    if topk_out:
        write_topk(topk_out, result)
    if select_out:
        write_selection(select_out, result)
    if report is not None:
        report(train_run, query_run, result)


def _write_own_part(path: str, result: ScoreResult, part: tuple[int, int], train_runs: list, query_runs: list,
                    group_field: str | None, **options) -> None:
    """A part's file; its settings name every checkpoint's runs, so only parts of the same
    score merge."""
    settings = dict(options, group_field=group_field,
                    train=",".join(r.manifest.fingerprint for r in train_runs),
                    query=",".join(r.manifest.fingerprint for r in query_runs), shards=len(train_runs[0].shards))
    write_part(path, result, part, [h.tensors["index"][1][0] for h in train_runs[0].part(*part).shards], settings)


def _torchrun_ranks() -> tuple[int, int] | None:
    """(rank, world size) when torchrun started this process with more than one rank."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return None
    # barriers and the Fisher's all-reduce are a few small host tensors: gloo, wherever the products run
    return distributed_rank(torch.device("cpu"))


def _score_under_torchrun(train_runs: list, query_runs: list, ranks: tuple[int, int], options: dict, outputs: tuple,
                          inputs: tuple, group_field: str | None, report, log) -> ScoreResult:
    """Each rank scores shards rank, rank + K, ... and writes its part beside the first
    output; rank 0 merges the parts into exactly the single-process answer and writes the
    outputs. Influence without --fisher gets the whole run's Fisher by an all-reduce of
    the ranks' sums, so every part uses the same one."""
    import torch.distributed as td

    rank, world = ranks
    if options["center"]:
        raise GhostprojError("--center is not supported under torchrun (each rank sees only its part).")
    if options["metric"].startswith("influence") and options["fisher"] is None:
        fishers = [_all_reduced_fisher(run, options, rank, world) for run in train_runs]
        options["fisher"] = fishers if len(fishers) > 1 else fishers[0]
    train_run, query_run = train_runs[0], query_runs[0]
    first = next((Path(p) for p in outputs if p), Path("score"))

    def part_file(r: int) -> Path:
        return first.parent / f".{first.name}.part-{r:03d}-of-{world:03d}.safetensors"

    result = score(train_runs, query_runs, part=(rank, world), **options)
    settings = {k: options[k] for k in PART_SETTINGS}
    _write_own_part(str(part_file(rank)), result, (rank, world), train_runs, query_runs, group_field, **settings)
    td.barrier()
    if rank == 0:
        for note in result.notes:
            log(f"[yellow]note:[/yellow] {note}")
        try:
            result = merge_parts([str(part_file(r)) for r in range(world)])
        finally:
            for r in range(world):
                part_file(r).unlink(missing_ok=True)
        _write_and_show(result, outputs, train_run, query_run, report)
        log(f"[green]scored[/green] {train_run.rows} x {query_run.rows} ({options['metric']}) in {world} "
                     f"ranks" + "".join(f"; wrote {p}" for p in outputs if p))
    td.barrier()
    return result


def _all_reduced_fisher(train_run, options: dict, rank: int, world: int):
    import torch.distributed as td

    from ..models import resolve_device
    from ..scoring.influence import FisherSums

    mine = compute_fisher(train_run, layers=options["layers"], normalize=options["normalize"] or "none",
                          full=options["metric"] == "influence-full", part=(rank, world),
                          chunk_rows=options["chunk_rows"], device=resolve_device(options["device"]))
    for s in mine.sums:
        td.all_reduce(s)
    count = torch.tensor([mine.count], dtype=torch.int64)
    td.all_reduce(count)
    return FisherSums(mine.sums, int(count), mine.full, mine.normalize, mine.layers, mine.fingerprint)


def _groups(query_run, group_field: str) -> list[str]:
    """The ``group_field`` value of every query row, read from the query run's data."""
    query_records, why = records_for_run(query_run.manifest.data)
    if query_records is None:
        raise GhostprojError(f"--group-field needs the query data, but {why}.")
    groups = [record_field(query_records, i, group_field) for i in query_run.read_column("index").tolist()]
    if any(g is None for g in groups):
        raise GhostprojError(f"Some query rows have no field '{group_field}'.")
    return [str(g) for g in groups]


def write_part(path: str, result: ScoreResult, part: tuple[int, int], shard_rows: list[int], settings: dict) -> None:
    """One part's rows (dataset indices, selection, scores) with its shards' row counts, and
    its best k per query: what `merge-scores` needs to rebuild the single-process answer."""
    tensors = {"train_index": result.train_index, "query_index": result.query_index,
               "shard_rows": torch.tensor(shard_rows, dtype=torch.int64)}
    for name in ("topk_scores", "topk_train", "selection", "scores"):
        if getattr(result, name) is not None:
            tensors[name] = getattr(result, name)
    meta = {"kind": "ghostproj-score-part", "part": f"{part[0]}/{part[1]}", "settings": json.dumps(settings),
            "groups": json.dumps(result.group_names)}
    atomic_write(Path(path), encode_safetensors(tensors, meta))


def merge_parts(paths: list[str]) -> ScoreResult:
    """The single-process answer from the K parts' files: rows in the single process's order
    (shard j is part j mod K's), top-k merged with the same tie rule."""
    from safetensors import safe_open

    from ..scoring.topk import StreamingTopK

    loaded = []
    for path in paths:
        try:
            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
                tensors = {k: f.get_tensor(k) for k in f.keys()}
        except Exception as exc:
            raise GhostprojError(f"Cannot read the part file {path} ({str(exc).splitlines()[0] if str(exc) else type(exc).__name__}).") from None
        if meta.get("kind") != "ghostproj-score-part":
            raise GhostprojError(f"{path} is not a part written by `score --num-parts ... --part-out`.")
        i, k = (int(v) for v in meta["part"].split("/"))
        loaded.append((i, k, meta, tensors))
    k = loaded[0][1]
    if sorted(i for i, *_ in loaded) != list(range(k)) or any(kk != k for _, kk, *_ in loaded):
        raise GhostprojError(f"merge-scores needs each of the {k} parts exactly once; got parts "
                             f"{sorted(i for i, *_ in loaded)}.")
    if len({m["settings"] for _, _, m, _ in loaded}) != 1:
        raise GhostprojError("The parts were scored with different runs or settings; they cannot be merged.")
    loaded.sort(key=lambda entry: entry[0])
    settings = json.loads(loaded[0][2]["settings"])
    offsets = [torch.cat([torch.zeros(1, dtype=torch.int64), t["shard_rows"].cumsum(0)]) for *_, t in loaded]
    spans = [(j % k, j // k) for j in range(settings["shards"])]

    def rows(name):
        if name not in loaded[0][3]:
            return None
        return torch.cat([loaded[p][3][name][offsets[p][s]:offsets[p][s + 1]] for p, s in spans])

    topk_scores = topk_train = None
    with_topk = [t for *_, t in loaded if "topk_scores" in t]  # a part with no shard has no top-k
    if with_topk:
        best = StreamingTopK(settings["top_k"])
        for t in with_topk:
            best.merge(t["topk_scores"], t["topk_train"])
        topk_scores, topk_train = best.result()
    return ScoreResult(rows("train_index"), loaded[0][3]["query_index"], rows("scores"), topk_scores, topk_train,
                       rows("selection"), json.loads(loaded[0][2]["groups"]))


@dataclass
class MergeScoresOptions:
    """Options of ``ghostproj merge-scores``: every part's --part-out file and what to write."""

    parts: list[str] = field(default_factory=list)
    out: str | None = None
    topk_out: str | None = None
    select_out: str | None = None
    overwrite: bool = False

    def __post_init__(self):
        if not (self.out or self.topk_out or self.select_out):
            raise GhostprojError("merge-scores writes nothing without --out, --topk-out or --select-out; name at "
                                 "least one.")


def run_merge_scores(opts: MergeScoresOptions) -> ScoreResult:
    parts, out, topk_out, select_out, overwrite = opts.parts, opts.out, opts.topk_out, opts.select_out, opts.overwrite
    check_outputs([(out, "--out"), (topk_out, "--topk-out"), (select_out, "--select-out")], parts, overwrite)
    result = merge_parts(parts)
    for path, what, writer in ((out, "scores", write_scores), (topk_out, "topk_scores", write_topk),
                               (select_out, "selection", write_selection)):
        if path:
            if getattr(result, what) is None:
                raise GhostprojError(f"The parts hold no {what.replace('_', ' ')}; score them with the options "
                                     "that produce it.")
            writer(path, result)
    return result
