"""The ``ghostproj`` command line: one small function per command, no maths here."""

from __future__ import annotations

import dataclasses
import functools
import inspect
import math
import os
import sys
from typing import Annotated, Optional, get_type_hints

import typer

from .data.readers import LayoutFields
from .errors import GhostprojError
from .jobs.evaluate import EvaluateOptions
from .jobs.factors import FactorsOptions
from .jobs.inrun import InrunOptions
from .jobs.project import ProjectOptions

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110},
    help="Per-example gradient projection and influence scoring for transformer language models.\n\n"
         "Exit codes: 0 success; 1 a check failed (naive-check, non-interf); 2 bad input or a damaged run "
         "(one sentence on stderr); 3 inspect found an unfinished run; 130 interrupted.",
)

# Help panels, so that long commands read as groups of a few options.
MODEL, DATA, PROJECTION, OUTPUT, RUN, SCORING = "Model", "Data", "Projection", "Output", "Run", "Scoring"
DEMO_MODEL, DEMO_DATA = "the embedded demo model", "the embedded demo corpus"


def _version(value: bool) -> None:
    if value:
        from importlib.metadata import PackageNotFoundError, version

        try:
            typer.echo(f"ghostproj {version('ghostproj')}")
        except PackageNotFoundError:
            from . import __version__

            typer.echo(f"ghostproj {__version__}")
        raise typer.Exit()


@app.callback()
def _root(version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                        help="Print the version and exit.")) -> None:
    """Per-example gradient projection and influence scoring for transformer language models.

    Exit codes: 0 success; 1 a check failed (naive-check, non-interf); 2 bad input or a
    damaged run (one sentence on stderr); 3 inspect found an unfinished run; 130 interrupted."""


def _opt(*flags: str, help: str, panel: str, default: str | None = None):
    """A command-line option's flags, one-line help, panel and (for None defaults) the
    default in words; the default itself is the parameter's (or the options field's)."""
    return typer.Option(*flags, help=help, rich_help_panel=panel,
                        **({"show_default": default} if default is not None else {}))


# Options several commands share, declared once.
ModelOpt = Annotated[Optional[str], _opt(help="Model directory or hub id.", panel=MODEL, default=DEMO_MODEL)]
_DATA_HELP = "JSONL, plain text (one example per line), .bin, Parquet."
DataOpt = Annotated[Optional[str], _opt(help=_DATA_HELP, panel=DATA, default=DEMO_DATA)]
TrainOpt = Annotated[Optional[str], _opt(help=_DATA_HELP, panel=DATA, default=DEMO_DATA)]
ValOpt = Annotated[Optional[str], _opt(help=_DATA_HELP, panel=DATA, default="the embedded demo queries")]
TextFieldOpt = Annotated[Optional[str], _opt(help="JSONL field holding the text.", panel=DATA,
                                             default="from the first row: text, prompt+completion or messages")]
PromptFieldOpt = Annotated[Optional[str], _opt(help="Field of the prompt (no loss on its tokens).", panel=DATA,
                                               default="'prompt' when the first row has it")]
CompletionFieldOpt = Annotated[Optional[str], _opt(help="Field of the completion (carries the loss).", panel=DATA,
                                                   default="'completion' when the first row has it")]
MessagesFieldOpt = Annotated[Optional[str], _opt(help="Field of a chat (loss on assistant turns only).", panel=DATA,
                                                 default="'messages' when the first row has it")]
MaxLengthOpt = Annotated[int, _opt(help="Truncate examples to this many tokens.", panel=DATA)]
LayersOpt = Annotated[Optional[str], _opt("--layers", help="Module-name patterns, comma-separated (substring, or "
                                          "re:REGEX).", panel=PROJECTION,
                                          default="every Linear / Conv1D but the output head")]
DeviceOpt = Annotated[str, _opt(help="auto, cpu or cuda.", panel=RUN)]
FactorsOpt = Annotated[Optional[str], _opt(help="Kronecker factors (`ghostproj factors`): check their eigenbasis, "
                                           "as project --factors uses it.", panel=PROJECTION, default="none")]
DtypeOpt = Annotated[str, _opt(help="Model weights: float32, bfloat16 or float16.", panel=MODEL)]
ScoreDeviceOpt = Annotated[str, _opt(help="auto, cpu or cuda: where the products run (auto: a GPU if there is one).",
                                     panel=RUN)]
ChunkRowsOpt = Annotated[Optional[int], _opt(help="Training rows read per chunk.", panel=RUN,
                                             default="8192 on the CPU, ~256 MiB of rows on a GPU")]


TopkOutOpt = Annotated[Optional[str], _opt(help="Write the top-k per query (JSONL).", panel=OUTPUT,
                                           default="not written")]
SelectOutOpt = Annotated[Optional[str], _opt(help="Write the per-example scores (.jsonl or .safetensors).",
                                             panel=OUTPUT, default="not written")]
OverwriteOpt = Annotated[bool, _opt("--overwrite", help="Replace output files that already exist.", panel=OUTPUT)]


def _info(alias):
    """The typer.Option inside an Annotated alias."""
    return alias.__metadata__[0]


def _split(value: Optional[str]) -> Optional[list[str]]:
    if value is None:
        return None
    parts = [p.strip() for p in value.split(",") if p.strip()]
    return parts or None


def _console():
    from .progress import console

    return console


def _status():
    from .progress import status

    return status


def _notes(notes) -> None:
    for note in notes:
        _status().print(f"[yellow]note:[/yellow] {_escape(note)}")


def _escape(text: str) -> str:
    from rich.markup import escape

    return escape(str(text))


def _default_model_and_data(model: Optional[str], data: Optional[str]) -> tuple[str, str]:
    """The embedded demo model and corpus stand in for whatever the user left out."""
    if model is not None and data is not None:
        return model, data
    if model is not None and data is None:
        raise GhostprojError("--model was given without --data; pass the data to project too.")
    from .jobs.demo import ensure_demo

    assets = ensure_demo(lambda m: _status().print(f"[dim]{m}[/dim]"))
    return str(assets.model), data if data is not None else str(assets.train)


def _options_signature(options_cls, declared: dict, extra: tuple = ()) -> inspect.Signature:
    """A command's signature made from an options dataclass: each option's name, type and
    default are the dataclass field's (declared once, there); ``declared`` adds the
    command line's part (flags, help, panel) as ``typer.Option``, or (Option, the type
    the command line reads, when it differs from the field's)."""
    hints = get_type_hints(options_cls)
    fields = {f.name: f for f in dataclasses.fields(options_cls)}
    params = []
    for name, spec in declared.items():  # in the order ``declared`` lists them, which --help keeps
        f = fields[name]
        info, cli_type = spec if isinstance(spec, tuple) else (spec, None)
        params.append(inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, default=f.default,
                                        annotation=Annotated[cli_type or hints[f.name], info]))
    return inspect.Signature(params + list(extra), return_annotation=None)


# How a data file's rows become examples: the same flags wherever data is read.
LAYOUT_OPTIONS = {
    "text_field": _info(TextFieldOpt),
    "prompt_field": _info(PromptFieldOpt),
    "completion_field": _info(CompletionFieldOpt),
    "messages_field": _info(MessagesFieldOpt),
}
# `project`'s options: names, types and defaults are ProjectOptions' fields.
PROJECT_OPTIONS = {
    "model": _info(ModelOpt),
    "dtype": _info(DtypeOpt),
    "revision": _opt(help="Model revision (hub models).", panel=MODEL, default="the default branch"),
    "adapter": _opt(help="PEFT LoRA adapter directory (needs the peft extra).", panel=MODEL, default="none"),
    "data": _info(DataOpt),
    "format": _opt(help="auto (by suffix), jsonl, text, bin, parquet or hf.", panel=DATA),
    **LAYOUT_OPTIONS,
    "split": _opt(help="Split of --hf-dataset.", panel=DATA),
    "token_dtype": _opt(help=".bin token width: uint16 or uint32.", panel=DATA, default="by vocabulary size"),
    "max_length": _info(MaxLengthOpt),
    "layers": (_info(LayersOpt), Optional[str]),
    "include_embeddings": _opt("--include-embeddings", help="Also project nn.Embedding layers.", panel=PROJECTION),
    "rank": _opt(help="Per-layer budget r: k_in * k_out <= r.", panel=PROJECTION, default="256"),
    "rank_min": _opt(help="Smallest k_in / k_out.", panel=PROJECTION, default="1"),
    "rank_in": _opt(help="Fix k_in for every layer.", panel=PROJECTION, default="from --rank"),
    "rank_out": _opt(help="Fix k_out for every layer.", panel=PROJECTION, default="from --rank"),
    "projector": _opt(help="gaussian, rademacher or orthonormal.", panel=PROJECTION, default="gaussian"),
    "seed": _opt(help="Projector seed.", panel=PROJECTION, default="0"),
    "loss_reduction": _opt(help="Per-example loss: mean or sum over tokens.", panel=PROJECTION, default="mean"),
    "bias": _opt("--bias/--no-bias", help="Include layer biases.", panel=PROJECTION, default="--no-bias"),
    "like": _opt(help="Reuse layers, k's, matrices and loss settings of this run.", panel=PROJECTION,
                 default="none"),
    "out": _opt(help="Output run directory.", panel=OUTPUT),
    "store_dtype": _opt(help="bfloat16, float16 or float32.", panel=OUTPUT),
    "shard_size": _opt(help="Rows per shard file.", panel=OUTPUT),
    "resume": _opt("--resume/--no-resume", help="Continue an interrupted run in --out.", panel=OUTPUT),
    "verify": _opt("--verify", help="On resume or rerun, hash every shard (not only the last).", panel=OUTPUT),
    "force": _opt("--force", help="Start even if the disk looks too small.", panel=OUTPUT),
    "device": _info(DeviceOpt),
    "batch_size": _opt(help="Examples per batch.", panel=RUN),
    "token_budget": _opt(help="Batch by length buckets up to N padded tokens.", panel=RUN,
                         default="fixed --batch-size"),
    "compile": _opt("--compile", help="torch.compile the model (pays on long runs).", panel=RUN),
    "optimizer_state": _opt(help="Adam moments (safetensors, or a torch optimizer checkpoint): project each "
                                 "example's Adam update direction instead of its gradient.", panel=PROJECTION,
                            default="raw gradients"),
    "factors": _opt(help="Kronecker factors (`ghostproj factors`): project in their eigenbasis, for EK-FAC influence.",
                    panel=PROJECTION, default="random matrices"),
    "num_shards": _opt(help="Job arrays: split the examples into this many parts.", panel=RUN),
    "shard_id": _opt(help="Job arrays: the part to project (then inspect --merge).", panel=RUN),
}
_HF_DATASET = inspect.Parameter(
    "hf_dataset", inspect.Parameter.KEYWORD_ONLY, default=None,
    annotation=Annotated[Optional[str], _opt(help="HF dataset name or saved directory (needs the data extra).",
                                             panel=DATA, default="none")])


def project(**options) -> None:
    """Project every example's loss gradient and write shards to OUT."""
    from .jobs.project import ProjectSummary, run_project

    hf_dataset = options.pop("hf_dataset")
    if hf_dataset is not None:
        if options["data"] is not None:
            raise GhostprojError("Give either --data or --hf-dataset, not both.")
        options["data"], options["format"] = hf_dataset, "hf"
        if options["model"] is None:
            raise GhostprojError("--hf-dataset needs --model.")
    options["model"], options["data"] = _default_model_and_data(options["model"], options["data"])
    options["layers"] = _split(options["layers"])
    _report_project(_with_notes(run_project, ProjectOptions(**options), ProjectSummary(out=options["out"])))


project.__signature__ = _options_signature(ProjectOptions, PROJECT_OPTIONS, extra=(_HF_DATASET,))
app.command()(project)


FACTORS_OPTIONS = {
    "model": _info(ModelOpt),
    "dtype": _info(DtypeOpt),
    "revision": PROJECT_OPTIONS["revision"],
    "data": _info(DataOpt),
    "format": PROJECT_OPTIONS["format"],
    **LAYOUT_OPTIONS,
    "split": PROJECT_OPTIONS["split"],
    "token_dtype": PROJECT_OPTIONS["token_dtype"],
    "max_length": _info(MaxLengthOpt),
    "layers": (_info(LayersOpt), Optional[str]),
    "loss_reduction": _opt(help="Per-example loss: mean or sum over tokens (as the runs that use them).",
                           panel=PROJECTION),
    "out": _opt(help="The factors file (safetensors).", panel=OUTPUT),
    "overwrite": _info(OverwriteOpt),
    "device": _info(DeviceOpt),
    "batch_size": PROJECT_OPTIONS["batch_size"],
    "token_budget": PROJECT_OPTIONS["token_budget"],
    "num_shards": PROJECT_OPTIONS["num_shards"],
    "shard_id": _opt(help="Job arrays: the part to sum (then factors --merge).", panel=RUN),
    "fisher_labels": _opt(help="empirical: the data's own labels; sampled: labels drawn from the model (the true "
                          "Fisher).", panel=PROJECTION),
    "seed": _opt(help="Seed of the sampled labels.", panel=PROJECTION),
    "checkpoint_minutes": _opt(help="Save the running sums this often, for a rerun to continue from (0: every "
                               "batch).", panel=RUN),
}
_FACTORS_EXTRA = (
    inspect.Parameter("merge", inspect.Parameter.KEYWORD_ONLY, default=False, annotation=Annotated[
        bool, _opt("--merge", help="Sum the part files given as arguments into --out.", panel=RUN)]),
    inspect.Parameter("parts", inspect.Parameter.KEYWORD_ONLY, default=None, annotation=Annotated[
        Optional[list[str]], typer.Argument(help="With --merge: the factors files of the parts.",
                                            show_default=False)]),
)


def factors(**options) -> None:
    """Each layer's Kronecker factors over the training data, for project --factors (EK-FAC influence)."""
    from .jobs.factors import FactorsSummary, merge_factors, run_factors

    merge, parts = options.pop("merge"), options.pop("parts")
    if merge or parts:
        if not merge or not parts:
            raise GhostprojError("Part files are summed with --merge --out F PART...; give both.")
        totals = merge_factors(options["out"], parts, options["overwrite"])
        _status().print(f"merged {len(parts)} parts ({totals.examples} examples) into {_escape(options['out'])}")
        return
    options["model"], options["data"] = _default_model_and_data(options["model"], options["data"])
    options["layers"] = _split(options["layers"])
    s = _with_notes(run_factors, FactorsOptions(**options), FactorsSummary(out=options["out"]))
    _console().print(f"[green]done[/green]: factors of {s.layers} layers over {s.examples} examples "
                     f"({s.positions} positions) in {s.seconds:.1f} s; wrote {_escape(s.out)}", soft_wrap=True)


factors.__signature__ = _options_signature(FactorsOptions, FACTORS_OPTIONS, extra=_FACTORS_EXTRA)
app.command()(factors)


def _with_notes(run, options, summary):
    """``run(options, summary)``, printing the summary's notes also when the run is
    interrupted or refused: what was learnt is not lost."""
    try:
        run(options, summary)
    finally:
        _notes(summary.notes)
    return summary


def _report_project(s) -> None:
    from .progress import human_bytes

    con, out = _console(), _escape(s.out)
    if s.mode == "complete":
        if s.projector_rebuilt:
            con.print(f"[green]repaired[/green]: the projector file of the complete run in {out} rebuilt.",
                      soft_wrap=True)
        else:
            con.print(f"{out} already holds this complete run ({s.examples} examples); nothing to do.",
                      soft_wrap=True)
        return
    if s.mode == "repaired":
        con.print(f"[green]repaired[/green]: {s.repaired} damaged shard(s) of the complete run in {out} recomputed.",
                  soft_wrap=True)
        return
    con.print(
        f"[green]done[/green]: {s.examples} examples, {s.tokens} label tokens, D={s.dim}, "
        f"{s.no_label} without label positions (zero vectors"
        + (f"; {s.prompt_too_long} of them skipped because the prompt fills --max-length" if s.prompt_too_long else "")
        + f"), {s.truncated} truncated, {human_bytes(s.bytes)} in {out}, {s.seconds:.1f} s",
        soft_wrap=True,
    )


def _error_table(title: str, rows, tolerance: float):
    from rich.table import Table

    table = Table(title=title)
    table.add_column("layer / quantity", overflow="fold")
    table.add_column("max rel err", justify="right")
    table.add_column("max abs diff", justify="right")
    table.add_column("ok", justify="center")
    for name, rel, abs_ in rows:
        ok = rel <= tolerance
        table.add_row(name, f"{rel:.2e}", f"{abs_:.2e}", "[green]yes[/green]" if ok else "[red]NO[/red]")
    return table


@dataclasses.dataclass
class Source(LayoutFields):
    """Where a check's model and data come from, and the data's layout."""

    model: str | None = None
    data: str | None = None

    def resolved(self) -> tuple[str, str, dict]:
        """(model, data, layout fields), the embedded demo standing in for what was left out."""
        model, data = _default_model_and_data(self.model, self.data)
        return model, data, self.fields


SOURCE_OPTIONS = {"model": _info(ModelOpt), "data": _info(DataOpt), **LAYOUT_OPTIONS}


def _with_source(command):
    """Gives a command the model, data and layout options (declared once, in Source) ahead
    of its own; the command receives them as one Source, its first parameter."""
    own = [param.replace(kind=inspect.Parameter.KEYWORD_ONLY)
           for param in list(inspect.signature(command, eval_str=True).parameters.values())[1:]]
    names = list(SOURCE_OPTIONS)

    @functools.wraps(command)
    def wrapper(**options):
        return command(Source(**{n: options.pop(n) for n in names}), **options)

    wrapper.__signature__ = inspect.Signature(
        list(_options_signature(Source, SOURCE_OPTIONS).parameters.values()) + own, return_annotation=None)
    return wrapper


@app.command("naive-check")
@_with_source
def naive_check(
    source: Source,
    dtype: DtypeOpt = "float32",
    adapter: Optional[str] = typer.Option(None, help="PEFT LoRA adapter directory.", rich_help_panel=MODEL,
                                          show_default="none"),
    samples: int = typer.Option(8, help="Examples in the padded batch.", rich_help_panel=DATA),
    max_length: MaxLengthOpt = 512,
    layers: LayersOpt = None,
    include_embeddings: bool = typer.Option(False, "--include-embeddings", help="Also check nn.Embedding layers.",
                                            rich_help_panel=PROJECTION),
    rank: int = typer.Option(256, help="Per-layer budget.", rich_help_panel=PROJECTION),
    projector: str = typer.Option("gaussian", help="gaussian, rademacher or orthonormal.", rich_help_panel=PROJECTION),
    seed: int = typer.Option(0, help="Projector seed.", rich_help_panel=PROJECTION),
    loss_reduction: str = typer.Option("mean", help="mean or sum.", rich_help_panel=PROJECTION),
    bias: bool = typer.Option(False, "--bias/--no-bias", help="Include layer biases.", rich_help_panel=PROJECTION),
    tolerance: Optional[float] = typer.Option(None, help="Max relative error.", rich_help_panel=RUN,
                                              show_default="1e-4; 2e-2 for 16-bit models, 4x the error measured"),
    factors: FactorsOpt = None,
    device: DeviceOpt = "auto",
) -> None:
    """Prove the engine equals the slow exact computation on your model and data."""
    from .jobs.checks import run_naive_check

    model, data, fields = source.resolved()
    result = run_naive_check(model, data, _split(layers), samples=samples, rank=rank, projector=projector,
                             seed=seed, loss_reduction=loss_reduction, bias=bias, max_length=max_length,
                             dtype=dtype, device=device, tolerance=tolerance, adapter=adapter,
                             include_embeddings=include_embeddings, factors=factors, **fields)
    con = _console()
    con.print(_error_table(
        f"engine vs naive reference ({result.n_examples} examples, lengths {result.min_len}-{result.max_len}, "
        f"one padded batch)", [(e.name, e.max_rel, e.max_abs) for e in result.errors], result.tolerance))
    if not result.ok:
        con.print(f"[red]FAILED[/red]: relative error above {result.tolerance:g}.")
        raise typer.Exit(1)
    con.print(f"[green]OK[/green]: every layer within {result.tolerance:g}.")


@app.command("non-interf")
@_with_source
def non_interf(
    source: Source,
    max_length: MaxLengthOpt = 128,
    layers: LayersOpt = None,
    steps: int = typer.Option(3, help="Optimizer steps.", rich_help_panel=RUN),
    batch_size: int = typer.Option(4, help="Examples per step.", rich_help_panel=RUN),
    lr: float = typer.Option(1e-3, help="Learning rate.", rich_help_panel=RUN),
    optimizer: str = typer.Option("adamw", help="adamw or sgd.", rich_help_panel=RUN),
    tolerance: float = typer.Option(1e-6, help="Max relative difference.", rich_help_panel=RUN),
    device: DeviceOpt = "auto",
) -> None:
    """Prove attaching the engine changes nothing about training."""
    from .jobs.checks import run_non_interference

    model, data, fields = source.resolved()
    result = run_non_interference(model, data, _split(layers), steps=steps, batch_size=batch_size, lr=lr,
                                  optimizer=optimizer, max_length=max_length, device=device, **fields)
    con = _console()
    con.print(_error_table(f"training with vs without the engine ({steps} {optimizer} steps)",
                           [(c.name, c.max_rel, c.max_abs) for c in result.comparisons], tolerance))
    for problem in result.problems:
        con.print(f"[red]detach left something behind[/red]: {problem}")
    if result.problems or any(c.max_rel > tolerance for c in result.comparisons):
        con.print("[red]FAILED[/red]: the engine interfered with training.")
        raise typer.Exit(1)
    con.print("[green]OK[/green]: identical losses, logits, gradients and parameters; detach restored the model.")


@app.command()
def score(
    runs: list[str] = typer.Argument(
        ..., metavar="TRAIN QUERY [TRAIN QUERY]...",
        help="Training run and query run (directories or shard files; the query projected with --like TRAIN). "
             "Several pairs, one per checkpoint of a fine-tuning run (each projected with its own --seed), give the "
             "sum of their scores."),
    metric: str = typer.Option("influence", help="influence (damped per-layer Fisher; best LDS measured), cosine, dot "
                               "or influence-full.", rich_help_panel=SCORING),
    normalize: str = typer.Option(
        "layer", help="none, unit or layer. layer (unit norm per layer, then combined) ranked best on real data.",
        rich_help_panel=SCORING),
    center: bool = typer.Option(False, "--center/--no-center", help="Subtract the training mean vector first.",
                                rich_help_panel=SCORING),
    damping: float = typer.Option(0.1, help="Influence damping: lambda_l = damping * mean diag F_l.",
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
    from .jobs.score import run_score_command

    if len(runs) % 2:
        raise GhostprojError("score takes TRAIN QUERY pairs: an even number of run paths.")
    train, query = (runs[0], runs[1]) if len(runs) == 2 else (runs[0::2], runs[1::2])
    if num_parts < 1:
        raise GhostprojError(f"--num-parts must be at least 1, got {num_parts}.")
    if num_parts == 1 and (part != 0 or part_out is not None):
        raise GhostprojError("--part and --part-out split the scoring into parts: give --num-parts 2 or more.")
    if fisher_file is not None and len(runs) > 2:
        fisher_file = _split(fisher_file)  # one per checkpoint, comma-separated
    run_score_command(
        train, query, metric=metric, normalize=normalize, center=center, damping=damping, layers=_split(layers),
        top_k=top_k, show=show, out=out, topk_out=topk_out, reduce=reduce, group_field=group_field,
        select_out=select_out, chunk_rows=chunk_rows, overwrite=overwrite, console=_console(), status=_status(),
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
    from .jobs.score import run_merge_scores

    result = run_merge_scores(parts, out=out, topk_out=topk_out, select_out=select_out, overwrite=overwrite)
    _status().print(f"merged {len(parts)} parts ({result.train_index.numel()} training rows)"
                    + "".join(f"; wrote {_escape(p)}" for p in (out, topk_out, select_out) if p))


@app.command()
@_with_source
def fidelity(
    source: Source,
    samples: int = typer.Option(16, help="Calibration examples (exact gradients are held for these).",
                                rich_help_panel=DATA),
    max_length: MaxLengthOpt = 512,
    layers: LayersOpt = None,
    ranks: str = typer.Option("64,256,1024", help="Per-layer ranks to compare.", rich_help_panel=PROJECTION),
    dense: bool = typer.Option(True, "--dense/--no-dense", help="Also a dense Gaussian projection of equal size.",
                               rich_help_panel=PROJECTION),
    seed: int = typer.Option(0, help="Projector seed.", rich_help_panel=PROJECTION),
    factors: FactorsOpt = None,
    device: DeviceOpt = "auto",
) -> None:
    """How well projected inner products match exact ones, per rank and layer."""
    from rich.table import Table

    from .jobs.fidelity import run_fidelity_check

    model, data, fields = source.resolved()
    report = run_fidelity_check(model, data, _split(layers), ranks, samples=samples, max_length=max_length,
                                dense=dense, seed=seed, device=device, factors=factors, **fields)
    con = _console()
    table = Table(title=f"projected vs exact per-example gradient inner products ({report.examples} examples, "
                        f"{report.examples * (report.examples - 1) // 2} pairs)", title_justify="left")
    for col in ("rank", "D", "projection", "corr(ip)", "rel err(ip)", "corr(cos)", "abs err(cos)"):
        table.add_column(col, justify="left" if col == "projection" else "right")
    for rr in report.ranks:
        rows = [("eigenbasis" if factors else "kronecker", rr.total)] + ([("dense", rr.dense_total)] if rr.dense_total else [])
        for label, a in rows:
            table.add_row(str(rr.rank), str(rr.dim), label, f"{a.ip_corr:.3f}", f"{a.ip_rel_err:.3f}",
                          f"{a.cos_corr:.3f}", f"{a.cos_abs_err:.3f}")
    con.print(table)
    layer_table = Table(title="per layer: corr(ip) at each rank", title_justify="left")
    layer_table.add_column("layer", overflow="fold")
    for rr in report.ranks:
        layer_table.add_column(f"r={rr.rank}", justify="right")
    for name in report.ranks[0].per_layer:
        layer_table.add_row(name, *(f"{rr.per_layer[name].ip_corr:.3f}" for rr in report.ranks))
    con.print(layer_table)
    if report.recommended is not None:
        con.print(f"recommended --rank {report.recommended} ({report.rule}).")
    else:
        con.print(f"no rank tried reaches the bar ({report.rule}); try larger ranks.")


@app.command()
def fisher(
    paths: list[str] = typer.Argument(..., help="TRAIN run; with --merge: OUT then the part files."),
    out: Optional[str] = typer.Option(None, help="The Fisher file to write (safetensors).", rich_help_panel=OUTPUT,
                                      show_default="required without --merge"),
    layers: Optional[str] = typer.Option(None, "--layers", help="Only these projected layers (patterns), as score.",
                                         rich_help_panel=SCORING, show_default="all"),
    normalize: str = typer.Option("layer", help="none, unit or layer: as the score that will use it.",
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
    from .jobs.fisher import run_fisher, run_fisher_merge

    if merge:
        if len(paths) < 2:
            raise GhostprojError("--merge needs OUT followed by the part files.")
        result = run_fisher_merge(paths[0], paths[1:], overwrite)
        _status().print(f"merged {len(paths) - 1} parts ({result.count} rows) into {_escape(paths[0])}")
        return
    if len(paths) != 1 or out is None:
        raise GhostprojError("fisher takes one training run and --out FILE (or --merge OUT PART...).")
    result = run_fisher(paths[0], out, layers=_split(layers), normalize=normalize, full=full, num_parts=num_parts,
                        part=part, chunk_rows=chunk_rows, overwrite=overwrite, device=device)
    what = f"part {part} of {num_parts}, " if num_parts > 1 else ""
    _status().print(f"[green]wrote[/green] {_escape(out)}: {what}{result.count} rows, {len(result.sums)} block(s)")


def _demo_in_place(options: dict, query_key: str) -> bool:
    """Put the embedded demo's model, training set and queries where they were not given
    (all three, or the data only around a --model); True when the demo is used."""
    if options["model"] is not None and options["train"] is not None and options[query_key] is not None:
        return False
    if options["model"] is not None:
        raise GhostprojError(f"--model was given without --train and --{query_key}.")
    from .jobs.demo import ensure_demo

    assets = ensure_demo(lambda m: _status().print(f"[dim]{m}[/dim]"))
    options["model"] = str(assets.model)
    options["train"] = options["train"] or str(assets.train)
    options[query_key] = options[query_key] or str(assets.query)
    return True


INRUN_OPTIONS = {
    "model": _info(ModelOpt),
    "train": _info(TrainOpt),
    "val": _info(ValOpt),
    **LAYOUT_OPTIONS,
    "val_size": _opt(help="Use the first N validation examples.", panel=DATA, default="all; 16 for the demo"),
    "max_length": _info(MaxLengthOpt),
    "out": _opt(help="Output directory (dots, values, final model).", panel=OUTPUT),
    "steps": _opt(help="Optimizer steps.", panel=RUN),
    "batch_size": _opt(help="Training examples per step.", panel=RUN),
    "lr": _opt(help="Learning rate.", panel=RUN),
    "optimizer": _opt(help="sgd or adamw.", panel=RUN),
    "seed": _opt(help="Seed of the batch order and dropout.", panel=RUN),
    "device": _info(DeviceOpt),
}
_INRUN_EXTRA = (
    inspect.Parameter("freeze_uncovered", inspect.Parameter.KEYWORD_ONLY, default=False, annotation=Annotated[
        bool, _opt("--freeze-uncovered", help="Freeze trainable parameters outside supported layers.", panel=RUN)]),
    inspect.Parameter("show", inspect.Parameter.KEYWORD_ONLY, default=5, annotation=Annotated[
        int, _opt(help="Most and least valuable examples printed.", panel=OUTPUT)]),
)


def inrun(**options) -> None:
    """Fine-tune with in-run data valuation: per-step gradient dot products with a validation batch."""
    from .jobs.inrun import run_inrun

    show = options.pop("show")
    options["uncovered"] = "freeze" if options.pop("freeze_uncovered") else "error"
    if _demo_in_place(options, "val") and options["val_size"] is None:
        options["val_size"] = 16
    res = run_inrun(InrunOptions(**options))
    _notes(res.notes)
    _report_inrun(res, show)


inrun.__signature__ = _options_signature(InrunOptions, INRUN_OPTIONS, extra=_INRUN_EXTRA)
app.command()(inrun)


EVALUATE_OPTIONS = {
    "model": _info(ModelOpt),
    "train": _info(TrainOpt),
    "query": _opt(help=_DATA_HELP, panel=DATA, default="the embedded demo queries"),
    **LAYOUT_OPTIONS,
    "max_length": _info(MaxLengthOpt),
    "out": _opt(help="Output directory (cache of every model trained, runs, lds.json, lds.png).", panel=OUTPUT),
    "subsets": _opt(help="Random training subsets, one fine-tuned model each.", panel=RUN),
    "fraction": _opt(help="Share of the training set in each subset.", panel=RUN),
    "epochs": _opt(help="Fine-tuning passes over a subset (and over the whole set).", panel=RUN),
    "lr": _opt(help="Fine-tuning learning rate (AdamW, linear decay).", panel=RUN),
    "batch_size": _opt(help="Fine-tuning and projection batch size.", panel=RUN),
    "seed": _opt(help="Seed of the subsets, batch order, dropout and bootstrap.", panel=RUN),
    "checkpoints": _opt(help="Checkpoints kept from the whole-set run; ensembles of 1, 2, 4, ... are compared.",
                        panel=SCORING),
    "layers": (_info(LayersOpt), Optional[str]),
    "rank": _opt(help="Per-layer projection budget, as for project.", panel=PROJECTION, default="256"),
    "damping": _opt(help="Influence damping, as for score.", panel=SCORING),
    "fisher_labels": _opt(help="--projection eigen: factors of the data's labels (empirical) or of labels drawn "
                          "from the model (sampled), as for factors.", panel=PROJECTION),
    "removal_queries": _opt(help="Queries whose top-k examples are removed and the model retrained (0: none).",
                            panel=SCORING),
    "removal_k": _opt(help="Examples removed per query.", panel=SCORING, default="5% of the training set"),
    "replicates": _opt(help="Bootstrap resamples of subsets and queries for the intervals.", panel=SCORING),
    "num_parts": _opt(help="Train the subsets in this many processes...", panel=RUN),
    "part": _opt(help="...this one (then run once more without --part to report).", panel=RUN),
    "device": _info(DeviceOpt),
}
_EVALUATE_EXTRA = (
    inspect.Parameter("metrics_list", inspect.Parameter.KEYWORD_ONLY, default="cosine,dot,influence",
                      annotation=Annotated[str, _opt("--metrics", help="Scoring metrics compared: cosine, dot, influence; "
                                                      "inrun adds the in-run values of the whole-set fine-tuning.",
                                                      panel=SCORING)]),
    inspect.Parameter("normalize_list", inspect.Parameter.KEYWORD_ONLY, default="none,layer",
                      annotation=Annotated[str, _opt("--normalize", help="Normalizations compared.", panel=SCORING)]),
    inspect.Parameter("projection_list", inspect.Parameter.KEYWORD_ONLY, default="gaussian",
                      annotation=Annotated[str, _opt("--projection", help="Projections compared: gaussian (random "
                                                     "matrices); eigen adds the Kronecker eigenbasis of each "
                                                     "checkpoint's factors, scored with EK-FAC weights (influence).",
                                                     panel=SCORING)]),
    inspect.Parameter("vectors_list", inspect.Parameter.KEYWORD_ONLY, default="grad",
                      annotation=Annotated[str, _opt("--vectors", help="Training vectors compared: grad; adam adds "
                                                     "Adam update directions at each checkpoint (LESS).",
                                                     panel=SCORING)]),
)


def evaluate(**options) -> None:
    """Check attribution against retraining: the linear datamodeling score (LDS) of each scoring setting."""
    from .jobs.evaluate import run_evaluate

    options["metrics"] = _split(options.pop("metrics_list")) or []
    options["normalize"] = _split(options.pop("normalize_list")) or []
    options["vectors"] = _split(options.pop("vectors_list")) or []
    options["projection"] = _split(options.pop("projection_list")) or []
    options["layers"] = _split(options["layers"])
    _demo_in_place(options, "query")
    res = run_evaluate(EvaluateOptions(**options))
    _notes(res.notes)
    _report_evaluate(res)


evaluate.__signature__ = _options_signature(EvaluateOptions, EVALUATE_OPTIONS, extra=_EVALUATE_EXTRA)
app.command()(evaluate)


def _report_evaluate(res) -> None:
    from rich.table import Table

    con = _console()
    if not res.finished and res.rank is not None:
        con.print(f"rank {res.rank}: trained {res.trained} subset model(s); rank 0 reports.")
        return
    if not res.finished:
        con.print(f"[green]done[/green]: trained {res.trained} subset model(s) of {res.subsets} into "
                  f"{_escape(res.out)}; run evaluate again without --part (same options) to report.")
        return
    table = Table(title=f"LDS over {res.subsets} subset models and {res.n_query} queries (95% bootstrap intervals)",
                  title_justify="left")
    for col in ("metric", "--normalize", "checkpoints", "LDS", "95% interval"):
        table.add_column(col, justify="left" if col in ("metric", "--normalize") else "right")
    for s in res.settings:
        mark = " *" if s is res.best else ""
        inrun = s.metric == "inrun"  # from every step of the whole-set run: no normalization, no checkpoints
        table.add_row(s.metric + {"adam": " (adam)", "eigen": " (eigenbasis)"}.get(s.vectors, ""), "-" if inrun else s.normalize, "all steps" if inrun else str(s.checkpoints),
                      f"{s.lds.value:.3f}{mark}",
                      f"[{s.lds.low:.3f}, {s.lds.high:.3f}]")
    con.print(table)
    if res.difference is not None:
        d, lo, hi = res.difference
        con.print(f"best: {res.best.name}: LDS {res.best.lds.value:.3f}; raw dot products (1 checkpoint) "
                  f"{res.baseline.lds.value:.3f}; difference {d:+.3f} [{lo:+.3f}, {hi:+.3f}]")
    if res.recommended_difference is not None:
        d, lo, hi = res.recommended_difference
        r = res.recommended.lds
        con.print(f"recommended (score's defaults, every checkpoint): {res.recommended.name}: LDS {r.value:.3f} "
                  f"[{r.low:.3f}, {r.high:.3f}]; against raw dot products {d:+.3f} [{lo:+.3f}, {hi:+.3f}]")
    if res.ensemble_gain is not None:
        d, lo, hi = res.ensemble_gain
        con.print(f"{res.best.metric}, --normalize {res.best.normalize}: all checkpoints against the final one "
                  f"{d:+.3f} [{lo:+.3f}, {hi:+.3f}]")
    for row in res.removal:
        con.print(f"removing each of {row['queries']} queries' top {row['k']} ({row['setting']}): mean query-loss "
                  f"change {row['mean_loss_change']:+.4f}")
    con.print(f"[green]done[/green] in {res.seconds:.0f} s ({res.trained} subset model(s) trained now, the rest "
              f"cached); wrote {_escape(res.out)}/lds.json" + (f" and {_escape(res.plot)}" if res.plot else ""))


def _report_inrun(res, show: int) -> None:
    import torch
    from rich.table import Table

    from .progress import shorten

    con = _console()
    seen = (res.counts > 0).nonzero().flatten()
    if show > 0 and len(seen):
        order = seen[torch.argsort(res.values[seen])]
        table = Table(title="in-run value = sum over steps of -lr * dot (negative: the example lowered the "
                            "validation loss)", title_justify="left")
        for col in ("", "train", "value", "steps drawn", "text"):
            table.add_column(col, justify="right" if col in ("train", "value", "steps drawn") else "left")
        n = min(show, len(order))
        for label, rows in (("most valuable", order[:n]), ("least valuable", order[-n:].flip(0))):
            for i in rows.tolist():
                table.add_row(label, str(i), f"{float(res.values[i]):.3e}", str(int(res.counts[i])),
                              shorten(res.train_texts[i]))
        con.print(table)
    con.print(f"[green]done[/green]: {res.steps} steps over {res.train_count} training examples with a validation "
              f"batch of {res.val_count}; final training loss {res.final_loss:.3f}; {res.seconds:.1f} s; "
              f"wrote {_escape(res.out)}/dots.safetensors, values.safetensors and model/")


INCOMPLETE_EXIT = 3  # `inspect` of a run that is not finished: scripts can gate on it


@app.command("inspect")
def inspect_run(
    run_dirs: list[str] = typer.Argument(..., help="Run directory; with --merge: OUT then the part directories."),
    quick: bool = typer.Option(False, "--quick", help="Skip hashing the shards."),
    merge: bool = typer.Option(False, "--merge", help="Join the runs of --num-shards/--shard-id jobs into OUT."),
) -> None:
    """Show a run and verify its shards (or merge job-array parts into one run).

    Exits 0 for a complete, verified run, 3 for an unfinished one and 2 for a damaged one."""
    from .jobs.inspect import describe_run

    if merge:
        from .store.merge import merge_runs

        if len(run_dirs) < 2:
            raise GhostprojError("--merge needs OUT followed by the part directories.")
        merge_runs(run_dirs[0], run_dirs[1:])
        _status().print(f"merged {len(run_dirs) - 1} parts into {_escape(run_dirs[0])}")
    elif len(run_dirs) != 1:
        raise GhostprojError("inspect takes one run directory (or --merge OUT PART...).")
    complete = describe_run(run_dirs[0], _console(), hash_shards=not quick)
    if not complete:
        raise typer.Exit(INCOMPLETE_EXIT)


@app.command()
def demo(
    out: str = typer.Option("ghostproj-demo", help="Directory for the demo's projection runs.",
                            rich_help_panel=OUTPUT),
    top_k: int = typer.Option(10, help="Matches per query.", rich_help_panel=SCORING),
    show: int = typer.Option(3, help="Queries whose matches are printed.", rich_help_panel=OUTPUT),
) -> None:
    """Project the embedded corpus, score held-out queries and show what ghostproj finds."""
    from .jobs.demo import run_demo

    run_demo(out, _console(), _status(), top_k=top_k, show=show)


index_app = typer.Typer(no_args_is_help=True, help="An approximate top-k index for very large training runs "
                        "(needs the \\[index] extra: pip install 'ghostproj\\[index]').")
app.add_typer(index_app, name="index")


@index_app.command("build")
def index_build(
    train: str = typer.Argument(..., help="Training run directory."),
    out: str = typer.Option(..., help="Directory for the index.", rich_help_panel=OUTPUT),
    metric: str = typer.Option("influence", help="influence, cosine or dot, as score.", rich_help_panel=SCORING),
    normalize: str = typer.Option("layer", help="none, unit or layer, as score.", rich_help_panel=SCORING),
    center: bool = typer.Option(False, "--center/--no-center", help="Subtract the training mean vector first.",
                                rich_help_panel=SCORING),
    damping: float = typer.Option(0.1, help="Influence damping, as score.", rich_help_panel=SCORING),
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
                                             "(recall against speed).", rich_help_panel=SCORING, show_default="256"),
    check: int = typer.Option(100, help="Measure recall@k against exact scoring on this many sampled queries "
                                         "(0: skip).", rich_help_panel=RUN),
    check_query: Optional[str] = typer.Option(None, help="A query run to draw the --check queries from.",
                                              rich_help_panel=RUN, show_default="training rows, each without itself"),
    top_k: int = typer.Option(10, help="The k of the --check recall.", rich_help_panel=RUN),
    device: ScoreDeviceOpt = "auto",
    overwrite: OverwriteOpt = False,
) -> None:
    """Index a training run for approximate top-k (same transform as score)."""
    from .jobs.index import run_index_build
    from .scoring.index import IndexSettings

    settings = IndexSettings(metric=metric, normalize=normalize, center=center, damping=damping, layers=_split(layers),
                             factory=factory or "", nprobe=nprobe, candidates=candidates)
    status = _status()
    built, size, recall = run_index_build(train, out, settings, fisher=fisher_file, check=check,
                                          check_query=check_query, check_k=top_k, device=device,
                                          overwrite=overwrite, log=lambda m: status.print(f"[dim]{_escape(m)}[/dim]"))
    raw = built.rows * built.width * 4
    search_setting = (f" ({built.candidates} candidates per query)" if built.candidates
                      else f" (nprobe {built.nprobe})" if built.nprobe else "")
    status.print(f"[green]indexed[/green] {built.rows} rows of D={built.width} as {built.factory}{search_setting} "
                 f"in {built.seconds:.1f} s: {size / 2**20:.1f} MiB, "
                 f"{size / raw:.3f} of the float32 vectors; wrote {_escape(out)}")
    if recall is not None:
        status.print(f"recall@{recall.k} {recall.recall:.3f} on {recall.source}; "
                     f"{recall.index_qps:.0f} queries/s against {recall.exact_qps:.1f} exact "
                     f"({recall.index_qps / recall.exact_qps:.0f}x)")


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
    from .jobs.index import run_index_query

    result = run_index_query(index_dir, query, top_k=top_k, topk_out=topk_out, nprobe=nprobe, device=device,
                             overwrite=overwrite, candidates=candidates)
    status = _status()
    for note in result.notes:
        status.print(f"[yellow]note:[/yellow] {_escape(note)}")
    con = _console()
    for j in range(min(show, result.topk_train.shape[0])):
        found = result.topk_train[j] >= 0
        pairs = ", ".join(f"{int(i)} ({float(v):.4g})" for i, v in zip(result.topk_train[j][found],
                                                                       result.topk_scores[j][found]))
        con.print(f"query {int(result.query_index[j])}: {pairs}")
    status.print(f"[green]searched[/green] {result.query_index.numel()} queries in {result.seconds:.2f} s"
                 + (f"; wrote {_escape(topk_out)}" if topk_out else ""))


class Interrupted(BaseException):
    """Ctrl-C, raised in place of KeyboardInterrupt so that it reaches :func:`main` (the
    command-line framework would turn a KeyboardInterrupt into a silent exit first)."""


def _on_sigint(signum, frame):
    raise Interrupted()


def _finite_floats(command) -> None:
    """Every float option of every command, present and future, refuses NaN and +-inf (the
    parser takes both as floats): each command's function is wrapped to check its values
    before it runs."""
    for sub in getattr(command, "commands", {}).values():
        _finite_floats(sub)
    if command.callback is None:
        return
    flags = {p.name: max(p.opts, key=len) for p in command.params if getattr(p, "opts", None)}
    inner = command.callback

    @functools.wraps(inner)
    def checked(*args, **kwargs):
        for name, value in kwargs.items():
            if isinstance(value, float) and not math.isfinite(value):
                raise GhostprojError(f"{flags.get(name, name)} must be a finite number, got {value}.")
        return inner(*args, **kwargs)

    command.callback = checked


def main(argv: list[str] | None = None) -> None:
    """Entry point: user errors become one sentence on stderr and a non-zero exit."""
    import signal
    import threading

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    previous = None
    if threading.current_thread() is threading.main_thread():
        previous = signal.signal(signal.SIGINT, _on_sigint)
    try:
        command = typer.main.get_command(app)
        _finite_floats(command)
        command(args=argv, prog_name="ghostproj")  # standalone: usage errors print usage and exit 2
    except GhostprojError as exc:
        _status().print(f"[red]error:[/red] {_escape(exc)}", highlight=False)
        sys.exit(2)
    except (Interrupted, KeyboardInterrupt):
        args = sys.argv[1:] if argv is None else argv
        if "project" in args[:1]:
            _status().print("[yellow]interrupted[/yellow]: every complete shard is kept; rerun the same "
                            "command to resume.")
        else:  # the other commands write their outputs whole at the end, atomically
            _status().print("[yellow]interrupted[/yellow]: no output was written.")
        sys.exit(130)
    except OSError as exc:
        what = exc.strerror or str(exc)
        _status().print(f"[red]error:[/red] {_escape(what)} ({_escape(exc.filename or 'file system')}).",
                        highlight=False)
        sys.exit(2)
    finally:
        if previous is not None:
            signal.signal(signal.SIGINT, previous)


if __name__ == "__main__":
    main()
