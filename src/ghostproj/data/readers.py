"""Data readers behind one interface: a file (or hub dataset) in, tokenized examples out.

Formats: JSONL with a text field; JSONL with prompt/completion fields (only completion
tokens carry loss); chat JSONL with a ``messages`` list (only assistant turns carry loss);
plain text (one example per line); ``.bin`` token files (GPT-style memmap, cut into
``max_length`` blocks); Parquet and HF datasets through the optional ``data`` extra.
Every example keeps its row number in the input data.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..errors import GhostprojError
from .batching import Example, tokenize_records
from .records import Records, file_sha256, read_records, record_text

FORMATS = ("auto", "jsonl", "text", "bin", "parquet", "hf")


@dataclass
class LayoutFields:
    """Which fields of a data file hold the example (the command-line flags of every job
    that reads data; None everywhere: the layout is read from the first row)."""

    text_field: str | None = None
    prompt_field: str | None = None
    completion_field: str | None = None
    messages_field: str | None = None

    @property
    def fields(self) -> dict:
        return {"text_field": self.text_field, "prompt_field": self.prompt_field,
                "completion_field": self.completion_field, "messages_field": self.messages_field}


@dataclass
class DataSpec:
    path: str
    format: str = "auto"
    text_field: str | None = None  # None with no other field given: the layout is read from the first row
    prompt_field: str | None = None
    completion_field: str | None = None
    messages_field: str | None = None
    token_dtype: str | None = None  # uint16 | uint32 for .bin
    split: str = "train"  # hf datasets

    def resolved_format(self) -> str:
        if self.format not in FORMATS:
            raise GhostprojError(f"Unknown --format '{self.format}'; choose one of {', '.join(FORMATS)}.")
        if self.format != "auto":
            return self.format
        suffix = Path(self.path).suffix.lower()
        if suffix in (".jsonl", ".json", ".ndjson"):
            return "jsonl"
        if suffix == ".bin":
            return "bin"
        if suffix == ".parquet":
            return "parquet"
        return "text"

    def describe(self) -> dict:
        """What the manifest records about the data (everything that changes the examples)."""
        fmt = self.resolved_format()
        d = {"path": str(Path(self.path).resolve()) if fmt != "hf" else self.path, "format": fmt}
        if fmt in ("jsonl", "parquet", "hf"):
            if self.messages_field:
                d["messages_field"] = self.messages_field
            elif self.prompt_field:
                d["prompt_field"], d["completion_field"] = self.prompt_field, self.completion_field
            else:
                d["text_field"] = self.text_field or "text"
        if fmt == "bin":
            d["token_dtype"] = self.token_dtype
        if fmt == "hf":
            d["split"] = self.split
        return d


@dataclass
class LoadedData:
    examples: list[Example]
    records: Records | None  # raw rows, when the format has them
    sha256: str
    fields: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    prompt_too_long: int = 0  # prompt/completion rows whose prompt filled max_length


def load_examples(spec: DataSpec, tokenizer, max_length: int, vocab_size: int | None = None) -> LoadedData:
    fmt = spec.resolved_format()
    if spec.prompt_field and not spec.completion_field or spec.completion_field and not spec.prompt_field:
        raise GhostprojError("--prompt-field and --completion-field go together.")
    if fmt == "bin":
        return _load_bin(spec, max_length, vocab_size)
    if fmt in ("parquet", "hf"):
        records = _read_table(spec, fmt)
        sha = file_sha256(spec.path) if fmt == "parquet" else f"hf:{spec.path}:{spec.split}"
    else:
        records = read_records(spec.path)
        sha = file_sha256(spec.path)
    fields = sorted({k for row in records.rows for k in row if not k.startswith("_")})
    out = LoadedData([], records, sha, fields)
    if fmt != "text":
        note = resolve_layout(spec, records)
        if note:
            out.notes.append(note)
    if spec.messages_field:
        out.examples = _tokenize_chat(records, tokenizer, max_length, spec.messages_field)
    elif spec.prompt_field:
        out.examples, notes, out.prompt_too_long = _tokenize_prompt_completion(
            records, tokenizer, max_length, spec.prompt_field, spec.completion_field)
        out.notes += notes
    else:
        out.examples = tokenize_records(records, tokenizer, max_length, spec.text_field or "text")
        blank = [records.rows[e.index].get("_line", e.index + 1) for e in out.examples
                 if not record_text(records, e.index, spec.text_field or "text").strip()]
        if blank:
            where = ", ".join(map(str, blank[:5])) + (" ..." if len(blank) > 5 else "")
            out.notes.append(f"{len(blank)} examples are empty or whitespace only (line {where}); they are kept "
                             "so row numbers stay those of the file, and an empty one gets a zero vector.")
    return out


# The dataset layouts recognised from the first row, in order (TRL's conventions).
LAYOUTS = (("text",), ("prompt", "completion"), ("messages",))


def resolve_layout(spec: DataSpec, records: Records) -> str | None:
    """Fill in which fields hold the example when no field flag was given, from the first
    row; returns a note saying which layout was chosen (None when the flags chose it)."""
    if spec.messages_field or spec.prompt_field or spec.text_field:
        return None
    first = records.rows[0]
    for layout in LAYOUTS:
        if all(k in first for k in layout):
            break
    else:
        have = ", ".join(f"'{k}'" for k in first if not k.startswith("_")) or "none"
        raise GhostprojError(
            f"{records.path} line {first.get('_line', 1)} has none of the layouts ghostproj reads ('text'; 'prompt' + "
            f"'completion'; 'messages'); its fields are {have}. Name yours with --text-field, --prompt-field and "
            "--completion-field, or --messages-field.")
    if layout == ("text",):
        spec.text_field = "text"
        return None
    if layout == ("messages",):
        spec.messages_field = "messages"
        return "data layout: chat 'messages' (loss on assistant turns only); --text-field and friends override it."
    spec.prompt_field, spec.completion_field = "prompt", "completion"
    return ("data layout: 'prompt' + 'completion' (loss on completion tokens only); --text-field and friends "
            "override it.")


# -- prompt / completion ------------------------------------------------------------------
def _field(records: Records, i: int, name: str) -> str:
    return record_text(records, i, name)


def _tokenize_prompt_completion(records, tokenizer, max_length, prompt_field, completion_field):
    notes = []
    examples = []
    too_long = 0
    has_offsets = getattr(tokenizer, "is_fast", False)
    if not has_offsets:
        notes.append("the tokenizer gives no character offsets; prompt and completion are tokenized separately.")
    for i in range(len(records.rows)):
        prompt = _field(records, i, prompt_field)
        completion = _field(records, i, completion_field)
        if has_offsets:
            enc = tokenizer(prompt + completion, add_special_tokens=True, return_offsets_mapping=True)
            ids = list(enc["input_ids"])
            # a token carries loss iff its character span starts at or after the prompt's end;
            # special tokens have the empty span (0, 0) and never do
            mask = [(e > s) and s >= len(prompt) for s, e in enc["offset_mapping"]]
        else:
            p_ids = tokenizer(prompt, add_special_tokens=True)["input_ids"]
            c_ids = tokenizer(completion, add_special_tokens=False)["input_ids"]
            ids = list(p_ids) + list(c_ids)
            mask = [False] * len(p_ids) + [True] * len(c_ids)
        truncated = len(ids) > max_length
        ex = Example(i, ids[:max_length], mask[:max_length], truncated)
        if truncated and ex.n_label_positions == 0 and any(mask):
            ex.prompt_filled = True
            too_long += 1
        examples.append(ex)
    return examples, notes, too_long


# -- chat -----------------------------------------------------------------------------------
def _tokenize_chat(records, tokenizer, max_length, messages_field):
    if not getattr(tokenizer, "chat_template", None):
        raise GhostprojError("The tokenizer has no chat template, so chat data cannot be rendered.")
    if not getattr(tokenizer, "is_fast", False):
        raise GhostprojError("Chat data needs a fast tokenizer (character offsets) to mask non-assistant turns.")
    examples = []
    for i, row in enumerate(records.rows):
        messages = row.get(messages_field)
        if not isinstance(messages, list) or not all(isinstance(m, dict) and "role" in m and "content" in m
                                                     for m in messages):
            raise GhostprojError(
                f"{records.path} line {row.get('_line', i + 1)}: '{messages_field}' is not a list of "
                "{role, content} messages.")
        text = tokenizer.apply_chat_template(messages, tokenize=False)
        # assistant spans: where the rendering grows when an assistant message is appended
        spans = []
        for k, m in enumerate(messages):
            if m["role"] != "assistant":
                continue
            before = tokenizer.apply_chat_template(messages[:k], tokenize=False, add_generation_prompt=True) if k else ""
            upto = tokenizer.apply_chat_template(messages[: k + 1], tokenize=False)
            if not text.startswith(upto) or not upto.startswith(before):
                raise GhostprojError("The chat template does not render conversations incrementally; "
                                     "assistant turns cannot be located.")
            spans.append((len(before), len(upto)))
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        ids = list(enc["input_ids"])
        mask = [e > s and any(a <= s < b for a, b in spans) for s, e in enc["offset_mapping"]]
        truncated = len(ids) > max_length
        examples.append(Example(i, ids[:max_length], mask[:max_length], truncated))
    return examples


# -- token files --------------------------------------------------------------------------------
def _load_bin(spec: DataSpec, max_length: int, vocab_size: int | None) -> LoadedData:
    path = Path(spec.path)
    if not path.is_file():
        raise GhostprojError(f"Data file {path} does not exist.")
    dtype_name = spec.token_dtype or ("uint16" if vocab_size is not None and vocab_size <= 65536 else "uint32")
    if dtype_name not in ("uint16", "uint32"):
        raise GhostprojError(f"Unknown --token-dtype '{dtype_name}'; choose uint16 or uint32.")
    dtype = np.dtype(dtype_name)
    size = path.stat().st_size
    if size % dtype.itemsize:
        raise GhostprojError(f"{path} has {size} bytes, not a multiple of {dtype.itemsize} ({dtype_name} tokens); "
                             "check --token-dtype.")
    if size == 0:
        raise GhostprojError(f"Data file {path} holds no tokens.")
    tokens = np.memmap(path, dtype=dtype, mode="r")
    if vocab_size is not None:
        top = int(tokens.max())
        if top >= vocab_size:
            raise GhostprojError(f"{path} holds token id {top}, outside the model's vocabulary of {vocab_size} "
                                 "(wrong --token-dtype or tokenizer?).")
    examples = []
    for k, start in enumerate(range(0, len(tokens), max_length)):
        block = tokens[start: start + max_length]
        examples.append(Example(k, block.astype(np.int64).tolist()))
    return LoadedData(examples, None, file_sha256(path), [], [f"{len(tokens)} tokens cut into {len(examples)} "
                                                                f"blocks of {max_length}."])


# -- tables (optional extra) -----------------------------------------------------------------------
def _read_table(spec: DataSpec, fmt: str) -> Records:
    try:
        import datasets  # noqa: F401
    except ImportError:
        raise GhostprojError(
            f"Reading {'Parquet files' if fmt == 'parquet' else 'HF datasets'} needs the optional extra: "
            "pip install 'ghostproj[data]'.") from None
    from datasets import load_dataset, load_from_disk

    try:
        if fmt == "parquet":
            if not Path(spec.path).is_file():
                raise GhostprojError(f"Data file {spec.path} does not exist.")
            ds = load_dataset("parquet", data_files=spec.path, split="train")
        elif Path(spec.path).is_dir() and (Path(spec.path) / "dataset_info.json").exists():
            ds = load_from_disk(spec.path)
            if hasattr(ds, "keys"):
                ds = ds[spec.split]
        else:
            ds = load_dataset(spec.path, split=spec.split)
    except GhostprojError:
        raise
    except Exception as exc:  # datasets raises many types (network, missing split, bad file)
        raise GhostprojError(f"Cannot read dataset '{spec.path}': {str(exc).splitlines()[0]}") from None
    rows = [dict(r, _line=i + 1) for i, r in enumerate(ds)]
    if not rows:
        raise GhostprojError(f"Dataset {spec.path} holds no examples.")
    return Records(spec.path, rows)

