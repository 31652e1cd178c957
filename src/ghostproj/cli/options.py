"""Every command's options, declared once: the shared option types, the declarations
(flags, help, panel) that the options dataclasses' fields get on the command line, and the
one mechanism that turns a dataclass and its declarations into a command's signature."""

from __future__ import annotations

import dataclasses
import inspect
from typing import Annotated, Optional, get_type_hints

import typer

from .. import defaults
from ..errors import GhostprojError
from .app import DATA, DEMO_DATA, DEMO_MODEL, MODEL, OUTPUT, PROJECTION, RUN, SCORING, console_err


def opt(*flags: str, help: str, panel: str, default: str | None = None):
    """A command-line option's flags, one-line help, panel and (for None defaults) the
    default in words; the default itself is the parameter's (or the options field's)."""
    return typer.Option(*flags, help=help, rich_help_panel=panel,
                        **({"show_default": default} if default is not None else {}))

# Options several commands share, declared once.
ModelOpt = Annotated[Optional[str], opt(help="Model directory or hub id.", panel=MODEL, default=DEMO_MODEL)]


DATA_HELP = "JSONL, plain text (one example per line), .bin, Parquet."


DataOpt = Annotated[Optional[str], opt(help=DATA_HELP, panel=DATA, default=DEMO_DATA)]


TrainOpt = Annotated[Optional[str], opt(help=DATA_HELP, panel=DATA, default=DEMO_DATA)]


ValOpt = Annotated[Optional[str], opt(help=DATA_HELP, panel=DATA, default="the embedded demo queries")]


TextFieldOpt = Annotated[Optional[str], opt(help="JSONL field holding the text.", panel=DATA,
                                             default="from the first row: text, prompt+completion or messages")]


PromptFieldOpt = Annotated[Optional[str], opt(help="Field of the prompt (no loss on its tokens).", panel=DATA,
                                               default="'prompt' when the first row has it")]


CompletionFieldOpt = Annotated[Optional[str], opt(help="Field of the completion (carries the loss).", panel=DATA,
                                                   default="'completion' when the first row has it")]


MessagesFieldOpt = Annotated[Optional[str], opt(help="Field of a chat (loss on assistant turns only).", panel=DATA,
                                                 default="'messages' when the first row has it")]


MaxLengthOpt = Annotated[int, opt(help="Truncate examples to this many tokens.", panel=DATA)]


LayersOpt = Annotated[Optional[str], opt("--layers", help="Module-name patterns, comma-separated (substring, or "
                                          "re:REGEX).", panel=PROJECTION,
                                          default="every Linear / Conv1D but the output head")]


DeviceOpt = Annotated[str, opt(help="auto, cpu or cuda.", panel=RUN)]


CheckpointingOpt = Annotated[bool, opt("--gradient-checkpointing", panel=RUN,
                                       help="Recompute each decoder layer's activations in the backward pass: less "
                                            "memory, for a larger --token-budget.")]


FactorsOpt = Annotated[Optional[str], opt(help="Kronecker factors (`ghostproj factors`): check their eigenbasis, "
                                           "as project --factors uses it.", panel=PROJECTION, default="none")]


DtypeOpt = Annotated[str, opt(help="Model weights: float32, bfloat16 or float16.", panel=MODEL)]


ScoreDeviceOpt = Annotated[str, opt(help="auto, cpu or cuda: where the products run (auto: a GPU if there is one).",
                                     panel=RUN)]


ChunkRowsOpt = Annotated[Optional[int], opt(help="Training rows read per chunk.", panel=RUN,
                                             default="8192 on the CPU, ~256 MiB of rows on a GPU")]


TopkOutOpt = Annotated[Optional[str], opt(help="Write the top-k per query (JSONL).", panel=OUTPUT,
                                           default="not written")]


SelectOutOpt = Annotated[Optional[str], opt(help="Write the per-example scores (.jsonl or .safetensors).",
                                             panel=OUTPUT, default="not written")]


OverwriteOpt = Annotated[bool, opt("--overwrite", help="Replace output files that already exist.", panel=OUTPUT)]


def argument(name: str, help: str, kind=list[str], default=inspect.Parameter.empty, **kwargs) -> inspect.Parameter:
    """A positional argument a command takes besides its options dataclass's fields."""
    return inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=default,
                             annotation=Annotated[kind, typer.Argument(help=help, **kwargs)])


def extra_option(name: str, default, kind, *flags: str, help: str, panel: str) -> inspect.Parameter:
    """An option a command reads itself (how much to print, a list to split) rather than a field."""
    return inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=default,
                             annotation=Annotated[kind, opt(*flags, help=help, panel=panel)])


def in_panel(panel: str, **helps: str) -> dict:
    """Options of one help panel, each with its one-line help and nothing else to declare."""
    return {name: opt(help=text, panel=panel) for name, text in helps.items()}


def info(alias):
    """The typer.Option inside an Annotated alias."""
    return alias.__metadata__[0]


def split_list(value: Optional[str]) -> Optional[list[str]]:
    if value is None:
        return None
    parts = [p.strip() for p in value.split(",") if p.strip()]
    return parts or None


def default_model_and_data(model: Optional[str], data: Optional[str]) -> tuple[str, str]:
    """The embedded demo model and corpus stand in for whatever the user left out."""
    if model is not None and data is not None:
        return model, data
    if model is not None and data is None:
        raise GhostprojError("--model was given without --data; pass the data to project too.")
    from ..jobs.demo import ensure_demo

    assets = ensure_demo(lambda m: console_err().print(f"[dim]{m}[/dim]"))
    return str(assets.model), data if data is not None else str(assets.train)


def demo_in_place(options: dict, query_key: str) -> bool:
    """Put the embedded demo's model, training set and queries where they were not given
    (all three, or the data only around a --model); True when the demo is used."""
    if options["model"] is not None and options["train"] is not None and options[query_key] is not None:
        return False
    if options["model"] is not None:
        raise GhostprojError(f"--model was given without --train and --{query_key}.")
    from ..jobs.demo import ensure_demo

    assets = ensure_demo(lambda m: console_err().print(f"[dim]{m}[/dim]"))
    options["model"] = str(assets.model)
    options["train"] = options["train"] or str(assets.train)
    options[query_key] = options[query_key] or str(assets.query)
    return True


def options_signature(options_cls, declared: dict, extra: tuple = ()) -> inspect.Signature:
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
        default = f.default if f.default is not dataclasses.MISSING else inspect.Parameter.empty  # required
        params.append(inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, default=default,
                                        annotation=Annotated[cli_type or hints[f.name], info]))
    return inspect.Signature(params + list(extra), return_annotation=None)

# How a data file's rows become examples: the same flags wherever data is read.
LAYOUT_OPTIONS = {
    "text_field": info(TextFieldOpt),
    "prompt_field": info(PromptFieldOpt),
    "completion_field": info(CompletionFieldOpt),
    "messages_field": info(MessagesFieldOpt),
}

# `project`'s options: names, types and defaults are ProjectOptions' fields.
PROJECT_OPTIONS = {
    "model": info(ModelOpt),
    "dtype": info(DtypeOpt),
    "revision": opt(help="Model revision (hub models).", panel=MODEL, default="the default branch"),
    "adapter": opt(help="PEFT LoRA adapter directory (needs the peft extra).", panel=MODEL, default="none"),
    "data": info(DataOpt),
    "format": opt(help="auto (by suffix), jsonl, text, bin, parquet or hf.", panel=DATA),
    **LAYOUT_OPTIONS,
    "split": opt(help="Split of --hf-dataset.", panel=DATA),
    "token_dtype": opt(help=".bin token width: uint16 or uint32.", panel=DATA, default="by vocabulary size"),
    "max_length": info(MaxLengthOpt),
    "layers": (info(LayersOpt), Optional[str]),
    "include_embeddings": opt("--include-embeddings", help="Also project nn.Embedding layers.", panel=PROJECTION),
    "rank": opt(help="Per-layer budget r: k_in * k_out <= r.", panel=PROJECTION, default=str(defaults.RANK)),
    "rank_min": opt(help="Smallest k_in / k_out.", panel=PROJECTION, default="1"),
    "rank_in": opt(help="Fix k_in for every layer.", panel=PROJECTION, default="from --rank"),
    "rank_out": opt(help="Fix k_out for every layer.", panel=PROJECTION, default="from --rank"),
    "projector": opt(help="gaussian, rademacher or orthonormal.", panel=PROJECTION, default=defaults.PROJECTOR),
    "seed": opt(help="Projector seed.", panel=PROJECTION, default="0"),
    "loss_reduction": opt(help="Per-example loss: mean or sum over tokens.", panel=PROJECTION, default=defaults.LOSS_REDUCTION),
    "bias": opt("--bias/--no-bias", help="Include layer biases.", panel=PROJECTION, default="--no-bias"),
    "like": opt(help="Reuse layers, k's, matrices and loss settings of this run.", panel=PROJECTION,
                 default="none"),
    "out": opt(help="Output run directory.", panel=OUTPUT),
    "store_dtype": opt(help="bfloat16, float16 or float32.", panel=OUTPUT),
    "shard_size": opt(help="Rows per shard file.", panel=OUTPUT),
    "resume": opt("--resume/--no-resume", help="Continue an interrupted run in --out.", panel=OUTPUT),
    "verify": opt("--verify", help="On resume or rerun, hash every shard (not only the last).", panel=OUTPUT),
    "force": opt("--force", help="Start even if the disk looks too small.", panel=OUTPUT),
    "device": info(DeviceOpt),
    "batch_size": opt(help="Examples per batch.", panel=RUN),
    "token_budget": opt(help="Batch by length buckets up to N padded tokens.", panel=RUN,
                         default="fixed --batch-size"),
    "compile": opt("--compile", help="torch.compile the model (pays on long runs).", panel=RUN),
    "gradient_checkpointing": info(CheckpointingOpt),
    "fsdp": opt("--fsdp", panel=RUN, help="Under torchrun: shard the weights across the ranks (FSDP2); each rank "
                                          "projects its own rows."),
    "dry_run": opt("--dry-run", panel=RUN, help="Print the layers, coverage, D, store size and per-device memory "
                                                "estimates from the config alone; load no weights, write nothing."),
    "optimizer_state": opt(help="Adam moments (safetensors, or a torch optimizer checkpoint): project each "
                                 "example's Adam update direction instead of its gradient.", panel=PROJECTION,
                            default="raw gradients"),
    "factors": opt(help="Kronecker factors (`ghostproj factors`): project in their eigenbasis, for EK-FAC influence.",
                    panel=PROJECTION, default="random matrices"),
    "num_shards": opt(help="Job arrays: split the examples into this many parts.", panel=RUN),
    "shard_id": opt(help="Job arrays: the part to project (then inspect --merge).", panel=RUN),
}


HF_DATASET = inspect.Parameter(
    "hf_dataset", inspect.Parameter.KEYWORD_ONLY, default=None,
    annotation=Annotated[Optional[str], opt(help="HF dataset name or saved directory (needs the data extra).",
                                             panel=DATA, default="none")])


FACTORS_OPTIONS = {
    "model": info(ModelOpt),
    "dtype": info(DtypeOpt),
    "revision": PROJECT_OPTIONS["revision"],
    "data": info(DataOpt),
    "format": PROJECT_OPTIONS["format"],
    **LAYOUT_OPTIONS,
    "split": PROJECT_OPTIONS["split"],
    "token_dtype": PROJECT_OPTIONS["token_dtype"],
    "max_length": info(MaxLengthOpt),
    "layers": (info(LayersOpt), Optional[str]),
    "loss_reduction": opt(help="Per-example loss: mean or sum over tokens (as the runs that use them).",
                           panel=PROJECTION),
    "out": opt(help="The factors file (safetensors).", panel=OUTPUT),
    "overwrite": info(OverwriteOpt),
    "device": info(DeviceOpt),
    "batch_size": PROJECT_OPTIONS["batch_size"],
    "token_budget": PROJECT_OPTIONS["token_budget"],
    "num_shards": PROJECT_OPTIONS["num_shards"],
    "shard_id": opt(help="Job arrays: the part to sum (then factors --merge).", panel=RUN),
    "fisher_labels": opt(help="empirical: the data's own labels; sampled: labels drawn from the model (the true "
                          "Fisher).", panel=PROJECTION),
    "seed": opt(help="Seed of the sampled labels.", panel=PROJECTION),
    "memory_gb": opt(help="Host memory for one pass's float64 sums; layers beyond it are summed in further passes "
                     "over the data, each group's factors streamed to disk.", panel=RUN),
    "checkpoint_minutes": opt(help="Save the running sums this often, for a rerun to continue from (0: every "
                               "batch).", panel=RUN),
    "fsdp": opt("--fsdp", panel=RUN, help="Under torchrun: shard the weights across the ranks (FSDP2); each rank "
                                          "sums its own rows."),
}


FACTORS_EXTRA = (
    extra_option("merge", False, bool, "--merge", help="Sum the part files given as arguments into --out.",
                 panel=RUN),
    argument("parts", "With --merge: the factors files of the parts.", Optional[list[str]], default=None,
             show_default=False),
)


SOURCE_OPTIONS = {"model": info(ModelOpt), "data": info(DataOpt), **LAYOUT_OPTIONS}


INRUN_OPTIONS = {
    "model": info(ModelOpt),
    "train": info(TrainOpt),
    "val": info(ValOpt),
    **LAYOUT_OPTIONS,
    "val_size": opt(help="Use the first N validation examples.", panel=DATA, default="all; 16 for the demo"),
    "max_length": info(MaxLengthOpt),
    "out": opt(help="Output directory (dots, values, final model).", panel=OUTPUT),
    **in_panel(RUN, steps="Optimizer steps.", batch_size="Training examples per step.", lr="Learning rate.",
               optimizer="sgd or adamw.", seed="Seed of the batch order and dropout."),
    "device": info(DeviceOpt),
}


INRUN_EXTRA = (
    extra_option("freeze_uncovered", False, bool, "--freeze-uncovered",
                 help="Freeze trainable parameters outside supported layers.", panel=RUN),
    extra_option("show", 5, int, help="Most and least valuable examples printed.", panel=OUTPUT),
)


EVALUATE_OPTIONS = {
    "model": info(ModelOpt),
    "train": info(TrainOpt),
    "query": opt(help=DATA_HELP, panel=DATA, default="the embedded demo queries"),
    **LAYOUT_OPTIONS,
    "max_length": info(MaxLengthOpt),
    "out": opt(help="Output directory (cache of every model trained, runs, lds.json, lds.png).", panel=OUTPUT),
    **in_panel(RUN, subsets="Random training subsets, one fine-tuned model each.",
               fraction="Share of the training set in each subset.",
               epochs="Fine-tuning passes over a subset (and over the whole set).",
               lr="Fine-tuning learning rate (AdamW, linear decay).", batch_size="Fine-tuning and projection batch size.",
               seed="Seed of the subsets, batch order, dropout and bootstrap."),
    "checkpoints": opt(help="Checkpoints kept from the whole-set run; ensembles of 1, 2, 4, ... are compared.",
                        panel=SCORING),
    "layers": (info(LayersOpt), Optional[str]),
    "rank": opt(help="Per-layer projection budget, as for project.", panel=PROJECTION, default=str(defaults.RANK)),
    "damping": opt(help="Influence damping, as for score.", panel=SCORING),
    "fisher_labels": opt(help="--projection eigen: factors of the data's labels (empirical) or of labels drawn "
                          "from the model (sampled), as for factors.", panel=PROJECTION),
    "removal_queries": opt(help="Queries whose top-k examples are removed and the model retrained (0: none).",
                            panel=SCORING),
    "removal_k": opt(help="Examples removed per query.", panel=SCORING, default="5% of the training set"),
    "replicates": opt(help="Bootstrap resamples of subsets and queries for the intervals.", panel=SCORING),
    "num_parts": opt(help="Train the subsets in this many processes...", panel=RUN),
    "part": opt(help="...this one (then run once more without --part to report).", panel=RUN),
    "device": info(DeviceOpt),
}


EVALUATE_EXTRA = (
    extra_option("metrics_list", "cosine,dot,influence", str, "--metrics", panel=SCORING,
                 help="Scoring metrics compared: cosine, dot, influence; inrun adds the in-run values of the "
                      "whole-set fine-tuning, tracin TracIn-CP from a gradient store of it."),
    extra_option("normalize_list", "none,layer", str, "--normalize", help="Normalizations compared.", panel=SCORING),
    extra_option("projection_list", "gaussian", str, "--projection", panel=SCORING,
                 help="Projections compared: gaussian (random matrices); eigen adds the Kronecker eigenbasis of each "
                      "checkpoint's factors, scored with EK-FAC weights (influence)."),
    extra_option("vectors_list", "grad", str, "--vectors", panel=SCORING,
                 help="Training vectors compared: grad; adam adds Adam update directions at each checkpoint (LESS)."),
)


# The checks' options: names, types and defaults are their options dataclasses' fields.
NAIVE_CHECK_OPTIONS = {
    **SOURCE_OPTIONS,
    "dtype": info(DtypeOpt),
    "adapter": opt(help="PEFT LoRA adapter directory.", panel=MODEL, default="none"),
    "samples": opt(help="Examples in the padded batch.", panel=DATA),
    "max_length": info(MaxLengthOpt),
    "layers": (info(LayersOpt), Optional[str]),
    "include_embeddings": opt("--include-embeddings", help="Also check nn.Embedding layers.", panel=PROJECTION),
    "rank": opt(help="Per-layer budget.", panel=PROJECTION),
    "projector": opt(help="gaussian, rademacher or orthonormal.", panel=PROJECTION),
    "seed": opt(help="Projector seed.", panel=PROJECTION),
    "loss_reduction": opt(help="mean or sum.", panel=PROJECTION),
    "bias": opt("--bias/--no-bias", help="Include layer biases.", panel=PROJECTION),
    "tolerance": opt(help="Max relative error.", panel=RUN, default="1e-4; 2e-2 for 16-bit models"),
    "factors": info(FactorsOpt),
    "gradient_checkpointing": info(CheckpointingOpt),
    "device": info(DeviceOpt),
}
NON_INTERF_OPTIONS = {
    **SOURCE_OPTIONS,
    "max_length": info(MaxLengthOpt),
    "layers": (info(LayersOpt), Optional[str]),
    "steps": opt(help="Optimizer steps.", panel=RUN),
    "batch_size": opt(help="Examples per step.", panel=RUN),
    "lr": opt(help="Learning rate.", panel=RUN),
    "optimizer": opt(help="adamw or sgd.", panel=RUN),
    "tolerance": opt(help="Max relative difference.", panel=RUN),
    "device": info(DeviceOpt),
}
FIDELITY_OPTIONS = {
    **SOURCE_OPTIONS,
    "samples": opt(help="Calibration examples (exact gradients are held for these).", panel=DATA),
    "max_length": info(MaxLengthOpt),
    "layers": (info(LayersOpt), Optional[str]),
    "ranks": opt(help="Per-layer ranks to compare.", panel=PROJECTION),
    "dense": opt("--dense/--no-dense", help="Also a dense Gaussian projection of equal size.", panel=PROJECTION),
    "seed": opt(help="Projector seed.", panel=PROJECTION),
    "factors": info(FactorsOpt),
    "device": info(DeviceOpt),
}


DEMO_OPTIONS = {
    "out": opt(help="Directory for the demo's projection runs.", panel=OUTPUT),
    "top_k": opt(help="Matches per query.", panel=SCORING),
}
DEMO_EXTRA = (
    extra_option("show", 3, int, help="Queries whose matches are printed.", panel=OUTPUT),
)
