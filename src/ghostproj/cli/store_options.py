"""The options of the commands that read runs (score, merge-scores, fisher, inspect and the
index), declared once: the flags, help and panel of each of their options dataclasses'
fields."""

from __future__ import annotations

from typing import Optional

import typer

from ..scoring.scan_index import DEFAULT_CANDIDATES
from .app import OUTPUT, RUN, SCORING
from .options import (
    ChunkRowsOpt,
    OverwriteOpt,
    ScoreDeviceOpt,
    SelectOutOpt,
    TopkOutOpt,
    argument,
    extra_option,
    info,
    opt,
)

# `score`'s options: names, types and defaults are ScoreOptions' fields.
SCORE_OPTIONS = {
    "metric": opt(help="influence (damped per-layer Fisher; best LDS measured), cosine, dot or influence-full.",
                  panel=SCORING),
    "normalize": opt(help="none, unit or layer. layer (unit norm per layer, then combined) ranked best on real data.",
                     panel=SCORING),
    "center": opt("--center/--no-center", help="Subtract the training mean vector first.", panel=SCORING),
    "damping": opt(help="Influence damping: lambda_l = damping * mean diag F_l.", panel=SCORING),
    "layers": (opt("--layers", help="Score only these projected layers (patterns).", panel=SCORING, default="all"),
               Optional[str]),
    "top_k": opt(help="Best training examples kept per query.", panel=SCORING),
    "reduce": opt(help="One score per training example: mean or max.", panel=SCORING, default="none"),
    "group_field": opt(help="Query data field grouping queries for --reduce max.", panel=SCORING, default="none"),
    "out": opt(help="Write the full scores matrix (safetensors).", panel=OUTPUT, default="not written"),
    "topk_out": info(TopkOutOpt),
    "select_out": info(SelectOutOpt),
    "overwrite": info(OverwriteOpt),
    "chunk_rows": info(ChunkRowsOpt),
    "device": info(ScoreDeviceOpt),
    "fisher": (opt("--fisher", help="Influence: the Fisher `ghostproj fisher` wrote (one per checkpoint, "
                   "comma-separated, for several pairs).", panel=SCORING, default="computed from TRAIN"), Optional[str]),
    "num_parts": opt(help="Score the training shards in this many processes...", panel=RUN),
    "part": opt(help="...this one (then merge-scores the --part-out files).", panel=RUN),
    "part_out": opt(help="A part's file, for merge-scores.", panel=OUTPUT, default="required with --num-parts"),
    "keep_matrix": opt("--keep-matrix", help="A part keeps its rows of the scores matrix.", panel=OUTPUT),
}
SCORE_EXTRA = (
    argument("runs", "Training run and query run (directories or shard files; the query projected with --like TRAIN). "
             "Several pairs, one per checkpoint of a fine-tuning run (each projected with its own --seed), give the "
             "sum of their scores.", metavar="TRAIN QUERY [TRAIN QUERY]..."),
    extra_option("show", 3, int, help="Queries whose top-k table is printed (0: none).", panel=OUTPUT),
)


FISHER_OPTIONS = {
    "out": opt(help="The Fisher file to write (safetensors).", panel=OUTPUT, default="required without --merge"),
    "layers": (opt("--layers", help="Only these projected layers (patterns), as score.", panel=SCORING,
                   default="all"), Optional[str]),
    "normalize": opt(help="none, unit or layer: as the score that will use it.", panel=SCORING),
    "full": opt("--full", help="One D x D block, for influence-full.", panel=SCORING),
    "num_parts": opt(help="Split the training shards into this many parts.", panel=RUN),
    "part": opt(help="The part to sum (then fisher --merge).", panel=RUN),
    "merge": opt("--merge", help="Sum the K part files into OUT.", panel=RUN),
    "overwrite": opt("--overwrite", help="Replace an existing output file.", panel=OUTPUT),
    "chunk_rows": info(ChunkRowsOpt),
    "device": info(ScoreDeviceOpt),
}
FISHER_EXTRA = (
    argument("paths", "TRAIN run; with --merge: OUT then the part files."),
)


INDEX_BUILD_OPTIONS = {
    "out": opt(help="Directory for the index.", panel=OUTPUT),
    "metric": opt(help="influence, cosine or dot, as score.", panel=SCORING),
    "normalize": opt(help="none, unit or layer, as score.", panel=SCORING),
    "center": opt("--center/--no-center", help="Subtract the training mean vector first.", panel=SCORING),
    "damping": opt(help="Influence damping, as score.", panel=SCORING),
    "layers": (opt("--layers", help="Index only these projected layers (patterns).", panel=SCORING, default="all"),
               Optional[str]),
    "fisher": opt("--fisher", help="Influence: the Fisher `ghostproj fisher` wrote.", panel=SCORING,
                  default="computed from TRAIN"),
    "factory": opt(help="Flat (exact), Scan or Scan<d> (d head directions), or a FAISS factory string such as "
                   "IVF1024,SQ6 (needs the index extra).", panel=SCORING, default="Flat below 100,000 rows, else Scan"),
    "nprobe": opt(help="FAISS IVF lists searched per query (recall against speed).", panel=SCORING,
                  default="nlist / 16"),
    "candidates": opt(help="Scan: rows per query re-ranked with the full codes (recall against speed).",
                      panel=SCORING, default=str(DEFAULT_CANDIDATES)),
    "check": opt(help="Measure recall@k against exact scoring on this many sampled queries (0: skip).", panel=RUN),
    "check_query": opt(help="A query run to draw the --check queries from.", panel=RUN,
                       default="training rows, each without itself"),
    "top_k": opt(help="The k of the --check recall.", panel=RUN),
    "device": info(ScoreDeviceOpt),
    "overwrite": info(OverwriteOpt),
}
INDEX_BUILD_EXTRA = (
    argument("train", "Training run directory.", str),
)
INDEX_QUERY_OPTIONS = {
    "top_k": opt(help="Best training examples per query.", panel=SCORING),
    "nprobe": opt(help="FAISS IVF lists searched per query.", panel=SCORING, default="as built"),
    "candidates": opt(help="Scan: rows per query re-ranked with the full codes.", panel=SCORING, default="as built"),
    "topk_out": info(TopkOutOpt),
    "device": info(ScoreDeviceOpt),
    "overwrite": info(OverwriteOpt),
}
INDEX_QUERY_EXTRA = (
    argument("index_dir", "Index directory (from index build).", str),
    argument("query", "Query run directory (projected with --like TRAIN).", str),
    extra_option("show", 3, int, help="Queries whose matches are printed (0: none).", panel=OUTPUT),
)

MERGE_SCORES_OPTIONS = {
    "out": opt(help="Write the full scores matrix (parts scored with --keep-matrix).", panel=OUTPUT,
               default="not written"),
    "topk_out": info(TopkOutOpt),
    "select_out": info(SelectOutOpt),
    "overwrite": info(OverwriteOpt),
}
MERGE_SCORES_EXTRA = (
    argument("parts", "The --part-out files of all the parts."),
)
INSPECT_OPTIONS = {
    "quick": typer.Option("--quick", help="Skip hashing the shards."),
    "merge": typer.Option("--merge", help="Join the runs of --num-shards/--shard-id jobs into OUT."),
}
INSPECT_EXTRA = (
    argument("run_dirs", "Run directory; with --merge: OUT then the part directories."),
)
