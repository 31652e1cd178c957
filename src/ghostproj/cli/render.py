"""Everything the commands print about their results: tables and one-line summaries."""

from __future__ import annotations

from pathlib import Path

from .app import console_err, console_out, markup_safe, print_notes


def with_notes(run, options, summary):
    """``run(options, summary)``, printing the summary's notes also when the run is
    interrupted or refused: what was learnt is not lost."""
    try:
        run(options, summary)
    finally:
        print_notes(summary.notes)
    return summary


def report_project(s) -> None:
    from ..progress import human_bytes

    con, out = console_out(), markup_safe(s.out)
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
    if s.coverage:
        con.print(f"layers: {s.coverage}", soft_wrap=True)


def report_dry_run(r) -> None:
    from rich.table import Table

    from ..progress import human_bytes

    con = console_out()
    con.print(f"[bold]dry run[/bold]: {r.model}, {r.parameters:,} parameters; no weight loaded, nothing "
              "written", soft_wrap=True)
    con.print(f"layers: {r.layers} ({r.coverage}), D={r.dim}", soft_wrap=True)
    con.print(f"data: {r.examples} examples, {r.tokens} label tokens; store {human_bytes(r.store_bytes)} "
              f"({r.store_dtype})", soft_wrap=True)
    if not r.estimates:
        print_notes(r.notes)
        return
    table = Table(title=f"memory per device at the largest batch ({r.batch[0]} x {r.batch[1]} tokens), estimated")
    for column in ("setting", "parameters", "activations", "engine", "total"):
        table.add_column(column, justify="left" if column == "setting" else "right")
    for e in r.estimates:
        table.add_row(e.setting, *(human_bytes(v) for v in (e.parameters, e.activations, e.engine, e.total)))
    con.print(table)
    print_notes(r.notes)


def error_table(title: str, rows, tolerance: float):
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


def report_evaluate(res) -> None:
    from rich.table import Table

    con = console_out()
    if not res.finished and res.rank is not None:
        con.print(f"rank {res.rank}: trained {res.trained} subset model(s); rank 0 reports.")
        return
    if not res.finished:
        con.print(f"[green]done[/green]: trained {res.trained} subset model(s) of {res.subsets} into "
                  f"{markup_safe(res.out)}; run evaluate again without --part (same options) to report.")
        return
    table = Table(title=f"LDS over {res.subsets} subset models and {res.n_query} queries (95% bootstrap intervals)",
                  title_justify="left")
    for col in ("metric", "--normalize", "checkpoints", "LDS", "95% interval"):
        table.add_column(col, justify="left" if col in ("metric", "--normalize") else "right")
    for s in res.settings:
        mark = " *" if s is res.best else ""
        # in-run and TracIn come from every step of the whole-set run: no normalization
        steps = {"inrun": "all steps", "tracin": f"all steps, {s.checkpoints} windows"}.get(s.metric)
        table.add_row(s.metric + {"adam": " (adam)", "eigen": " (eigenbasis)"}.get(s.vectors, ""),
                      "-" if steps else s.normalize, steps or str(s.checkpoints),
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
              f"cached); wrote {markup_safe(res.out)}/lds.json" + (f" and {markup_safe(res.plot)}" if res.plot else ""))


def report_inrun(res, show: int) -> None:
    import torch
    from rich.table import Table

    from ..progress import shorten

    con = console_out()
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
              f"wrote {markup_safe(res.out)}/dots.safetensors, values.safetensors and model/")
    con.print(f"layers: {res.coverage}", soft_wrap=True)


def report_fidelity(report, eigenbasis: bool) -> None:
    from rich.table import Table

    con = console_out()
    table = Table(title=f"projected vs exact per-example gradient inner products ({report.examples} examples, "
                        f"{report.examples * (report.examples - 1) // 2} pairs)", title_justify="left")
    for col in ("rank", "D", "projection", "corr(ip)", "rel err(ip)", "corr(cos)", "abs err(cos)"):
        table.add_column(col, justify="left" if col == "projection" else "right")
    for rr in report.ranks:
        rows = [("eigenbasis" if eigenbasis else "kronecker", rr.total)] + ([("dense", rr.dense_total)] if rr.dense_total else [])
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


def report_index_build(built, size: int, recall, out: str) -> None:
    status = console_err()
    raw = built.rows * built.width * 4
    search_setting = (f" ({built.candidates} candidates per query)" if built.candidates
                      else f" (nprobe {built.nprobe})" if built.nprobe else "")
    status.print(f"[green]indexed[/green] {built.rows} rows of D={built.width} as {built.factory}{search_setting} "
                 f"in {built.seconds:.1f} s: {size / 2**20:.1f} MiB, "
                 f"{size / raw:.3f} of the float32 vectors; wrote {markup_safe(out)}")
    if recall is not None:
        status.print(f"recall@{recall.k} {recall.recall:.3f} on {recall.source}; "
                     f"{recall.index_qps:.0f} queries/s against {recall.exact_qps:.1f} exact "
                     f"({recall.index_qps / recall.exact_qps:.0f}x)")


def report_index_query(result, show: int, topk_out: str | None) -> None:
    status = console_err()
    for note in result.notes:
        status.print(f"[yellow]note:[/yellow] {markup_safe(note)}")
    con = console_out()
    for j in range(min(show, result.topk_train.shape[0])):
        found = result.topk_train[j] >= 0
        pairs = ", ".join(f"{int(i)} ({float(v):.4g})" for i, v in zip(result.topk_train[j][found],
                                                                       result.topk_scores[j][found]))
        con.print(f"query {int(result.query_index[j])}: {pairs}")
    status.print(f"[green]searched[/green] {result.query_index.numel()} queries in {result.seconds:.2f} s"
                 + (f"; wrote {markup_safe(topk_out)}" if topk_out else ""))


def report_naive_check(result) -> bool:
    """The engine's error per layer against the naive reference; True when all pass."""
    con = console_out()
    con.print(error_table(
        f"engine vs naive reference ({result.n_examples} examples, lengths {result.min_len}-{result.max_len}, "
        f"one padded batch)", [(e.name, e.max_rel, e.max_abs) for e in result.errors], result.tolerance))
    if not result.ok:
        con.print(f"[red]FAILED[/red]: relative error above {result.tolerance:g}.")
        return False
    con.print(f"[green]OK[/green]: every layer within {result.tolerance:g}.")
    return True


def report_non_interference(result, steps: int, optimizer: str, tolerance: float) -> bool:
    """Training with against without the engine; True when nothing differs."""
    con = console_out()
    con.print(error_table(f"training with vs without the engine ({steps} {optimizer} steps)",
                           [(c.name, c.max_rel, c.max_abs) for c in result.comparisons], tolerance))
    for problem in result.problems:
        con.print(f"[red]detach left something behind[/red]: {problem}")
    if result.problems or any(c.max_rel > tolerance for c in result.comparisons):
        con.print("[red]FAILED[/red]: the engine interfered with training.")
        return False
    con.print("[green]OK[/green]: identical losses, logits, gradients and parameters; detach restored the model.")
    return True


def score_reporter(metric: str, reduce: str | None, show: int):
    """What `score` shows of a result: the top-k table of the first ``show`` queries, and
    the best and worst selection scores."""
    def report(train_run, query_run, result) -> None:
        report_scores(train_run, query_run, result, metric, reduce, show)
    return report


def report_scores(train_run, query_run, result, metric: str, reduce: str | None, show: int) -> None:
    import torch
    from rich.table import Table

    from ..data.records import example_text, records_for_run
    from ..progress import shorten

    console, status = console_out(), console_err()
    train_records, train_why = records_for_run(train_run.manifest.data)
    query_records, _ = records_for_run(query_run.manifest.data)
    train_data, query_data = train_run.manifest.data, query_run.manifest.data
    if train_records is None:
        status.print(f"[dim]texts not shown: {train_why}[/dim]")

    def text(tidx: int) -> list[str]:
        return [shorten(example_text(train_records, tidx, train_data), 90)] if train_records is not None else []

    for j in range(min(show, result.topk_train.shape[0])):
        qidx = int(result.query_index[j])
        title = f"query {qidx}"
        if query_records is not None:
            title += ": " + shorten(example_text(query_records, qidx, query_data), 80)
        table = Table(title=title, title_justify="left")
        for col in ("rank", "train", metric) + (("text",) if train_records is not None else ()):
            table.add_column(col, justify="left" if col == "text" else "right")
        for r in range(result.topk_train.shape[1]):
            tidx = int(result.topk_train[j, r])
            table.add_row(str(r + 1), str(tidx), f"{float(result.topk_scores[j, r]):.4g}", *text(tidx))
        console.print(table)
    if reduce:
        order = torch.argsort(result.selection, descending=True)
        table = Table(title=f"selection scores (--reduce {reduce}): best and worst", title_justify="left")
        for col in ("", "train", "score") + (("text",) if train_records is not None else ()):
            table.add_column(col, justify="right" if col in ("train", "score") else "left")
        n = min(5, len(order))
        for label, rows in (("best", order[:n]), ("worst", order[-n:].flip(0))):
            for pos in rows.tolist():
                tidx = int(result.train_index[pos])
                table.add_row(label, str(tidx), f"{float(result.selection[pos]):.4g}", *text(tidx))
        console.print(table)


def report_demo(res) -> None:
    """The demo's same-topic precision of each metric and normalization, and what to try next."""
    from rich.table import Table

    console = console_out()
    baseline = res.precisions[("random", "none")]
    table = Table(title=f"same-topic precision@{res.top_k} over {res.queries} held-out queries "
                        f"(random: {baseline:.3f})", title_justify="left")
    table.add_column("metric")
    table.add_column("--normalize none", justify="right")
    table.add_column("--normalize layer", justify="right")
    for metric in ("cosine", "dot", "influence"):
        table.add_row(metric, *(f"{res.precisions[(metric, n)]:.3f}" for n in ("none", "layer")))
    console.print(table)
    console.print(f"Runs kept in {res.train_dir.parent}/ — try: ghostproj score {res.train_dir} {res.query_dir} --metric cosine "
                  "--top-k 5")


def report_run(path: str, report, hash_shards: bool) -> bool:
    """A verified run directory (or a lone shard file); True when the run is complete."""
    from rich.markup import escape
    from rich.table import Table

    from ..progress import human_bytes

    console = console_out()
    m = report.manifest
    checked = "verified (sha256)" if hash_shards else "checked (sizes and headers)"
    if Path(path).is_file() and m.model is None:
        console.print(f"[bold]{escape(path)}[/bold]: a shard file outside its run directory: {report.rows} rows, "
                      f"D={m.dim}, store {m.store_dtype}, fingerprint {m.fingerprint[:16] or 'none'}; "
                      "its header was checked (no manifest beside it records a sha256).")
        return True
    model, data = m.model or {}, m.data
    console.print(f"[bold]{escape(path)}[/bold]: model {escape(str(model.get('path', '?')))} "
                  f"({model.get('class', '?')}, {model.get('dtype', '?')}), data {escape(str(data.get('path', '?')))} "
                  f"({data.get('count', '?')} examples)")
    projector = m.projector or {}
    console.print(f"D={m.dim}, store {m.store_dtype}, projector {projector.get('kind', '?')} seed "
                  f"{projector.get('seed', '?')}, loss {m.loss_reduction or '?'}, bias {'?' if m.bias is None else m.bias}, "
                  f"fingerprint {m.fingerprint[:16]}")
    if m.coverage:
        from ..engines.coverage import Coverage

        console.print(f"layers: {Coverage.from_json(m.coverage).describe()}", soft_wrap=True)
    table = Table()
    for col in ("layer", "type", "n_in", "n_out", "k_in", "k_out", "offset"):
        table.add_column(col, justify="left" if col in ("layer", "type") else "right")
    for layer in m.layers:
        table.add_row(*(escape(str(getattr(layer, c))) for c in ("name", "type", "n_in", "n_out", "k_in", "k_out", "offset")))
    console.print(table)
    complete = m.complete
    state = "complete" if complete else "INCOMPLETE (rerun the same project command to resume; exit code 3)"
    console.print(f"{report.rows} rows in {len(m.shards)} shards, {human_bytes(report.bytes)}, {state}; "
                  f"shards {checked}.")
    return complete


def report_fisher(opts, result) -> None:
    if opts.merge:
        console_err().print(f"merged {len(opts.paths) - 1} parts ({result.count} rows) into "
                            f"{markup_safe(opts.paths[0])}")
        return
    what = f"part {opts.part} of {opts.num_parts}, " if opts.num_parts > 1 else ""
    console_err().print(f"[green]wrote[/green] {markup_safe(opts.out)}: {what}{result.count} rows, "
                        f"{len(result.sums)} block(s)")


def report_merged_scores(opts, result) -> None:
    console_err().print(f"merged {len(opts.parts)} parts ({result.train_index.numel()} training rows)"
                        + "".join(f"; wrote {markup_safe(p)}" for p in (opts.out, opts.topk_out, opts.select_out) if p))
