"""Raw rows of a data file (JSONL or plain text) and how an example reads in tables."""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import GhostprojError


def file_sha256(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


@dataclass
class Records:
    """Raw rows of a data file (dicts), in file order."""

    path: str
    rows: list[dict] = field(default_factory=list)


def read_records(path: str | os.PathLike) -> Records:
    """Read JSONL (one JSON object per line) or plain text (one example per line, field ``text``)."""
    p = Path(path)
    if not p.exists():
        raise GhostprojError(f"Data file {p} does not exist.")
    if p.is_dir():
        raise GhostprojError(f"Data path {p} is a directory, not a file.")
    if not os.access(p, os.R_OK):
        raise GhostprojError(f"Cannot read data file {p}: permission denied (fix its permissions).")
    rows: list[dict] = []
    jsonl = p.suffix.lower() in (".jsonl", ".json", ".ndjson")
    with open(p, "rb") as f:
        for lineno, raw in enumerate(f, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise GhostprojError(f"{p} line {lineno} is not UTF-8 text (byte 0x{raw[exc.start]:02x} at column "
                                     f"{exc.start + 1}); save the file as UTF-8.") from None
            if jsonl:
                if not line.strip():
                    continue
                text = line.rstrip("\r\n")  # the newline is no column of the line
                try:
                    obj = json.loads(text)
                except json.JSONDecodeError as exc:
                    cause = exc.msg.removesuffix(" at")
                    where = (f"at the end of the line, column {exc.pos + 1}" if exc.pos >= len(text.rstrip())
                             else f"at column {exc.pos + 1}")
                    raise GhostprojError(f"{p} line {lineno} is not valid JSON ({cause} {where}).") from None
                if not isinstance(obj, dict):
                    raise GhostprojError(f"{p} line {lineno} is not a JSON object.")
                obj["_line"] = lineno
                rows.append(obj)
            else:
                text = line.rstrip("\n").rstrip("\r")
                if text.strip():
                    rows.append({"text": text, "_line": lineno})
    if not rows:
        raise GhostprojError(f"Data file {p} holds no examples.")
    return Records(str(p), rows)


def record_text(records: Records, i: int, text_field: str) -> str:
    row = records.rows[i]
    if text_field not in row:
        raise GhostprojError(f"{records.path} line {row['_line']} has no field '{text_field}' (use --text-field).")
    value = row[text_field]
    if not isinstance(value, str):
        raise GhostprojError(f"{records.path} line {row['_line']}: field '{text_field}' is not a string.")
    return value


def records_for_run(data: dict) -> tuple[Records | None, str]:
    """The data rows a run was projected from (its manifest's data record), if the file is still there unchanged, and
    the reason when it is not."""
    path = data.get("path")
    if data.get("format") not in (None, "jsonl", "text"):
        return None, f"texts are not shown for {data.get('format')} data"
    if not path or not Path(path).is_file():
        return None, f"the data file {path} is not at hand"
    if data.get("sha256") and file_sha256(path) != data["sha256"]:
        return None, f"the data file {path} changed since projection"
    try:
        return read_records(path), ""
    except GhostprojError as exc:
        return None, str(exc)


def record_field(records: Records, index: int, name: str):
    row = records.rows[index] if 0 <= index < len(records.rows) else {}
    return row.get(name)


def example_text(records: Records, index: int, data: dict) -> str:
    """How an example reads, for tables: its text, prompt + completion, or its messages."""
    row = records.rows[index] if 0 <= index < len(records.rows) else {}
    if data.get("messages_field"):
        msgs = row.get(data["messages_field"]) or []
        return " | ".join(f"{m.get('role')}: {m.get('content')}" for m in msgs if isinstance(m, dict))
    if data.get("prompt_field"):
        return f"{row.get(data['prompt_field'], '')}{row.get(data['completion_field'], '')}"
    return str(row.get(data.get("text_field", "text"), ""))
