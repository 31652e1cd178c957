"""The ``ghostproj`` command line: one small function per command, no maths here."""

from __future__ import annotations

import os
import sys
from typing import Optional

import typer

from .errors import GhostprojError

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="Per-example gradient projection and influence scoring for transformer language models.",
)

LayersOpt = typer.Option(None, "--layers", help="Comma-separated module-name patterns (substring, or re:REGEX).")


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


def _default_model_and_data(model: Optional[str], data: Optional[str]) -> tuple[str, str]:
    """The embedded demo model and corpus stand in for whatever the user left out."""
    if model is not None and data is not None:
        return model, data
    if model is not None and data is None:
        raise GhostprojError("--model was given without --data; pass the data to project too.")
    from .demo import ensure_demo

    assets = ensure_demo(lambda m: _status().print(f"[dim]{m}[/dim]"))
    return str(assets.model), data if data is not None else str(assets.train)


def _human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1024 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TB"


@app.command()
def project(
    model: Optional[str] = typer.Option(None, help="Model directory or hub id (default: the embedded demo model)."),
    data: Optional[str] = typer.Option(None, help="JSONL (text field) or plain-text file, one example per line."),
    out: str = typer.Option("train.st", help="Output run directory."),
    layers: Optional[str] = LayersOpt,
    rank: Optional[int] = typer.Option(None, help="Per-layer budget r: k_in * k_out <= r (default 256)."),
    rank_min: Optional[int] = typer.Option(None, help="Smallest k_in / k_out (default 1)."),
    rank_in: Optional[int] = typer.Option(None, help="Fix k_in for every layer."),
    rank_out: Optional[int] = typer.Option(None, help="Fix k_out for every layer."),
    projector: Optional[str] = typer.Option(None, help="gaussian (default), rademacher or orthonormal."),
    seed: Optional[int] = typer.Option(None, help="Projector seed (default 0)."),
    like: Optional[str] = typer.Option(None, help="Reuse layers, k's, matrices and loss settings of this run."),
    batch_size: int = typer.Option(8, help="Examples per batch."),
    max_length: int = typer.Option(512, help="Truncate examples to this many tokens."),
    loss_reduction: Optional[str] = typer.Option(None, help="Per-example loss: mean (default) or sum over tokens."),
    bias: Optional[bool] = typer.Option(None, "--bias/--no-bias", help="Include layer biases."),
    store_dtype: str = typer.Option("bfloat16", help="bfloat16, float16 or float32."),
    shard_size: int = typer.Option(4096, help="Rows per shard file."),
    device: str = typer.Option("auto", help="auto, cpu or cuda."),
    dtype: str = typer.Option("float32", help="Model weights: float32, bfloat16 or float16."),
    text_field: str = typer.Option("text", help="JSONL field holding the text."),
    prompt_field: Optional[str] = typer.Option(None, help="JSONL field of the prompt (no loss on its tokens)."),
    completion_field: Optional[str] = typer.Option(None, help="JSONL field of the completion (carries the loss)."),
    messages_field: Optional[str] = typer.Option(None, help="JSONL field of a chat (loss on assistant turns)."),
    format: str = typer.Option("auto", "--format", help="auto, jsonl, text, bin, parquet or hf."),
    token_dtype: Optional[str] = typer.Option(None, help=".bin token width: uint16 or uint32 (default by vocab)."),
    hf_dataset: Optional[str] = typer.Option(None, help="HF dataset name or saved directory (needs the data extra)."),
    split: str = typer.Option("train", help="Split of --hf-dataset."),
    token_budget: Optional[int] = typer.Option(None, help="Batch by length buckets up to N padded tokens."),
    include_embeddings: bool = typer.Option(False, help="Also project nn.Embedding layers (default set)."),
    revision: Optional[str] = typer.Option(None, help="Model revision (hub models)."),
    adapter: Optional[str] = typer.Option(None, help="PEFT LoRA adapter directory (needs the peft extra)."),
    num_shards: int = typer.Option(1, help="Job arrays: split the examples into this many parts..."),
    shard_id: int = typer.Option(0, help="...and project this one (then: ghostproj inspect --merge)."),
    force: bool = typer.Option(False, help="Start even if the disk looks too small."),
    resume: bool = typer.Option(True, "--resume/--no-resume", help="Continue an interrupted run in --out."),
    compile_model: bool = typer.Option(False, "--compile", help="torch.compile the model (pays on long runs; "
                                 "compiles for seconds first and again for new shapes)."),
) -> None:
    """Project every example's loss gradient and write shards to OUT."""
    from .project import ProjectOptions, run_project

    if hf_dataset is not None:
        if data is not None:
            raise GhostprojError("Give either --data or --hf-dataset, not both.")
        data, format = hf_dataset, "hf"
        if model is None:
            raise GhostprojError("--hf-dataset needs --model.")
    model, data = _default_model_and_data(model, data)
    opts = ProjectOptions(
        model=model, data=data, out=out, layers=_split(layers), rank=rank, rank_min=rank_min, rank_in=rank_in,
        rank_out=rank_out, projector=projector, seed=seed, like=like, loss_reduction=loss_reduction, bias=bias,
        batch_size=batch_size, max_length=max_length, store_dtype=store_dtype, shard_size=shard_size,
        device=device, dtype=dtype, text_field=text_field, prompt_field=prompt_field,
        completion_field=completion_field, messages_field=messages_field, format=format, token_dtype=token_dtype,
        split=split, token_budget=token_budget, include_embeddings=include_embeddings, revision=revision,
        adapter=adapter, num_shards=num_shards, shard_id=shard_id, force=force,
        resume=resume, compile=compile_model,
    )
    s = run_project(opts)
    con = _console()
    for note in s.notes:
        _status().print(f"[yellow]note:[/yellow] {note}")
    if s.already_complete:
        con.print(f"{out} already holds this complete run ({s.examples} examples); nothing to do.", soft_wrap=True)
        return
    con.print(
        f"[green]done[/green]: {s.examples} examples, {s.tokens} label tokens, D={s.dim}, "
        f"{s.no_label} without label positions (zero vectors"
        + (f"; {s.prompt_too_long} of them skipped because the prompt fills --max-length" if s.prompt_too_long else "")
        + f"), {s.truncated} truncated, "
        f"{_human_bytes(s.bytes)} in {out}, {s.seconds:.1f} s",
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


@app.command("naive-check")
def naive_check(
    model: Optional[str] = typer.Option(None, help="Model directory (default: the embedded demo model)."),
    data: Optional[str] = typer.Option(None, help="Data file (default: the embedded demo corpus)."),
    layers: Optional[str] = LayersOpt,
    samples: int = typer.Option(8, help="Examples in the padded batch."),
    rank: int = typer.Option(256, help="Per-layer budget."),
    projector: str = typer.Option("gaussian", help="gaussian, rademacher or orthonormal."),
    seed: int = typer.Option(0, help="Projector seed."),
    loss_reduction: str = typer.Option("mean", help="mean or sum."),
    bias: bool = typer.Option(False, "--bias/--no-bias", help="Include layer biases."),
    max_length: int = typer.Option(512, help="Truncate examples to this many tokens."),
    dtype: str = typer.Option("float32", help="Model weights dtype."),
    device: str = typer.Option("auto", help="auto, cpu or cuda."),
    text_field: str = typer.Option("text", help="JSONL field holding the text."),
    tolerance: Optional[float] = typer.Option(None, help="Max relative error (default 1e-4, 5e-2 for 16-bit models)."),
    adapter: Optional[str] = typer.Option(None, help="PEFT LoRA adapter directory."),
    prompt_field: Optional[str] = typer.Option(None, help="JSONL field of the prompt (no loss on its tokens)."),
    completion_field: Optional[str] = typer.Option(None, help="JSONL field of the completion."),
    include_embeddings: bool = typer.Option(False, help="Also check nn.Embedding layers."),
) -> None:
    """Prove the engine equals the slow exact computation on your model and data."""
    from .checks import run_naive_check

    model, data = _default_model_and_data(model, data)
    result = run_naive_check(model, data, _split(layers), samples=samples, rank=rank, projector=projector,
                             seed=seed, loss_reduction=loss_reduction, bias=bias, max_length=max_length,
                             dtype=dtype, device=device, text_field=text_field, tolerance=tolerance,
                             adapter=adapter, prompt_field=prompt_field, completion_field=completion_field,
                             include_embeddings=include_embeddings)
    con = _console()
    con.print(_error_table(
        f"engine vs naive reference ({result.n_examples} examples, lengths {result.min_len}-{result.max_len}, "
        f"one padded batch)", [(e.name, e.max_rel, e.max_abs) for e in result.errors], result.tolerance))
    if not result.ok:
        con.print(f"[red]FAILED[/red]: relative error above {result.tolerance:g}.")
        raise typer.Exit(1)
    con.print(f"[green]OK[/green]: every layer within {result.tolerance:g}.")


@app.command("non-interf")
def non_interf(
    model: Optional[str] = typer.Option(None, help="Model directory (default: the embedded demo model)."),
    data: Optional[str] = typer.Option(None, help="Data file (default: the embedded demo corpus)."),
    layers: Optional[str] = LayersOpt,
    steps: int = typer.Option(3, help="Optimizer steps."),
    batch_size: int = typer.Option(4, help="Examples per step."),
    lr: float = typer.Option(1e-3, help="Learning rate."),
    optimizer: str = typer.Option("adamw", help="adamw or sgd."),
    max_length: int = typer.Option(128, help="Truncate examples to this many tokens."),
    device: str = typer.Option("auto", help="auto, cpu or cuda."),
    text_field: str = typer.Option("text", help="JSONL field holding the text."),
    tolerance: float = typer.Option(1e-6, help="Max relative difference."),
) -> None:
    """Prove attaching the engine changes nothing about training."""
    from .checks import run_non_interference

    model, data = _default_model_and_data(model, data)
    result = run_non_interference(model, data, _split(layers), steps=steps, batch_size=batch_size, lr=lr,
                                  optimizer=optimizer, max_length=max_length, device=device, text_field=text_field)
    con = _console()
    con.print(_error_table(f"training with vs without the engine ({steps} {optimizer} steps)",
                           [(c.what, c.max_rel, c.max_abs) for c in result.comparisons], tolerance))
    for problem in result.problems:
        con.print(f"[red]detach left something behind[/red]: {problem}")
    if result.problems or any(c.max_rel > tolerance for c in result.comparisons):
        con.print("[red]FAILED[/red]: the engine interfered with training.")
        raise typer.Exit(1)
    con.print("[green]OK[/green]: identical losses, logits, gradients and parameters; detach restored the model.")


@app.command()
def score(
    train: str = typer.Argument(..., help="Training run directory or shard file."),
    query: str = typer.Argument(..., help="Query run directory or shard file (projected with --like TRAIN)."),
    metric: str = typer.Option("cosine", help="cosine, dot, influence or influence-full."),
    normalize: Optional[str] = typer.Option(None, help="none, unit or layer (per-layer unit norm before combining)."),
    center: bool = typer.Option(False, "--center/--no-center", help="Subtract the training mean vector first."),
    damping: float = typer.Option(0.1, help="Influence damping: lambda_l = damping * mean diag F_l."),
    layers: Optional[str] = typer.Option(None, "--layers", help="Score only these projected layers (patterns)."),
    top_k: int = typer.Option(10, help="Best training examples kept per query."),
    show: int = typer.Option(3, help="Queries whose top-k table is printed (0: none)."),
    out: Optional[str] = typer.Option(None, help="Write the full scores matrix (safetensors)."),
    topk_out: Optional[str] = typer.Option(None, help="Write the top-k per query (JSONL)."),
    reduce: Optional[str] = typer.Option(None, help="One score per training example: mean or max."),
    group_field: Optional[str] = typer.Option(None, help="Query data field grouping queries for --reduce max."),
    select_out: Optional[str] = typer.Option(None, help="Write the per-example scores (.jsonl or .safetensors)."),
    chunk_rows: int = typer.Option(8192, help="Training rows read per chunk."),
) -> None:
    """Score training examples against query examples (similarity or influence)."""
    from .score_job import run_score_command

    run_score_command(
        train, query, metric=metric, normalize=normalize, center=center, damping=damping, layers=_split(layers),
        top_k=top_k, show=show, out=out, topk_out=topk_out, reduce=reduce, group_field=group_field,
        select_out=select_out, chunk_rows=chunk_rows, console=_console(), status=_status(),
    )


@app.command()
def fidelity(
    model: Optional[str] = typer.Option(None, help="Model directory (default: the embedded demo model)."),
    data: Optional[str] = typer.Option(None, help="Data file (default: the embedded demo corpus)."),
    layers: Optional[str] = LayersOpt,
    ranks: str = typer.Option("64,256,1024", help="Per-layer ranks to compare."),
    samples: int = typer.Option(16, help="Calibration examples (exact gradients are held for these)."),
    max_length: int = typer.Option(512, help="Truncate examples to this many tokens."),
    dense: bool = typer.Option(True, "--dense/--no-dense", help="Also a dense Gaussian projection of equal size."),
    seed: int = typer.Option(0, help="Projector seed."),
    device: str = typer.Option("auto", help="auto, cpu or cuda."),
    text_field: str = typer.Option("text", help="JSONL field holding the text."),
) -> None:
    """How well projected inner products match exact ones, per rank and layer."""
    from rich.table import Table

    from .checks import pick_mixed_lengths
    from .data import read_records, tokenize_records
    from .fidelity import run_fidelity
    from .models import load_model, position_limit

    try:
        rank_list = [int(r) for r in ranks.split(",") if r.strip()]
    except ValueError:
        raise GhostprojError(f"--ranks must be comma-separated integers, got '{ranks}'.") from None
    model, data = _default_model_and_data(model, data)
    records = read_records(data)
    net, tokenizer = load_model(model, "float32", device)
    limit = position_limit(net)
    examples = pick_mixed_lengths(tokenize_records(records, tokenizer, min(max_length, limit or max_length),
                                                   text_field), samples)
    report = run_fidelity(net, examples, _split(layers), rank_list, dense=dense, seed=seed)
    con = _console()
    table = Table(title=f"projected vs exact per-example gradient inner products ({report.examples} examples, "
                        f"{report.examples * (report.examples - 1) // 2} pairs)", title_justify="left")
    for col in ("rank", "D", "projection", "corr(ip)", "rel err(ip)", "corr(cos)", "abs err(cos)"):
        table.add_column(col, justify="left" if col == "projection" else "right")
    for rr in report.ranks:
        rows = [("kronecker", rr.total)] + ([("dense", rr.dense_total)] if rr.dense_total else [])
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
def inrun(
    model: Optional[str] = typer.Option(None, help="Model directory (default: the embedded demo model)."),
    train: Optional[str] = typer.Option(None, help="Training data (default: the embedded demo corpus)."),
    val: Optional[str] = typer.Option(None, help="Validation data (default: the embedded demo queries)."),
    out: str = typer.Option("inrun-out", help="Output directory (dots, values, final model)."),
    steps: int = typer.Option(100, help="Optimizer steps."),
    batch_size: int = typer.Option(8, help="Training examples per step."),
    lr: float = typer.Option(1e-4, help="Learning rate."),
    optimizer: str = typer.Option("adamw", help="sgd or adamw."),
    val_size: Optional[int] = typer.Option(None, help="Use the first N validation examples."),
    seed: int = typer.Option(0, help="Seed of the batch order and dropout."),
    max_length: int = typer.Option(512, help="Truncate examples to this many tokens."),
    device: str = typer.Option("auto", help="auto, cpu or cuda."),
    text_field: str = typer.Option("text", help="JSONL field holding the text."),
    freeze_uncovered: bool = typer.Option(False, help="Freeze trainable parameters outside supported layers."),
    show: int = typer.Option(5, help="Most and least valuable examples printed."),
) -> None:
    """Fine-tune with in-run data valuation: per-step gradient dot products with a validation batch."""
    from rich.table import Table

    from .inrun import InrunOptions, run_inrun

    if model is None or train is None or val is None:
        if model is not None and (train is None or val is None):
            raise GhostprojError("--model was given without --train and --val.")
        from .demo import ensure_demo

        assets = ensure_demo(lambda m: _status().print(f"[dim]{m}[/dim]"))
        model = model or str(assets.model)
        train = train or str(assets.train)
        val = val or str(assets.query)
        if val_size is None:
            val_size = 16
    res = run_inrun(InrunOptions(model=model, train=train, val=val, out=out, steps=steps, batch_size=batch_size,
                                 lr=lr, optimizer=optimizer, val_size=val_size, seed=seed, max_length=max_length,
                                 device=device, text_field=text_field,
                                 uncovered="freeze" if freeze_uncovered else "error"))
    con = _console()
    seen = (res.counts > 0).nonzero().flatten()
    if show > 0 and len(seen):
        order = seen[torch_argsort(res.values[seen])]
        table = Table(title="in-run value = sum over steps of -lr * dot (negative: the example lowered the "
                            "validation loss)", title_justify="left")
        for col in ("", "train", "value", "steps drawn", "text"):
            table.add_column(col, justify="right" if col in ("train", "value", "steps drawn") else "left")
        n = min(show, len(order))
        for label, rows in (("most valuable", order[:n]), ("least valuable", order[-n:].flip(0))):
            for i in rows.tolist():
                table.add_row(label, str(i), f"{float(res.values[i]):.3e}", str(int(res.counts[i])),
                              _shorten(res.train_texts[i]))
        con.print(table)
    con.print(f"[green]done[/green]: {res.steps} steps over {res.train_count} training examples with a validation "
              f"batch of {res.val_count}; final training loss {res.final_loss:.3f}; {res.seconds:.1f} s; "
              f"wrote {res.out}/dots.safetensors, values.safetensors and model/")


def torch_argsort(values):
    import torch

    return torch.argsort(values)


def _shorten(text, width: int = 70) -> str:
    from rich.markup import escape

    text = " ".join(str(text).split())
    return escape(text if len(text) <= width else text[: width - 1] + "…")


@app.command()
def inspect(
    run_dirs: list[str] = typer.Argument(..., help="Run directory; with --merge: OUT then the part directories."),
    quick: bool = typer.Option(False, help="Skip hashing the shards."),
    merge: bool = typer.Option(False, help="Join the runs of --num-shards/--shard-id jobs into OUT."),
) -> None:
    """Show a run and verify its shards (or merge job-array parts into one run)."""
    from rich.table import Table

    from .store import merge_runs, verify_run

    if merge:
        if len(run_dirs) < 2:
            raise GhostprojError("--merge needs OUT followed by the part directories.")
        merge_runs(run_dirs[0], run_dirs[1:])
        _status().print(f"merged {len(run_dirs) - 1} parts into {run_dirs[0]}")
    elif len(run_dirs) != 1:
        raise GhostprojError("inspect takes one run directory (or --merge OUT PART...).")
    run_dir = run_dirs[0]
    report = verify_run(run_dir, hash_shards=not quick)
    m = report.manifest
    con = _console()
    con.print(f"[bold]{run_dir}[/bold]: model {m['model']['path']} ({m['model']['class']}, {m['model'].get('dtype')}), "
              f"data {m['data']['path']} ({m['data']['count']} examples)")
    con.print(f"D={m['dim']}, store {m['store_dtype']}, projector {m['projector']['kind']} seed {m['projector']['seed']}, "
              f"loss {m['loss_reduction']}, bias {m['bias']}, fingerprint {m['fingerprint'][:16]}")
    table = Table()
    for col in ("layer", "type", "n_in", "n_out", "k_in", "k_out", "offset"):
        table.add_column(col, justify="left" if col in ("layer", "type") else "right")
    for layer in m["layers"]:
        table.add_row(*(str(layer[c]) for c in ("name", "type", "n_in", "n_out", "k_in", "k_out", "offset")))
    con.print(table)
    state = "complete" if m.get("complete") else "INCOMPLETE (rerun the same project command to resume)"
    con.print(f"{report.rows} rows in {len(m['shards'])} shards, {_human_bytes(report.bytes)}, {state}; "
              f"shards {'verified (sha256)' if not quick else 'checked (sizes and headers)'}.")


@app.command()
def demo(
    out: str = typer.Option("ghostproj-demo", help="Directory for the demo's projection runs."),
    top_k: int = typer.Option(10, help="Matches per query."),
    show: int = typer.Option(3, help="Queries whose matches are printed."),
) -> None:
    """Project the embedded corpus, score held-out queries and show what ghostproj finds."""
    from .demo import run_demo

    run_demo(out, _console(), _status(), top_k=top_k, show=show)


def main(argv: list[str] | None = None) -> None:
    """Entry point: user errors become one sentence on stderr and a non-zero exit."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        app(args=argv)  # standalone: usage errors print usage and exit 2
    except GhostprojError as exc:
        from rich.markup import escape

        _status().print(f"[red]error:[/red] {escape(str(exc))}", highlight=False)
        sys.exit(2)
    except KeyboardInterrupt:
        _status().print("[yellow]interrupted[/yellow]: every shard already written is kept; rerun to resume.")
        sys.exit(130)
    except OSError as exc:
        _status().print(f"[red]error:[/red] {exc.strerror or exc} ({exc.filename or 'file system'}).", highlight=False)
        sys.exit(2)


if __name__ == "__main__":
    main()
