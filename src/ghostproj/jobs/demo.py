"""The embedded default: a corpus of real text by topic (see :mod:`ghostproj.demo_corpus`), a
BPE tokenizer trained on it and a tiny GPT-2 trained on it, built once and cached, so every
command runs with no arguments and no network."""

from __future__ import annotations

import json
import os
import random
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from ..data.demo_corpus import demo_splits
from ..errors import GhostprojError

DEMO_VERSION = 2  # 2: real text (standard-library docstrings) instead of template sentences
EOS = "<|endoftext|>"


def train_tokenizer(texts: list[str], vocab_size: int = 1024):
    """A byte-level BPE tokenizer trained on ``texts``, wrapped for transformers."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS, bos_token=EOS, unk_token=EOS, pad_token=EOS)


def tiny_gpt2(vocab_size: int, n_layer: int = 2, n_embd: int = 64, n_head: int = 4, n_positions: int = 64,
              eos_id: int = 0):
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = GPT2Config(vocab_size=vocab_size, n_positions=n_positions, n_embd=n_embd, n_layer=n_layer,
                     n_head=n_head, bos_token_id=eos_id, eos_token_id=eos_id, pad_token_id=eos_id)
    return GPT2LMHeadModel(cfg)


def train_lm(model, tokenizer, texts: list[str], steps: int = 300, batch_size: int = 32, lr: float = 3e-3,
             seed: int = 0, show_progress: bool = False) -> float:
    """Train ``model`` on ``texts`` with the plain HF loss; returns the final loss."""
    from ..data.batching import Example, collate
    from ..progress import RateProgress

    torch.manual_seed(seed)
    rng = random.Random(seed)
    ids = [tokenizer(t)["input_ids"][:64] for t in texts]
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.1)
    model.train()
    loss = torch.tensor(float("nan"))
    with RateProgress("training the demo model", total=steps, unit="steps", extra_unit=None,
                      enabled=show_progress) as bar:
        for _ in range(steps):
            batch = collate([Example(0, ids[rng.randrange(len(ids))]) for _ in range(batch_size)],
                            tokenizer.pad_token_id)
            out = model(**batch.model_inputs(), labels=batch.labels)
            opt.zero_grad(set_to_none=True)
            out.loss.backward()
            opt.step()
            sched.step()
            loss = out.loss.detach()
            bar.advance(1)
    model.eval()
    return float(loss)


def home() -> Path:
    env = os.environ.get("GHOSTPROJ_HOME")
    if env:
        return Path(env).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "ghostproj"


@dataclass
class DemoAssets:
    root: Path

    @property
    def model(self) -> Path:
        return self.root / "model"

    @property
    def train(self) -> Path:
        return self.root / "train.jsonl"

    @property
    def query(self) -> Path:
        return self.root / "query.jsonl"


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")


def ensure_demo(log=None) -> DemoAssets:
    """Build the embedded default once (corpus, tokenizer, model) and return its paths."""
    assets = DemoAssets(home() / f"demo-v{DEMO_VERSION}")
    if (assets.root / "READY").exists():
        return assets
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    say = log or (lambda msg: None)
    say("Building the embedded demo model (once; cached in " + str(assets.root) + ") ...")
    t0 = time.perf_counter()
    assets.root.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".demo-build-", dir=assets.root.parent))
    try:
        train_rows, query_rows = demo_splits()
        tokenizer = train_tokenizer([r["text"] for r in train_rows])
        torch.manual_seed(0)
        model = tiny_gpt2(len(tokenizer), eos_id=tokenizer.eos_token_id)
        loss = train_lm(model, tokenizer, [r["text"] for r in train_rows], show_progress=log is not None)
        model.save_pretrained(tmp / "model")
        tokenizer.save_pretrained(tmp / "model")
        _write_jsonl(tmp / "train.jsonl", train_rows)
        _write_jsonl(tmp / "query.jsonl", query_rows)
        (tmp / "READY").write_text(json.dumps({"version": DEMO_VERSION, "final_loss": loss}) + "\n")
        try:
            os.replace(tmp, assets.root)
        except OSError:  # another process finished first, or a stale partial build is in the way
            if (assets.root / "READY").exists():
                shutil.rmtree(tmp, ignore_errors=True)
            else:
                shutil.rmtree(assets.root, ignore_errors=True)
                os.replace(tmp, assets.root)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    say(f"Demo model ready in {time.perf_counter() - t0:.0f} s (final training loss {loss:.2f}).")
    return assets


def topic_precision(result, train_topics: dict[int, str], query_topics: dict[int, str]) -> float:
    """Mean fraction of each query's top-k training examples that share its topic."""
    hits = []
    for j in range(result.topk_train.shape[0]):
        topic = query_topics[int(result.query_index[j])]
        hits.append(sum(train_topics[int(i)] == topic for i in result.topk_train[j].tolist()) / result.topk_train.shape[1])
    return sum(hits) / len(hits)


@dataclass
class DemoResult:
    precisions: dict  # (metric, normalize) -> same-topic precision@k; ("random", "none"): the baseline
    top_k: int
    queries: int
    train_dir: Path
    query_dir: Path


@dataclass
class DemoOptions:
    """Options of ``ghostproj demo``."""

    out: str = "ghostproj-demo"
    top_k: int = 10

    def __post_init__(self):
        if self.top_k < 1:
            raise GhostprojError(f"--top-k must be at least 1, got {self.top_k}.")


def run_demo(opts: DemoOptions, log=None, report=None) -> DemoResult:
    """Project the demo's training and query splits, score them with the defaults
    (``report(train_run, query_run, result)`` shows the matches), and measure the same-topic
    precision@k of each metric and normalization next to the random baseline."""
    from ..data.records import read_records
    from ..scoring.score import score
    from .project import ProjectOptions, run_project
    from .score import ScoreOptions, run_score_command

    log = log or (lambda message: None)
    top_k = opts.top_k
    assets = ensure_demo(lambda m: log(f"[dim]{m}[/dim]"))
    out = Path(opts.out)
    train_dir, query_dir = out / "train.st", out / "query.st"
    for data, run_dir, like in ((assets.train, train_dir, None), (assets.query, query_dir, train_dir)):
        s = run_project(ProjectOptions(model=str(assets.model), data=str(data), out=str(run_dir),
                                       like=str(like) if like else None, batch_size=16, max_length=64))
        log(f"[dim]projected {s.examples} examples into {run_dir} (D={s.dim}"
            f"{', reused' if s.already_complete else f', {s.seconds:.1f} s'})[/dim]")
    run_score_command(ScoreOptions(runs=[str(train_dir), str(query_dir)], top_k=top_k, chunk_rows=8192), report,
                      log)

    train_topics = {i: r["topic"] for i, r in enumerate(read_records(assets.train).rows)}
    query_topics = {i: r["topic"] for i, r in enumerate(read_records(assets.query).rows)}
    precisions = {}
    for metric in ("cosine", "dot", "influence"):
        for normalize in ("none", "layer"):
            result = score(train_dir, query_dir, metric=metric, normalize=normalize, top_k=top_k)
            precisions[(metric, normalize)] = topic_precision(result, train_topics, query_topics)
    counts: dict[str, int] = {}
    for t in train_topics.values():
        counts[t] = counts.get(t, 0) + 1
    precisions[("random", "none")] = sum(counts[t] / len(train_topics) for t in query_topics.values()) / len(
        query_topics)
    return DemoResult(precisions, top_k, len(query_topics), train_dir, query_dir)
