"""The commands that run a model: project, factors, the checks, inrun, evaluate, demo.
Each builds its options, runs its job and hands the result to :mod:`render`."""

from __future__ import annotations

from typing import Optional

import typer

from .. import defaults
from ..errors import GhostprojError
from ..jobs.evaluate import EvaluateOptions
from ..jobs.factors import FactorsOptions
from ..jobs.inrun import InrunOptions
from ..jobs.project import ProjectOptions
from .app import DATA, MODEL, OUTPUT, PROJECTION, RUN, SCORING, app, console_err, console_out, markup_safe, print_notes
from .options import (
    EVALUATE_EXTRA,
    EVALUATE_OPTIONS,
    FACTORS_EXTRA,
    FACTORS_OPTIONS,
    HF_DATASET,
    INRUN_EXTRA,
    INRUN_OPTIONS,
    PROJECT_OPTIONS,
    DeviceOpt,
    DtypeOpt,
    FactorsOpt,
    LayersOpt,
    MaxLengthOpt,
    Source,
    default_model_and_data,
    demo_in_place,
    options_signature,
    split_list,
    with_source,
)
from .render import (
    report_demo,
    report_evaluate,
    report_fidelity,
    report_inrun,
    report_naive_check,
    report_non_interference,
    report_project,
    report_scores,
    with_notes,
)


def project(**options) -> None:
    """Project every example's loss gradient and write shards to OUT."""
    from ..jobs.project import ProjectSummary, run_project

    hf_dataset = options.pop("hf_dataset")
    if hf_dataset is not None:
        if options["data"] is not None:
            raise GhostprojError("Give either --data or --hf-dataset, not both.")
        options["data"], options["format"] = hf_dataset, "hf"
        if options["model"] is None:
            raise GhostprojError("--hf-dataset needs --model.")
    options["model"], options["data"] = default_model_and_data(options["model"], options["data"])
    options["layers"] = split_list(options["layers"])
    report_project(with_notes(run_project, ProjectOptions(**options), ProjectSummary(out=options["out"])))


project.__signature__ = options_signature(ProjectOptions, PROJECT_OPTIONS, extra=(HF_DATASET,))


app.command()(project)


def factors(**options) -> None:
    """Each layer's Kronecker factors over the training data, for project --factors (EK-FAC influence)."""
    from ..jobs.factors import FactorsSummary, merge_factors, run_factors

    merge, parts = options.pop("merge"), options.pop("parts")
    if merge or parts:
        if not merge or not parts:
            raise GhostprojError("Part files are summed with --merge --out F PART...; give both.")
        totals = merge_factors(options["out"], parts, options["overwrite"])
        console_err().print(f"merged {len(parts)} parts ({totals.examples} examples) into {markup_safe(options['out'])}")
        return
    options["model"], options["data"] = default_model_and_data(options["model"], options["data"])
    options["layers"] = split_list(options["layers"])
    s = with_notes(run_factors, FactorsOptions(**options), FactorsSummary(out=options["out"]))
    console_out().print(f"[green]done[/green]: factors of {s.layers} layers over {s.examples} examples "
                     f"({s.positions} positions) in {s.seconds:.1f} s; wrote {markup_safe(s.out)}", soft_wrap=True)


factors.__signature__ = options_signature(FactorsOptions, FACTORS_OPTIONS, extra=FACTORS_EXTRA)


app.command()(factors)


@app.command("naive-check")
@with_source
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
    rank: int = typer.Option(defaults.RANK, help="Per-layer budget.", rich_help_panel=PROJECTION),
    projector: str = typer.Option(defaults.PROJECTOR, help="gaussian, rademacher or orthonormal.", rich_help_panel=PROJECTION),
    seed: int = typer.Option(0, help="Projector seed.", rich_help_panel=PROJECTION),
    loss_reduction: str = typer.Option(defaults.LOSS_REDUCTION, help="mean or sum.", rich_help_panel=PROJECTION),
    bias: bool = typer.Option(False, "--bias/--no-bias", help="Include layer biases.", rich_help_panel=PROJECTION),
    tolerance: Optional[float] = typer.Option(None, help="Max relative error.", rich_help_panel=RUN,
                                              show_default="1e-4; 2e-2 for 16-bit models"),
    factors: FactorsOpt = None,
    device: DeviceOpt = "auto",
) -> None:
    """Prove the engine equals the slow exact computation on your model and data."""
    from ..jobs.checks import run_naive_check

    model, data, fields = source.resolved()
    result = run_naive_check(model, data, split_list(layers), samples=samples, rank=rank, projector=projector,
                             seed=seed, loss_reduction=loss_reduction, bias=bias, max_length=max_length,
                             dtype=dtype, device=device, tolerance=tolerance, adapter=adapter,
                             include_embeddings=include_embeddings, factors=factors, **fields)
    if not report_naive_check(result):
        raise typer.Exit(1)


@app.command("non-interf")
@with_source
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
    from ..jobs.checks import run_non_interference

    model, data, fields = source.resolved()
    result = run_non_interference(model, data, split_list(layers), steps=steps, batch_size=batch_size, lr=lr,
                                  optimizer=optimizer, max_length=max_length, device=device, **fields)
    if not report_non_interference(result, steps, optimizer, tolerance):
        raise typer.Exit(1)


@app.command()
@with_source
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
    from ..jobs.fidelity import run_fidelity_check

    model, data, fields = source.resolved()
    report = run_fidelity_check(model, data, split_list(layers), ranks, samples=samples, max_length=max_length,
                                dense=dense, seed=seed, device=device, factors=factors, **fields)
    report_fidelity(report, eigenbasis=factors is not None)


def inrun(**options) -> None:
    """Fine-tune with in-run data valuation: per-step gradient dot products with a validation batch."""
    from ..jobs.inrun import run_inrun

    show = options.pop("show")
    options["uncovered"] = "freeze" if options.pop("freeze_uncovered") else "error"
    if demo_in_place(options, "val") and options["val_size"] is None:
        options["val_size"] = 16
    res = run_inrun(InrunOptions(**options))
    print_notes(res.notes)
    report_inrun(res, show)


inrun.__signature__ = options_signature(InrunOptions, INRUN_OPTIONS, extra=INRUN_EXTRA)


app.command()(inrun)


def evaluate(**options) -> None:
    """Check attribution against retraining: the linear datamodeling score (LDS) of each scoring setting."""
    from ..jobs.evaluate import run_evaluate

    options["metrics"] = split_list(options.pop("metrics_list")) or []
    options["normalize"] = split_list(options.pop("normalize_list")) or []
    options["vectors"] = split_list(options.pop("vectors_list")) or []
    options["projection"] = split_list(options.pop("projection_list")) or []
    options["layers"] = split_list(options["layers"])
    demo_in_place(options, "query")
    res = run_evaluate(EvaluateOptions(**options))
    print_notes(res.notes)
    report_evaluate(res)


evaluate.__signature__ = options_signature(EvaluateOptions, EVALUATE_OPTIONS, extra=EVALUATE_EXTRA)


app.command()(evaluate)


@app.command()
def demo(
    out: str = typer.Option("ghostproj-demo", help="Directory for the demo's projection runs.",
                            rich_help_panel=OUTPUT),
    top_k: int = typer.Option(10, help="Matches per query.", rich_help_panel=SCORING),
    show: int = typer.Option(3, help="Queries whose matches are printed.", rich_help_panel=OUTPUT),
) -> None:
    """Project the embedded corpus, score held-out queries and show what ghostproj finds."""
    from ..jobs.demo import run_demo

    def report(train_run, query_run, result) -> None:
        console_out().print(f"[bold]Which training texts push the model like each query?[/bold] (the defaults: "
                            f"influence, --normalize layer, top {top_k})")
        report_scores(train_run, query_run, result, defaults.METRIC, None, show)

    report_demo(run_demo(out, top_k=top_k, log=console_err().print, report=report))
