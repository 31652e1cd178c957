"""The commands that run a model: project, factors, the checks, inrun, evaluate, demo.
Each builds its options, runs its job and hands the result to :mod:`render`."""

from __future__ import annotations

import typer

from .. import defaults
from ..errors import GhostprojError
from ..jobs.checks import NaiveCheckOptions, NonInterferenceOptions
from ..jobs.demo import DemoOptions
from ..jobs.evaluate import EvaluateOptions
from ..jobs.factors import FactorsOptions
from ..jobs.fidelity import FidelityOptions
from ..jobs.inrun import InrunOptions
from ..jobs.project import ProjectOptions
from .app import app, console_err, console_out, markup_safe, print_notes
from .options import (
    DEMO_EXTRA,
    DEMO_OPTIONS,
    EVALUATE_EXTRA,
    EVALUATE_OPTIONS,
    FACTORS_EXTRA,
    FACTORS_OPTIONS,
    FIDELITY_OPTIONS,
    HF_DATASET,
    INRUN_EXTRA,
    INRUN_OPTIONS,
    NAIVE_CHECK_OPTIONS,
    NON_INTERF_OPTIONS,
    PROJECT_OPTIONS,
    default_model_and_data,
    demo_in_place,
    options_signature,
    split_list,
)
from .render import (
    report_demo,
    report_dry_run,
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
    if options["dry_run"]:
        from ..jobs.dry_run import run_dry_run

        report_dry_run(run_dry_run(ProjectOptions(**options)))
        return
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
    console_out().print(f"layers: {s.coverage}", soft_wrap=True)


factors.__signature__ = options_signature(FactorsOptions, FACTORS_OPTIONS, extra=FACTORS_EXTRA)


app.command()(factors)


def naive_check(**options) -> None:
    """Prove the engine equals the slow exact computation on your model and data."""
    from ..jobs.checks import NaiveCheckOptions, run_naive_check

    options["model"], options["data"] = default_model_and_data(options["model"], options["data"])
    options["layers"] = split_list(options["layers"])
    if not report_naive_check(run_naive_check(NaiveCheckOptions(**options))):
        raise typer.Exit(1)


def non_interf(**options) -> None:
    """Prove attaching the engine changes nothing about training."""
    from ..jobs.checks import NonInterferenceOptions, run_non_interference

    options["model"], options["data"] = default_model_and_data(options["model"], options["data"])
    options["layers"] = split_list(options["layers"])
    opts = NonInterferenceOptions(**options)
    if not report_non_interference(run_non_interference(opts), opts.steps, opts.optimizer, opts.tolerance):
        raise typer.Exit(1)


def fidelity(**options) -> None:
    """How well projected inner products match exact ones, per rank and layer."""
    from ..jobs.fidelity import FidelityOptions, run_fidelity_check

    options["model"], options["data"] = default_model_and_data(options["model"], options["data"])
    options["layers"] = split_list(options["layers"])
    opts = FidelityOptions(**options)
    report_fidelity(run_fidelity_check(opts), eigenbasis=opts.factors is not None)


naive_check.__signature__ = options_signature(NaiveCheckOptions, NAIVE_CHECK_OPTIONS)
non_interf.__signature__ = options_signature(NonInterferenceOptions, NON_INTERF_OPTIONS)
fidelity.__signature__ = options_signature(FidelityOptions, FIDELITY_OPTIONS)
app.command("naive-check")(naive_check)
app.command("non-interf")(non_interf)
app.command()(fidelity)


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


def demo(**options) -> None:
    """Project the embedded corpus, score held-out queries and show what ghostproj finds."""
    from ..jobs.demo import run_demo

    show = options.pop("show")
    opts = DemoOptions(**options)

    def report(train_run, query_run, result) -> None:
        console_out().print(f"[bold]Which training texts push the model like each query?[/bold] (the defaults: "
                            f"influence, --normalize layer, top {opts.top_k})")
        report_scores(train_run, query_run, result, defaults.METRIC, None, show)

    report_demo(run_demo(opts, log=console_err().print, report=report))


demo.__signature__ = options_signature(DemoOptions, DEMO_OPTIONS, extra=DEMO_EXTRA)
app.command()(demo)
