"""The embedded corpus: real English that every machine with Python already has, the
docstrings of standard-library modules, labelled by the topic of their module.

Template sentences make every metric look perfect; these texts share vocabulary across
topics ("Return a list of ...") and differ in length and style, so the metrics separate
as they do on real data.
"""

from __future__ import annotations

import importlib
import inspect
import random

MODULES = {  # topic -> standard-library modules whose docstrings form it
    "text processing": ["re", "string", "textwrap", "difflib", "unicodedata", "shlex", "fnmatch"],
    "numbers": ["math", "statistics", "decimal", "fractions", "cmath"],
    "dates": ["datetime", "calendar", "time", "zoneinfo", "locale"],
    "files": ["os.path", "shutil", "glob", "tempfile", "pathlib"],
    "networking": ["socket", "ssl", "urllib.request", "http.client", "ftplib"],
    "concurrency": ["threading", "multiprocessing", "asyncio", "queue", "concurrent.futures"],
    "email": ["email.message", "email.utils", "email.header", "email.parser", "smtplib", "imaplib", "poplib",
              "mailbox"],
    "data formats": ["json", "csv", "pickle", "configparser", "xml.etree.ElementTree"],
}


def _first_paragraph(obj) -> str:
    doc = inspect.getdoc(obj) or ""
    return " ".join(doc.split("\n\n")[0].split())


def _documented(mod, module_name: str, members: bool):
    """Public functions and classes of a module, with their methods when ``members``."""
    for attr in sorted(dir(mod)):
        if attr.startswith("_"):
            continue
        obj = getattr(mod, attr, None)
        if not (inspect.isfunction(obj) or inspect.isclass(obj) or inspect.isbuiltin(obj)):
            continue
        yield obj
        defined_here = getattr(obj, "__module__", "").split(".")[0] == module_name.split(".")[0]
        if members and inspect.isclass(obj) and defined_here:
            for name in sorted(vars(obj)):
                if not name.startswith("_"):
                    yield getattr(obj, name, None)


def stdlib_texts(min_words: int = 8, max_words: int = 60, members: bool = False) -> list[dict]:
    """{"text", "topic"} rows, one per documented object (first paragraph of its docstring,
    ``min_words`` to ``max_words`` words), in a fixed order; each text once."""
    rows = []
    for topic, names in MODULES.items():
        for name in names:
            try:
                mod = importlib.import_module(name)
            except ImportError:
                continue
            for obj in _documented(mod, name, members):
                text = _first_paragraph(obj) if obj is not None else ""
                if min_words <= len(text.split()) <= max_words:
                    rows.append({"text": text, "topic": topic})
    unique: dict[str, dict] = {}
    for row in rows:  # re-exported objects appear in several modules: the first topic keeps them
        unique.setdefault(row["text"], row)
    return list(unique.values())


def demo_splits(per_topic: int = 120, queries_per_topic: int = 20, seed: int = 0) -> tuple[list[dict], list[dict]]:
    """(training rows, query rows): at most ``per_topic`` texts of each topic, of which
    ``queries_per_topic`` are held out as queries; seeded, so every build is the same for
    one Python version."""
    by_topic: dict[str, list[dict]] = {}
    for row in stdlib_texts(min_words=6, members=True):
        by_topic.setdefault(row["topic"], []).append(row)
    rng = random.Random(seed)
    train, query = [], []
    for topic in sorted(by_topic):
        rows = by_topic[topic][:]
        rng.shuffle(rows)
        rows = rows[:per_topic]
        query += [dict(r, split="query") for r in rows[:queries_per_topic]]
        train += [dict(r, split="train") for r in rows[queries_per_topic:]]
    rng.shuffle(train)
    return train, query
