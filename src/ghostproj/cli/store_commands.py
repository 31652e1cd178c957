"""The commands that read runs: score, merge-scores, fisher, inspect and the index.
Each parses its arguments, runs its job and hands the result to :mod:`render`."""

from __future__ import annotations

from typing import Optional

import typer

from .. import defaults
from ..errors import GhostprojError
from .app import OUTPUT, RUN, SCORING, app, console_err, markup_safe
from .options import ChunkRowsOpt, OverwriteOpt, ScoreDeviceOpt, SelectOutOpt, TopkOutOpt, split_list
from .render import report_index_build, report_index_query, report_run, score_reporter


@app.command()
def score(
    runs: list[str] = typer.Argument(
        ..., metavar="TRAIN QUERY [TRAIN QUERY]...",
        help="Training run and query run (directories or shard files; the query projected with --like TRAIN). "
             "Several pairs, one per checkpoint of a fine-tuning run (each projected with its own --seed), give the "
             "sum of their scores."),
    metric: str = typer.Option(defaults.METRIC, help="influence (damped per-layer Fisher; best LDS measured), cosine, dot "
                               "or influence-full.", rich_help_panel=SCORING),
    normalize: str = typer.Option(
        defaults.NORMALIZE, help="none, unit or layer. layer (unit norm per layer, then combined) ranked best on real data.",
        rich_help_panel=SCORING),
    center: bool = typer.Option(False, "--center/--no-center", help="Subtract the training mean vector first.",
                                rich_help_panel=SCORING),
    damping: float = typer.Option(defaults.DAMPING, help="Influence damping: lambda_l = damping * mean diag F_l.",
                                  rich_help_panel=SCORING),
    layers: Optional[str] = typer.Option(None, "--layers", help="Score only these projected layers (patterns).",
                                         rich_help_panel=SCORING, show_default="all"),
    top_k: int = typer.Option(10, help="Best training examples kept per query.", rich_help_panel=SCORING),
    reduce: Optional[str] = typer.Option(None, help="One score per training example: mean or max.",
                                         rich_help_panel=SCORING, show_default="none"),
    group_field: Optional[str] = typer.Option(None, help="Query data field grouping queries for --reduce max.",
                                              rich_help_panel=SCORING, show_default="none"),
    show: int = typer.Option(3, help="Queries whose top-k table is printed (0: none).", rich_help_panel=OUTPUT),
    out: Optional[str] = typer.Option(None, help="Write the full scores matrix (safetensors).",
                                      rich_help_panel=OUTPUT, show_default="not written"),
    topk_out: TopkOutOpt = None,
    select_out: SelectOutOpt = None,
    overwrite: OverwriteOpt = False,
    chunk_rows: ChunkRowsOpt = None,
    device: ScoreDeviceOpt = "auto",
    fisher_file: Optional[str] = typer.Option(None, "--fisher", help="Influence: the Fisher `ghostproj fisher` wrote "
                                              "(one per checkpoint, comma-separated, for several pairs).",
                                              rich_help_panel=SCORING, show_default="computed from TRAIN"),
    num_parts: int = typer.Option(1, help="Score the training shards in this many processes...", rich_help_panel=RUN),
    part: int = typer.Option(0, help="...this one (then merge-scores the --part-out files).", rich_help_panel=RUN),
    part_out: Optional[str] = typer.Option(None, help="A part's file, for merge-scores.", rich_help_panel=OUTPUT,
                                           show_default="required with --num-parts"),
    keep_matrix: bool = typer.Option(False, "--keep-matrix", help="A part keeps its rows of the scores matrix.",
                                     rich_help_panel=OUTPUT),
) -> None:
    """Score training examples against query examples (similarity or influence)."""
    from ..jobs.score import run_score_command

    if len(runs) % 2:
        raise GhostprojError("score takes TRAIN QUERY pairs: an even number of run paths.")
    train, query = (runs[0], runs[1]) if len(runs) == 2 else (runs[0::2], runs[1::2])
    if num_parts < 1:
        raise GhostprojError(f"--num-parts must be at least 1, got {num_parts}.")
    if num_parts == 1 and (part != 0 or part_out is not None):
        raise GhostprojError("--part and --part-out split the scoring into parts: give --num-parts 2 or more.")
    if fisher_file is not None and len(runs) > 2:
        fisher_file = split_list(fisher_file)  # one per checkpoint, comma-separated
    run_score_command(
        train, query, metric=metric, normalize=normalize, center=center, damping=damping, layers=split_list(layers),
        top_k=top_k, out=out, topk_out=topk_out, reduce=reduce, group_field=group_field, select_out=select_out,
        chunk_rows=chunk_rows, overwrite=overwrite, log=console_err().print,
        report=score_reporter(metric, reduce, show) if show > 0 else None,
        fisher=fisher_file, parts=(part, num_parts) if num_parts > 1 else None, part_out=part_out,
        keep_matrix=keep_matrix, device=device,
    )


@app.command("merge-scores")
def merge_scores(
    parts: list[str] = typer.Argument(..., help="The --part-out files of all the parts."),
    out: Optional[str] = typer.Option(None, help="Write the full scores matrix (parts scored with --keep-matrix).",
                                      rich_help_panel=OUTPUT, show_default="not written"),
    topk_out: TopkOutOpt = None,
    select_out: SelectOutOpt = None,
    overwrite: OverwriteOpt = False,
) -> None:
    """Join the parts of a score run in separate processes into exactly the single-process answer."""
    from ..jobs.score import run_merge_scores

    result = run_merge_scores(parts, out=out, topk_out=topk_out, select_out=select_out, overwrite=overwrite)
    console_err().print(f"merged {len(parts)} parts ({result.train_index.numel()} training rows)"
                    + "".join(f"; wrote {markup_safe(p)}" for p in (out, topk_out, select_out) if p))


@app.command()
def fisher(
    paths: list[str] = typer.Argument(..., help="TRAIN run; with --merge: OUT then the part files."),
    out: Optional[str] = typer.Option(None, help="The Fisher file to write (safetensors).", rich_help_panel=OUTPUT,
                                      show_default="required without --merge"),
    layers: Optional[str] = typer.Option(None, "--layers", help="Only these projected layers (patterns), as score.",
                                         rich_help_panel=SCORING, show_default="all"),
    normalize: str = typer.Option(defaults.NORMALIZE, help="none, unit or layer: as the score that will use it.",
                                  rich_help_panel=SCORING),
    full: bool = typer.Option(False, "--full", help="One D x D block, for influence-full.", rich_help_panel=SCORING),
    num_parts: int = typer.Option(1, help="Split the training shards into this many parts.", rich_help_panel=RUN),
    part: int = typer.Option(0, help="The part to sum (then fisher --merge).", rich_help_panel=RUN),
    merge: bool = typer.Option(False, "--merge", help="Sum the K part files into OUT.", rich_help_panel=RUN),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing output file.",
                                   rich_help_panel=OUTPUT),
    chunk_rows: ChunkRowsOpt = None,
    device: ScoreDeviceOpt = "auto",
) -> None:
    """The training vectors' Fisher for influence, computed once (or in parts) for score --fisher."""
    from ..jobs.fisher import run_fisher, run_fisher_merge

    if merge:
        if len(paths) < 2:
            raise GhostprojError("--merge needs OUT followed by the part files.")
        result = run_fisher_merge(paths[0], paths[1:], overwrite)
        console_err().print(f"merged {len(paths) - 1} parts ({result.count} rows) into {markup_safe(paths[0])}")
        return
    if len(paths) != 1 or out is None:
        raise GhostprojError("fisher takes one training run and --out FILE (or --merge OUT PART...).")
    result = run_fisher(paths[0], out, layers=split_list(layers), normalize=normalize, full=full, num_parts=num_parts,
                        part=part, chunk_rows=chunk_rows, overwrite=overwrite, device=device)
    what = f"part {part} of {num_parts}, " if num_parts > 1 else ""
    console_err().print(f"[green]wrote[/green] {markup_safe(out)}: {what}{result.count} rows, {len(result.sums)} block(s)")


INCOMPLETE_EXIT = 3  # `inspect` of a run that is not finished: scripts can gate on it


@app.command("inspect")
def inspect_run(
    run_dirs: list[str] = typer.Argument(..., help="Run directory; with --merge: OUT then the part directories."),
    quick: bool = typer.Option(False, "--quick", help="Skip hashing the shards."),
    merge: bool = typer.Option(False, "--merge", help="Join the runs of --num-shards/--shard-id jobs into OUT."),
) -> None:
    """Show a run and verify its shards (or merge job-array parts into one run).

    Exits 0 for a complete, verified run, 3 for an unfinished one and 2 for a damaged one."""
    from ..store.reader import verify_run

    if merge:
        from ..store.merge import merge_runs

        if len(run_dirs) < 2:
            raise GhostprojError("--merge needs OUT followed by the part directories.")
        merge_runs(run_dirs[0], run_dirs[1:])
        console_err().print(f"merged {len(run_dirs) - 1} parts into {markup_safe(run_dirs[0])}")
    elif len(run_dirs) != 1:
        raise GhostprojError("inspect takes one run directory (or --merge OUT PART...).")
    complete = report_run(run_dirs[0], verify_run(run_dirs[0], hash_shards=not quick), hash_shards=not quick)
    if not complete:
        raise typer.Exit(INCOMPLETE_EXIT)


index_app = typer.Typer(no_args_is_help=True, help="An approximate top-k index for very large training runs "
                        "(needs the \\[index] extra: pip install 'ghostproj\\[index]').")


app.add_typer(index_app, name="index")


@index_app.command("build")
def index_build(
    train: str = typer.Argument(..., help="Training run directory."),
    out: str = typer.Option(..., help="Directory for the index.", rich_help_panel=OUTPUT),
    metric: str = typer.Option(defaults.METRIC, help="influence, cosine or dot, as score.", rich_help_panel=SCORING),
    normalize: str = typer.Option(defaults.NORMALIZE, help="none, unit or layer, as score.", rich_help_panel=SCORING),
    center: bool = typer.Option(False, "--center/--no-center", help="Subtract the training mean vector first.",
                                rich_help_panel=SCORING),
    damping: float = typer.Option(defaults.DAMPING, help="Influence damping, as score.", rich_help_panel=SCORING),
    layers: Optional[str] = typer.Option(None, "--layers", help="Index only these projected layers (patterns).",
                                         rich_help_panel=SCORING, show_default="all"),
    fisher_file: Optional[str] = typer.Option(None, "--fisher", help="Influence: the Fisher `ghostproj fisher` wrote.",
                                              rich_help_panel=SCORING, show_default="computed from TRAIN"),
    factory: Optional[str] = typer.Option(None, help="Flat (exact), Scan or Scan<d> (d head directions), or a FAISS "
                                          "factory string such as IVF1024,SQ6 (needs the index extra).",
                                          rich_help_panel=SCORING,
                                          show_default="Flat below 100,000 rows, else Scan"),
    nprobe: Optional[int] = typer.Option(None, help="FAISS IVF lists searched per query (recall against speed).",
                                         rich_help_panel=SCORING, show_default="nlist / 16"),
    candidates: Optional[int] = typer.Option(None, help="Scan: rows per query re-ranked with the full codes "
                                             "(recall against speed).", rich_help_panel=SCORING, show_default=str(defaults.RANK)),
    check: int = typer.Option(100, help="Measure recall@k against exact scoring on this many sampled queries "
                                         "(0: skip).", rich_help_panel=RUN),
    check_query: Optional[str] = typer.Option(None, help="A query run to draw the --check queries from.",
                                              rich_help_panel=RUN, show_default="training rows, each without itself"),
    top_k: int = typer.Option(10, help="The k of the --check recall.", rich_help_panel=RUN),
    device: ScoreDeviceOpt = "auto",
    overwrite: OverwriteOpt = False,
) -> None:
    """Index a training run for approximate top-k (same transform as score)."""
    from ..jobs.index import run_index_build
    from ..scoring.index import IndexSettings

    settings = IndexSettings(metric=metric, normalize=normalize, center=center, damping=damping, layers=split_list(layers),
                             factory=factory or "", nprobe=nprobe, candidates=candidates)
    status = console_err()
    built, size, recall = run_index_build(train, out, settings, fisher=fisher_file, check=check,
                                          check_query=check_query, check_k=top_k, device=device,
                                          overwrite=overwrite, log=lambda m: status.print(f"[dim]{markup_safe(m)}[/dim]"))
    report_index_build(built, size, recall, out)


@index_app.command("query")
def index_query(
    index_dir: str = typer.Argument(..., help="Index directory (from index build)."),
    query: str = typer.Argument(..., help="Query run directory (projected with --like TRAIN)."),
    top_k: int = typer.Option(10, help="Best training examples per query.", rich_help_panel=SCORING),
    nprobe: Optional[int] = typer.Option(None, help="FAISS IVF lists searched per query.", rich_help_panel=SCORING,
                                         show_default="as built"),
    candidates: Optional[int] = typer.Option(None, help="Scan: rows per query re-ranked with the full codes.",
                                             rich_help_panel=SCORING, show_default="as built"),
    topk_out: TopkOutOpt = None,
    show: int = typer.Option(3, help="Queries whose matches are printed (0: none).", rich_help_panel=OUTPUT),
    device: ScoreDeviceOpt = "auto",
    overwrite: OverwriteOpt = False,
) -> None:
    """Top-k training examples per query from an index: the same JSONL as score --topk-out."""
    from ..jobs.index import run_index_query

    result = run_index_query(index_dir, query, top_k=top_k, topk_out=topk_out, nprobe=nprobe, device=device,
                             overwrite=overwrite, candidates=candidates)
    report_index_query(result, show, topk_out)
