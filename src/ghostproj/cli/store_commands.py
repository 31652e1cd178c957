"""The commands that read runs: score, merge-scores, fisher, inspect and the index.
Each parses its arguments, runs its job and hands the result to :mod:`render`."""

from __future__ import annotations

import typer

from ..jobs.fisher import FisherOptions
from ..jobs.index import IndexBuildOptions, IndexQueryOptions
from ..jobs.inspect import InspectOptions
from ..jobs.score import MergeScoresOptions, ScoreOptions
from .app import app, console_err, markup_safe
from .options import options_signature, split_list
from .render import (
    report_fisher,
    report_index_build,
    report_index_query,
    report_merged_scores,
    report_run,
    score_reporter,
)
from .store_options import (
    FISHER_EXTRA,
    FISHER_OPTIONS,
    INDEX_BUILD_EXTRA,
    INDEX_BUILD_OPTIONS,
    INDEX_QUERY_EXTRA,
    INDEX_QUERY_OPTIONS,
    INSPECT_EXTRA,
    INSPECT_OPTIONS,
    MERGE_SCORES_EXTRA,
    MERGE_SCORES_OPTIONS,
    SCORE_EXTRA,
    SCORE_OPTIONS,
)


def score(**options) -> None:
    """Score training examples against query examples (similarity or influence)."""
    from ..jobs.score import run_score_command

    show = options.pop("show")
    options["layers"] = split_list(options["layers"])
    opts = ScoreOptions(**options)
    run_score_command(opts, report=score_reporter(opts.metric, opts.reduce, show) if show > 0 else None,
                      log=console_err().print)


score.__signature__ = options_signature(ScoreOptions, SCORE_OPTIONS, extra=SCORE_EXTRA)
app.command()(score)


def merge_scores(**options) -> None:
    """Join the parts of a score run in separate processes into exactly the single-process answer."""
    from ..jobs.score import run_merge_scores

    opts = MergeScoresOptions(**options)
    report_merged_scores(opts, run_merge_scores(opts))


merge_scores.__signature__ = options_signature(MergeScoresOptions, MERGE_SCORES_OPTIONS, extra=MERGE_SCORES_EXTRA)
app.command("merge-scores")(merge_scores)


def fisher(**options) -> None:
    """The training vectors' Fisher for influence, computed once (or in parts) for score --fisher."""
    from ..jobs.fisher import run_fisher

    options["layers"] = split_list(options["layers"])
    opts = FisherOptions(**options)
    result = run_fisher(opts)
    report_fisher(opts, result)


fisher.__signature__ = options_signature(FisherOptions, FISHER_OPTIONS, extra=FISHER_EXTRA)
app.command()(fisher)


INCOMPLETE_EXIT = 3  # `inspect` of a run that is not finished: scripts can gate on it


def inspect_run(**options) -> None:
    """Show a run and verify its shards (or merge job-array parts into one run).

    Exits 0 for a complete, verified run, 3 for an unfinished one and 2 for a damaged one."""
    from ..jobs.inspect import run_inspect

    opts = InspectOptions(**options)
    report = run_inspect(opts)
    if opts.merge:
        console_err().print(f"merged {len(opts.run_dirs) - 1} parts into {markup_safe(opts.run_dirs[0])}")
    if not report_run(opts.run_dirs[0], report, hash_shards=not opts.quick):
        raise typer.Exit(INCOMPLETE_EXIT)


inspect_run.__signature__ = options_signature(InspectOptions, INSPECT_OPTIONS, extra=INSPECT_EXTRA)
app.command("inspect")(inspect_run)


index_app = typer.Typer(no_args_is_help=True, help="An approximate top-k index for very large training runs "
                        "(needs the \\[index] extra: pip install 'ghostproj\\[index]').")


app.add_typer(index_app, name="index")


def index_build(**options) -> None:
    """Index a training run for approximate top-k (same transform as score)."""
    from ..jobs.index import run_index_build

    options["layers"] = split_list(options["layers"])
    opts = IndexBuildOptions(**options)
    status = console_err()
    built, size, recall = run_index_build(opts, log=lambda m: status.print(f"[dim]{markup_safe(m)}[/dim]"))
    report_index_build(built, size, recall, opts.out)


def index_query(**options) -> None:
    """Top-k training examples per query from an index: the same JSONL as score --topk-out."""
    from ..jobs.index import run_index_query

    show = options.pop("show")
    opts = IndexQueryOptions(**options)
    report_index_query(run_index_query(opts), show, opts.topk_out)


index_build.__signature__ = options_signature(IndexBuildOptions, INDEX_BUILD_OPTIONS, extra=INDEX_BUILD_EXTRA)
index_query.__signature__ = options_signature(IndexQueryOptions, INDEX_QUERY_OPTIONS, extra=INDEX_QUERY_EXTRA)
index_app.command("build")(index_build)
index_app.command("query")(index_query)
