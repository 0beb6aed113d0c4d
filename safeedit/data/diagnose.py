"""Why a data file cannot be read, found by reading it ourselves after a `datasets` builder refused it: the file,
the line and the fix, in one line (an empty file, a line that is not JSON, a CSV row with too many fields, an
unbalanced quote, text that is not UTF-8)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

EMPTY_FIX = {".jsonl": "write one JSON object per line", ".json": "write a list of JSON objects",
             ".csv": "write a header line, then one example per line"}


def diagnose(path: Path) -> str | None:
    """What is wrong with a data file the builder refused, as a message naming the file, line and fix (None: no
    problem found here)."""
    try:
        with path.open("rb") as handle:
            if not any(block.strip() for block in iter(lambda: handle.read(1 << 16), b"")):
                return f"{path} is empty; {EMPTY_FIX.get(path.suffix.lower(), 'give a file with examples')}"
        if path.suffix.lower() == ".jsonl":
            return _diagnose_jsonl(path)
        if path.suffix.lower() == ".csv":
            return _diagnose_csv(path)
        if path.suffix.lower() == ".json":
            return _diagnose_json(path)
    except UnicodeDecodeError as error:
        return f"{path} is not UTF-8 text (byte {error.start}); re-save it with UTF-8 encoding"
    return None


def _diagnose_jsonl(path: Path) -> str | None:
    with path.open(encoding="utf-8") as handle:
        for number, line in enumerate(handle, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as error:
                return (f"{path}: line {number} is not JSON ({error.msg}); JSON Lines needs one JSON object per "
                        "line: fix or remove that line")
            if not isinstance(row, dict):
                return (f"{path}: line {number} is a JSON {type(row).__name__}, not an object; write one "
                        '{"column": value, ...} object per line')
    return None


def _diagnose_json(path: Path) -> str | None:
    """A .json file is one JSON document (a list of objects, or an object of columns) or JSON Lines."""
    try:
        json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        if error.msg == "Extra data":  # more than one document: JSON Lines
            return _diagnose_jsonl(path)
        return (f"{path}: not valid JSON at line {error.lineno}, column {error.colno} ({error.msg}); fix it there, "
                "or write one JSON object per line")
    return None


def _diagnose_csv(path: Path) -> str | None:
    with path.open(encoding="utf-8", newline="") as handle:
        reader = csv.reader(handle, strict=True)
        header, rows, start = None, 0, 1
        try:
            for row in reader:
                if header is None:
                    header = row or None
                elif len(row) > len(header):
                    return (f"{path}: line {start} has {len(row)} fields but the header has {len(header)}; "
                            "quote fields that contain commas, or fix that row")
                else:
                    rows += bool(row)
                start = reader.line_num + 1
        except csv.Error as error:
            return (f"{path}: the row at line {start} is not valid CSV ({error}); balance its quotes "
                    '(a quote inside a quoted field is written "")')
    if header is None:
        return f"{path} is empty; {EMPTY_FIX['.csv']}"
    return None if rows else f"{path} has a header but no rows; add one example per line below the header"
