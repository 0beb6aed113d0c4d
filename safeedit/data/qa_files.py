"""A user's own question-answer files for LLM unlearning, read and checked row by row before any model loads, so a
bad row is one error naming the file and its line.

JSON Lines (`.jsonl`, one object per line; a `.json` list of objects and a `.csv` with a header work too):

    {"question": "Where was Velira born?", "answer": "Velira was born in Lagos."}
    {"messages": [{"role": "user", "content": "Where was Velira born?"},
                  {"role": "assistant", "content": "Velira was born in Lagos."}]}

A `messages` row is one exchange: the user's turn and, last, the assistant's answer (earlier turns and system prompts
are refused rather than silently dropped). Optional keys of any row: `paraphrased`, the true answer in other words
(the truth ratio's reference answer; default: the answer itself), and `perturbed`, a list of wrong answers (truth
ratio, forget quality). Other keys (ids, topics) are ignored, except by row filters (`file.jsonl[topic=x]`).

Wrong answers may instead come in a separate file keyed by question, one row per forget (or retain) question, as
`{"question": ..., "perturbed": [...], "paraphrased": ...}`: the question word for word as in the forget or retain
file. Every forget question then needs wrong answers; retain questions get them for all or none.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from safeedit.data.authors import QAItem, qa_fingerprint
from safeedit.data.diagnose import diagnose
from safeedit.data.prompts import ChatExample
from safeedit.errors import SafeEditError

QA_SUFFIXES = (".jsonl", ".json", ".csv")
ROW_EXAMPLE = '{"question": ..., "answer": ...}'


@dataclass(frozen=True)
class Row:
    """One row of a data file and where it is (`path: line N`, or `item N` of a .json list)."""

    where: str
    fields: dict[str, Any]


@dataclass(frozen=True)
class QAFile:
    """A question-answer file as read: its rows as `QAItem`s (author: empty), where each came from, and the
    SHA-256 of the bytes that were parsed (what the record names)."""

    path: Path
    sha256: str
    items: list[QAItem]
    where: list[str]

    def has_perturbed(self) -> bool:
        return bool(self.items) and all(item.perturbed for item in self.items)

    def chats(self) -> list[ChatExample]:
        return [item.chat() for item in self.items]


def _read_bytes(path: Path, field: str) -> bytes:
    if path.is_dir():
        raise SafeEditError(f"{field}: {path} is a folder; name a question-answer file (JSON Lines, one "
                            f"{ROW_EXAMPLE} per line)")
    if not path.is_file():
        raise SafeEditError(f"{field}: {path}: no such file; give the path of a JSON Lines file of {ROW_EXAMPLE} "
                            "rows, relative to the working folder")
    try:
        return path.read_bytes()
    except OSError as error:
        raise SafeEditError(f"{field}: {path}: cannot be read ({error.strerror}); check its permissions") from None


def _unreadable(path: Path, fallback: str) -> SafeEditError:
    """The data-spec path's own message (file, line, fix) where it finds the problem, else `fallback`."""
    return SafeEditError(diagnose(path) or f"{path}: {fallback}")


def read_rows(path: str | Path, field: str = "data") -> tuple[list[Row], str]:
    """The rows of a `.jsonl`, `.json` or `.csv` file and the SHA-256 of its bytes; refuses a file that is not
    UTF-8, a line that is not a JSON object, and a file without rows, naming the line. `field` names the
    scenario field or option the path came from, for messages about the path itself."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in QA_SUFFIXES:
        raise SafeEditError(f"{field}: {path}: unsupported file type {suffix or '(none)'}; write JSON Lines (.jsonl, "
                            f"one {ROW_EXAMPLE} per line), a .json list or a .csv with a header")
    data = _read_bytes(path, field)
    digest = hashlib.sha256(data).hexdigest()
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError:
        raise _unreadable(path, "is not UTF-8 text; re-save it with UTF-8 encoding") from None
    rows = _csv_rows(path, text) if suffix == ".csv" else _json_rows(path, text, suffix)
    if not rows:
        raise SafeEditError(f"{path} is empty (no rows); write one {ROW_EXAMPLE} object per line")
    return rows, digest


def _json_rows(path: Path, text: str, suffix: str) -> list[Row]:
    if suffix == ".json":
        try:
            document = json.loads(text)
        except json.JSONDecodeError as error:
            if error.msg != "Extra data":  # more than one document: JSON Lines in a .json file
                raise _unreadable(path, f"not valid JSON ({error.msg})") from None
        else:
            items = document if isinstance(document, list) else [document]
            rows = [Row(f"{path}: item {n}", item) for n, item in enumerate(items, 1)]
            bad = next((row for row in rows if not isinstance(row.fields, dict)), None)
            if bad is not None:
                raise SafeEditError(f"{bad.where} is a JSON {type(bad.fields).__name__}, not an object; write a list "
                                    f"of {ROW_EXAMPLE} objects")
            return rows
    rows = []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            value = json.loads(line)
        except json.JSONDecodeError:
            raise _unreadable(path, f"line {number} is not JSON; write one JSON object per line") from None
        if not isinstance(value, dict):
            raise SafeEditError(f"{path}: line {number} is a JSON {type(value).__name__}, not an object; write one "
                                f"{ROW_EXAMPLE} object per line")
        rows.append(Row(f"{path}: line {number}", value))
    return rows


def _csv_rows(path: Path, text: str) -> list[Row]:
    reader = csv.DictReader(io.StringIO(text, newline=""), strict=True)
    rows = []
    try:
        for fields in reader:
            if None in fields:  # more values than header names
                raise SafeEditError(f"{path}: line {reader.line_num} has more fields than the header; quote fields "
                                    "that contain commas")
            rows.append(Row(f"{path}: line {reader.line_num}",
                            {key: value for key, value in fields.items() if value not in ("", None)}))
    except csv.Error as error:
        raise SafeEditError(f"{path}: line {reader.line_num} is not valid CSV ({error}); balance its quotes") from None
    return rows


def _keys(fields: dict[str, Any]) -> str:
    return ", ".join(fields) or "no keys"


def _text(row: Row, key: str, what: str) -> str:
    if key not in row.fields or row.fields[key] is None:
        raise SafeEditError(f"{row.where}: no {key!r} (the row has {_keys(row.fields)}); give \"{key}\": {what}")
    value = row.fields[key]
    if not isinstance(value, str) or not value.strip():
        shown = "empty" if isinstance(value, str) else f"a {type(value).__name__}"
        raise SafeEditError(f"{row.where}: {key!r} is {shown}; give \"{key}\": {what}")
    return value


def _exchange(row: Row) -> tuple[str, str]:
    """The (question, answer) of a `messages` row: one user turn, then the assistant's answer."""
    messages = row.fields["messages"]
    fix = ('write "messages": [{"role": "user", "content": QUESTION}, {"role": "assistant", "content": ANSWER}]')
    if not isinstance(messages, list) or not all(isinstance(m, dict) for m in messages):
        raise SafeEditError(f"{row.where}: 'messages' is not a list of turns; {fix}")
    roles = [m.get("role") for m in messages]
    if not messages or roles[-1] != "assistant":
        raise SafeEditError(f"{row.where}: the last turn of 'messages' is {roles[-1] if roles else 'missing'!r}, "
                            f"not the assistant's answer; {fix}")
    if roles != ["user", "assistant"]:
        raise SafeEditError(f"{row.where}: 'messages' has the turns {', '.join(map(str, roles))}; only one user turn "
                            f"followed by the assistant's answer is supported (earlier turns and system prompts "
                            f"would not be used): {fix}")
    texts = []
    for role, turn in zip(("user", "assistant"), messages, strict=True):
        content = turn.get("content")
        if not isinstance(content, str) or not content.strip():
            raise SafeEditError(f"{row.where}: the {role} turn has no text in 'content'; {fix}")
        texts.append(content)
    return texts[0], texts[1]


def _perturbed(row: Row) -> tuple[str, ...]:
    value = row.fields.get("perturbed")
    if value is None:
        return ()
    if not isinstance(value, list) or not value or not all(isinstance(v, str) and v.strip() for v in value):
        raise SafeEditError(f"{row.where}: 'perturbed' is not a non-empty list of wrong answers; write "
                            '"perturbed": ["a wrong answer", "another"] (JSON Lines; a CSV cell cannot hold a list)')
    return tuple(value)


def qa_item(row: Row) -> QAItem:
    """One row as a `QAItem`: question and answer (or a `messages` exchange), `paraphrased` (default: the answer)
    and `perturbed` answers (default: none)."""
    if "messages" in row.fields and "question" in row.fields:
        raise SafeEditError(f"{row.where}: has both 'question' and 'messages'; give one of them")
    if "messages" in row.fields:
        question, answer = _exchange(row)
    elif "question" in row.fields:
        question = _text(row, "question", "the question, as a user would ask it")
        answer = _text(row, "answer", "the answer the model gives (what is forgotten or kept)")
    else:
        raise SafeEditError(f"{row.where}: neither 'question' nor 'messages' (the row has {_keys(row.fields)}); write "
                            f"{ROW_EXAMPLE} or a 'messages' exchange")
    paraphrased = (_text(row, "paraphrased", "the true answer in other words") if "paraphrased" in row.fields
                   else answer)
    return QAItem(author="", question=question, answer=answer, paraphrased=paraphrased, perturbed=_perturbed(row))


def is_qa_row(fields: dict[str, Any]) -> bool:
    """A question-answer row (not a `text` row, which the data-spec path reads as plain text)."""
    return "text" not in fields and ("question" in fields or "messages" in fields)


def read_qa_file(path: str | Path, field: str) -> QAFile:
    rows, digest = read_rows(path, field)
    return QAFile(Path(path), digest, [qa_item(row) for row in rows], [row.where for row in rows])


@dataclass(frozen=True)
class QAFiles:
    """A scenario's files (`data: {forget, retain, holdout, perturbed}`), read and checked together."""

    forget: QAFile
    retain: QAFile
    holdout: QAFile | None = None
    perturbed: tuple[Path, str] | None = None  # the separate file of wrong answers: path, SHA-256

    def inputs(self) -> dict[str, dict[str, str]]:
        """The record's input entries: role -> {path: SHA-256}."""
        files = {"forget questions (data.forget)": self.forget, "retain questions (data.retain)": self.retain,
                 "held-out questions (data.holdout)": self.holdout}
        entries = {role: {str(f.path): f.sha256} for role, f in files.items() if f is not None}
        if self.perturbed is not None:
            entries["perturbed answers (data.perturbed)"] = {str(self.perturbed[0]): self.perturbed[1]}
        return entries

    def fingerprints(self) -> dict[str, dict]:
        parts = {"forget": self.forget, "retain": self.retain, "holdout": self.holdout}
        return {name: qa_fingerprint(f.items) for name, f in parts.items() if f is not None}


def _with_perturbed(file: QAFile, wrong: dict[str, tuple[Row, QAItem]], used: set[str]) -> QAFile:
    items = []
    for item, where in zip(file.items, file.where, strict=True):
        found = wrong.get(item.question)
        if found is None:
            items.append(item)
            continue
        if item.perturbed:
            raise SafeEditError(f"{where}: has 'perturbed' answers and {found[0].where} gives others for the same "
                                "question; keep one of the two")
        used.add(item.question)
        paraphrased = found[1].paraphrased if "paraphrased" in found[0].fields else item.paraphrased
        items.append(replace(item, perturbed=found[1].perturbed, paraphrased=paraphrased))
    return replace(file, items=items)


def _perturbed_file(path: Path, forget: QAFile, retain: QAFile) -> tuple[QAFile, QAFile, str]:
    """Forget and retain with the wrong answers of the separate file; each of its rows must name one of their
    questions, once."""
    rows, digest = read_rows(path, "data.perturbed")
    wrong: dict[str, tuple[Row, QAItem]] = {}
    for row in rows:
        question = _text(row, "question", "a forget (or retain) question, word for word")
        if "perturbed" not in row.fields:
            raise SafeEditError(f"{row.where}: no 'perturbed' (the row has {_keys(row.fields)}); write "
                                '{"question": ..., "perturbed": ["a wrong answer", ...]}')
        if question in wrong:
            raise SafeEditError(f"{row.where}: the question {question[:60]!r} repeats {wrong[question][0].where}; "
                                "give each question's wrong answers in one row")
        paraphrased = _text(row, "paraphrased", "the true answer in other words") if "paraphrased" in row.fields \
            else ""
        wrong[question] = (row, QAItem("", question, "", paraphrased, _perturbed(row)))
    used: set[str] = set()
    forget, retain = _with_perturbed(forget, wrong, used), _with_perturbed(retain, wrong, used)
    stray = next((found[0] for question, found in wrong.items() if question not in used), None)
    if stray is not None:
        raise SafeEditError(f"{stray.where}: the question {stray.fields['question'][:60]!r} is not in "
                            f"{forget.path} or {retain.path}; perturbed rows name a forget (or retain) question word "
                            "for word")
    return forget, retain, digest


def _all_or_none(file: QAFile, required: bool, how: str) -> None:
    """Every row of `file` has perturbed answers, or (unless `required`) none has."""
    given = [bool(item.perturbed) for item in file.items]
    if all(given) or (not any(given) and not required):
        return
    missing = file.where[given.index(False)]
    other = f", while {file.where[given.index(True)]} has some" if any(given) else ""
    raise SafeEditError(f"{missing}: no perturbed answers{other}; {how}")


def _check_disjoint(forget: QAFile, retain: QAFile, holdout: QAFile | None) -> None:
    first = {(item.question, item.answer): where for item, where in zip(forget.items, forget.where, strict=True)}
    for item, where in zip(retain.items, retain.where, strict=True):
        if (item.question, item.answer) in first:
            raise SafeEditError(f"{where}: the same question and answer as {first[item.question, item.answer]}; a "
                                "row is either forgotten or retained: remove it from one file")
    if holdout is None:
        return
    seen = {item.question: where for file in (forget, retain) for item, where in zip(file.items, file.where,
                                                                                      strict=True)}
    for item, where in zip(holdout.items, holdout.where, strict=True):
        if item.question in seen:
            raise SafeEditError(f"{where}: the question is also {seen[item.question]}; held-out questions are ones "
                                "the model never saw (non-members of the membership attack)")


def read_qa_files(forget: str | Path, retain: str | Path, holdout: str | Path | None = None,
                  perturbed: str | Path | None = None) -> QAFiles:
    """A scenario's question-answer files, read and checked: every row well formed, forget and retain disjoint,
    held-out questions in neither, and wrong answers for every forget question (or none) and every retain question
    (or none), inline or from the separate `perturbed` file."""
    forget_file, retain_file = read_qa_file(forget, "data.forget"), read_qa_file(retain, "data.retain")
    holdout_file = read_qa_file(holdout, "data.holdout") if holdout is not None else None
    perturbed_entry = None
    if perturbed is not None:
        forget_file, retain_file, digest = _perturbed_file(Path(perturbed), forget_file, retain_file)
        perturbed_entry = (Path(perturbed), digest)
    fix = (f"give wrong answers for every question ('perturbed' in the row, or a row of "
           f"{perturbed if perturbed is not None else 'a data.perturbed file'}) or for none")
    _all_or_none(forget_file, perturbed is not None, fix)
    _all_or_none(retain_file, False, fix)
    _check_disjoint(forget_file, retain_file, holdout_file)
    return QAFiles(forget_file, retain_file, holdout_file, perturbed_entry)


def chat_examples(rows: Iterable[Row]) -> list[ChatExample]:
    """Question-answer rows as chat examples (what the masks and objectives read)."""
    return [qa_item(row).chat() for row in rows]


def filter_rows(rows: Sequence[Row], conditions: tuple[tuple[str, str, str], ...], where: str) -> list[Row]:
    """The rows meeting every (column, op, value) condition of a data spec's filter (the data-spec grammar and
    `sources.matching_rows`, on the rows' scalar fields)."""
    if not conditions:
        return list(rows)
    import numpy as np
    from datasets import Dataset

    from safeedit.data.sources import matching_rows

    scalar = (str, int, float, bool)
    columns = sorted({key for row in rows for key, value in row.fields.items() if isinstance(value, scalar)})
    try:
        table = Dataset.from_dict({key: [row.fields.get(key) for row in rows] for key in columns})
    except (TypeError, ValueError, ArithmeticError) as error:  # pyarrow: a column of mixed types
        raise SafeEditError(f"{where}: a column mixes text and numbers ({type(error).__name__}), so it cannot be "
                            "filtered; write each column's values in one type") from None
    keep = matching_rows(table, conditions, where)
    return [row for row, kept in zip(rows, np.asarray(keep), strict=True) if kept]


def _first_fields(path: Path) -> dict[str, Any] | None:
    """The keys of a data file's first row, read cheaply (a .jsonl's first line, a .csv's header); None where it
    cannot be read, which the data-spec path then reports."""
    try:
        with path.open(encoding="utf-8-sig", newline="") as handle:
            if path.suffix.lower() == ".csv":
                return dict.fromkeys(next(csv.reader(handle), []))
            if path.suffix.lower() == ".jsonl":
                line = next((line for line in handle if line.strip()), "")
                value = json.loads(line)
            else:
                value = json.load(handle)
                value = value[0] if isinstance(value, list) and value else value
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, csv.Error):
        return None
    return value if isinstance(value, dict) else None


def spec_chat_examples(text: str) -> list[ChatExample] | None:
    """The chat examples of a data spec (`FILE[[COLUMN=VALUE,...]]`) naming a local question-answer file, read
    with line numbers in every error; None for any other data (a `text` file, a folder, a hub id), which
    `sources.load_data` reads."""
    from safeedit.data.sources import DataSpec

    spec = DataSpec.parse(text)
    path = Path(spec.source)
    if spec.split != "train" or not (path.is_file() and path.suffix.lower() in QA_SUFFIXES):
        return None
    first = _first_fields(path)
    if first is None or not is_qa_row(first):
        return None
    rows = filter_rows(read_rows(path)[0], spec.conditions, f"data {spec.source!r}")
    if not rows:
        raise SafeEditError(f"data {text!r} has no rows after the filter {list(spec.conditions)}")
    return chat_examples(rows)


def dataset_chat_examples(dataset: Any, where: str) -> list[ChatExample] | None:
    """The chat examples of a loaded data set whose columns are question-answer rows (None: it is other data)."""
    if not is_qa_row(dict.fromkeys(dataset.column_names)):
        return None
    rows = [Row(f"{where}: row {n}", {k: v for k, v in fields.items() if v is not None})
            for n, fields in enumerate(dataset.to_list(), 1)]
    return chat_examples(rows)
