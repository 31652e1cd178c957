"""The embedded default: a generated topic corpus, a BPE tokenizer trained on it and a tiny
GPT-2 trained on it, built once and cached, so every command runs with no arguments and
no network."""

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

DEMO_VERSION = 1
TOPICS: dict[str, dict[str, list[str]]] = {
    "cooking": {
        "who": ["the chef", "my grandmother", "the baker", "a line cook", "the pastry chef"],
        "act": ["simmered", "roasted", "whisked", "seasoned", "baked", "chopped", "braised"],
        "what": ["the garlic", "a pot of lentil soup", "fresh basil", "the onions", "a loaf of sourdough",
                 "the tomato sauce", "butter and flour", "the chicken stock"],
        "where": ["in a cast iron pan", "over low heat", "in the oven", "on the stove", "in the kitchen"],
        "tail": ["until it smelled wonderful", "before adding salt and pepper", "for twenty minutes",
                 "and served it with rice", "while the dough was rising"],
    },
    "astronomy": {
        "who": ["the astronomer", "a space probe", "the telescope", "the observatory", "an amateur stargazer"],
        "act": ["observed", "photographed", "measured", "tracked", "detected", "mapped"],
        "what": ["a distant galaxy", "the rings of saturn", "a red giant star", "the comet", "a faint nebula",
                 "the orbit of the moon", "a cluster of stars", "an exoplanet"],
        "where": ["through the night sky", "beyond the solar system", "near the milky way", "in deep space",
                  "above the horizon"],
        "tail": ["during the lunar eclipse", "with an infrared camera", "light years from earth",
                 "as the planet crossed its star", "before the sun rose"],
    },
    "football": {
        "who": ["the striker", "the goalkeeper", "the coach", "the midfielder", "the home team"],
        "act": ["scored", "defended", "passed", "kicked", "headed", "blocked", "tackled"],
        "what": ["the ball", "a penalty", "the free kick", "a corner", "the final goal", "the match"],
        "where": ["into the net", "near the penalty box", "on the muddy pitch", "in the stadium",
                  "down the left wing"],
        "tail": ["in the last minute", "as the crowd cheered", "before half time", "to win the league",
                 "after the referee blew the whistle"],
    },
    "programming": {
        "who": ["the developer", "the compiler", "a junior engineer", "the test suite", "the programmer"],
        "act": ["refactored", "compiled", "debugged", "deployed", "optimized", "rewrote"],
        "what": ["the function", "a memory leak", "the database query", "the python script", "the api server",
                 "a recursive loop", "the unit tests"],
        "where": ["in the repository", "on the build server", "in production", "inside the container",
                  "in the source code"],
        "tail": ["before the release", "with fewer allocations", "after the code review",
                 "so the variable was never null", "and pushed the commit"],
    },
    "medicine": {
        "who": ["the doctor", "the nurse", "the surgeon", "a patient", "the pharmacist"],
        "act": ["diagnosed", "treated", "prescribed", "examined", "vaccinated", "monitored"],
        "what": ["the infection", "a broken arm", "high blood pressure", "the fever", "the antibiotics",
                 "a chronic cough", "the heart rate"],
        "where": ["at the hospital", "in the clinic", "in the emergency room", "at the pharmacy",
                  "during the checkup"],
        "tail": ["with a course of medicine", "after the blood test", "before the surgery",
                 "to reduce the symptoms", "and scheduled a follow up visit"],
    },
    "finance": {
        "who": ["the investor", "the bank", "the accountant", "a hedge fund", "the central bank"],
        "act": ["invested", "borrowed", "audited", "traded", "lent", "hedged"],
        "what": ["the stock portfolio", "a mortgage loan", "the quarterly earnings", "government bonds",
                 "the interest rate", "a savings account", "the tax return"],
        "where": ["on the stock market", "at the bank", "in the budget", "on wall street",
                  "in the balance sheet"],
        "tail": ["as inflation rose", "to reduce the risk", "before the market closed",
                 "with a high dividend", "after the recession"],
    },
    "gardening": {
        "who": ["the gardener", "my neighbour", "the farmer", "a volunteer", "the botanist"],
        "act": ["planted", "watered", "pruned", "harvested", "weeded", "fertilized"],
        "what": ["the roses", "a row of carrots", "the apple tree", "tulip bulbs", "the tomato plants",
                 "the vegetable seeds", "the hedge"],
        "where": ["in the garden", "in the greenhouse", "along the fence", "in the flower bed",
                  "in rich compost"],
        "tail": ["before the first frost", "after the spring rain", "in the morning sun",
                 "so the soil stayed moist", "and the bees came back"],
    },
    "music": {
        "who": ["the pianist", "the orchestra", "the drummer", "a young violinist", "the choir"],
        "act": ["played", "rehearsed", "composed", "performed", "recorded", "tuned"],
        "what": ["a symphony", "the melody", "the guitar solo", "a jazz ballad", "the opening chords",
                 "the sonata", "a new album"],
        "where": ["in the concert hall", "on stage", "in the studio", "at the festival",
                  "with the string section"],
        "tail": ["in a minor key", "as the audience applauded", "at a slow tempo",
                 "with perfect rhythm", "before the encore"],
    },
}
_TEMPLATES = [
    "{who} {act} {what} {where} {tail}.",
    "{who} {act} {what} {tail}.",
    "{where}, {who} {act} {what}.",
    "yesterday {who} {act} {what} {where}.",
    "{who} {act} {what} {where}, then {who2} {act2} {what2} {tail}.",
]
EOS = "<|endoftext|>"


def generate_corpus(per_topic: int = 400, seed: int = 0) -> list[dict]:
    """Deterministic topic-labelled short texts, shuffled."""
    rng = random.Random(seed)
    rows = []
    for topic, words in TOPICS.items():
        for _ in range(per_topic):
            template = rng.choice(_TEMPLATES)
            text = template.format(
                who=rng.choice(words["who"]),
                act=rng.choice(words["act"]),
                what=rng.choice(words["what"]),
                where=rng.choice(words["where"]),
                tail=rng.choice(words["tail"]),
                who2=rng.choice(words["who"]),
                act2=rng.choice(words["act"]),
                what2=rng.choice(words["what"]),
            )
            rows.append({"text": text[0].upper() + text[1:], "topic": topic})
    rng.shuffle(rows)
    return rows


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
             seed: int = 0) -> float:
    """Train ``model`` on ``texts`` with the plain HF loss; returns the final loss."""
    from .data import Example, collate

    torch.manual_seed(seed)
    rng = random.Random(seed)
    ids = [tokenizer(t)["input_ids"][:64] for t in texts]
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.1)
    model.train()
    loss = torch.tensor(float("nan"))
    for _ in range(steps):
        batch = collate([Example(0, ids[rng.randrange(len(ids))]) for _ in range(batch_size)],
                        tokenizer.pad_token_id)
        out = model(**batch.model_inputs(), labels=batch.labels)
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        opt.step()
        sched.step()
        loss = out.loss.detach()
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
        rows = generate_corpus()
        query_rows = [dict(r, split="query") for r in rows[:200]]
        train_rows = [dict(r, split="train") for r in rows[200:]]
        tokenizer = train_tokenizer([r["text"] for r in train_rows])
        torch.manual_seed(0)
        model = tiny_gpt2(len(tokenizer), eos_id=tokenizer.eos_token_id)
        loss = train_lm(model, tokenizer, [r["text"] for r in train_rows])
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


def run_demo(out: str | os.PathLike, console, status, top_k: int = 10, show: int = 3) -> dict[str, float]:
    """Project the demo's training and query splits, score them, print the best matches and
    same-topic precision@k of each metric next to the random baseline."""
    from rich.table import Table

    from .data import read_records
    from .project import ProjectOptions, run_project
    from .score_job import run_score_command
    from .scoring import score

    assets = ensure_demo(lambda m: status.print(f"[dim]{m}[/dim]"))
    out = Path(out)
    train_dir, query_dir = out / "train.st", out / "query.st"
    for data, run_dir, like in ((assets.train, train_dir, None), (assets.query, query_dir, train_dir)):
        s = run_project(ProjectOptions(model=str(assets.model), data=str(data), out=str(run_dir),
                                       like=str(like) if like else None, batch_size=16, max_length=64))
        status.print(f"[dim]projected {s.examples} examples into {run_dir} (D={s.dim}"
                     f"{', reused' if s.already_complete else f', {s.seconds:.1f} s'})[/dim]")
    console.print(f"[bold]Which training texts push the model like each query?[/bold] (cosine, top {top_k})")
    run_score_command(str(train_dir), str(query_dir), metric="cosine", normalize=None, center=False, damping=0.1,
                      layers=None, top_k=top_k, show=show, out=None, topk_out=None, reduce=None, group_field=None,
                      select_out=None, chunk_rows=8192, console=console, status=status)

    train_topics = {i: r["topic"] for i, r in enumerate(read_records(assets.train).rows)}
    query_topics = {i: r["topic"] for i, r in enumerate(read_records(assets.query).rows)}
    precisions = {}
    for metric in ("cosine", "dot", "influence"):
        result = score(train_dir, query_dir, metric=metric, top_k=top_k)
        precisions[metric] = topic_precision(result, train_topics, query_topics)
    counts: dict[str, int] = {}
    for t in train_topics.values():
        counts[t] = counts.get(t, 0) + 1
    baseline = sum(counts[t] / len(train_topics) for t in query_topics.values()) / len(query_topics)
    precisions["random"] = baseline
    table = Table(title=f"same-topic precision@{top_k} over {len(query_topics)} held-out queries", title_justify="left")
    table.add_column("metric")
    table.add_column(f"precision@{top_k}", justify="right")
    for name, value in precisions.items():
        table.add_row(name if name != "random" else "random baseline", f"{value:.3f}")
    console.print(table)
    console.print(f"Runs kept in {out}/ — try: ghostproj score {train_dir} {query_dir} --metric influence --top-k 5")
    return precisions
