"""A user's prompt files, for repairing a chat model they fine-tuned (`kind: harmful-finetune` with `calibration:`):
harmful requests (Antidote's calibration, the harmful score), harmless ones (over-refusal), and the user task's
prompts with the label or answer each should get.

One prompt per row; the format follows the file's suffix:

- `.txt`: one prompt per non-empty line (prompts only: a task file needs its expected answers);
- `.csv`: a header line with a `prompt` column and, for a task file, a `label` or an `answer` column (other
  columns are ignored);
- `.jsonl`: one JSON object per line, `{"prompt": ...}` plus `"label"` or `"answer"` for a task file, or a chat
  row `{"messages": [{"role": "user", "content": ...}, {"role": "assistant", "content": ...}]}` (one user turn,
  optionally after a system turn; the assistant turn is the expected answer).

Every problem is one line naming the file, the line and the fix; nothing needs a model, so the files are read and
checked before any model loads.
"""

from __future__ import annotations

import csv
import io
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from safeedit.data.prompts import ChatExample, normalized
from safeedit.errors import SafeEditError
from safeedit.io import sha256_file, sha256_text

SUFFIXES = (".jsonl", ".csv", ".txt")
PROMPT = "prompt"
EXPECTED = ("label", "answer")  # a task file's expected output: a label (classification) or a free-text answer
_ROW_HINT = 'write {"prompt": "..."} or {"messages": [{"role": "user", "content": "..."}]} per line'


@dataclass(frozen=True)
class PromptFile:
    """The rows of one prompt file, where it came from, and which column held the expected outputs (task files)."""

    path: Path
    examples: list[ChatExample]
    sha256: str
    expected: str | None = None  # "label" or "answer" (task files), None for prompts only

    @property
    def prompts(self) -> list[str]:
        return [example.prompt for example in self.examples]

    def fingerprint(self) -> dict[str, Any]:
        """Count and hash of the prompts, as the record's `data` section holds them."""
        return {"count": len(self.examples), "ids_sha256": sha256_text("\n".join(self.prompts))}


def read_prompt_file(path: str | Path, field: str, task: bool = False) -> PromptFile:
    """The prompts of `path` (and, for a `task` file, the expected label or answer of each); `field` names the
    scenario field in messages (e.g. `calibration`, `evaluation.task`)."""
    path = Path(path)
    where = f"{field}: {path}"
    if path.suffix.lower() not in SUFFIXES:
        raise SafeEditError(f"{where}: unsupported prompt file type {path.suffix or '(none)'!r}; use "
                            f"{', '.join(SUFFIXES)} (one prompt per row)")
    if path.is_dir() or not path.is_file():
        raise SafeEditError(f"{where}: no such file; give a {'/'.join(s[1:] for s in SUFFIXES)} file of prompts, "
                            "one per row (paths are relative to the working folder)")
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError:
        raise SafeEditError(f"{where}: not UTF-8 text; save the file as UTF-8") from None
    if not text.strip():
        raise SafeEditError(f"{where}: the file is empty; give at least one prompt, one per row")
    suffix = path.suffix.lower()
    if suffix == ".txt":
        if task:
            raise SafeEditError(f"{where}: a .txt file holds prompts only, and a task file needs the expected label "
                                "or answer of each prompt; write a .csv or .jsonl with prompt and label (or answer) "
                                "columns")
        examples, expected = [ChatExample(line.strip()) for line in text.splitlines() if line.strip()], None
    elif suffix == ".csv":
        examples, expected = _read_csv(text, where, task)
    else:
        examples, expected = _read_jsonl(text, where, task)
    return PromptFile(path, examples, sha256_file(path), expected)


def _read_csv(text: str, where: str, task: bool) -> tuple[list[ChatExample], str | None]:
    reader = csv.DictReader(io.StringIO(text))
    columns = [c.strip() for c in reader.fieldnames or []]
    if PROMPT not in columns:
        raise SafeEditError(f"{where}: no {PROMPT!r} column (the header has {', '.join(map(repr, columns))}); name "
                            f"the column of the requests {PROMPT!r}")
    expected = _expected_column(columns, where, "column", "the header has") if task else None
    examples = []
    for row in reader:
        row = {(k or "").strip(): v for k, v in row.items()}
        line = f"{where} line {reader.line_num}"
        examples.append(ChatExample(_text(row.get(PROMPT), line, PROMPT),
                                    _text(row.get(expected), line, expected) if expected else ""))
    if not examples:
        raise SafeEditError(f"{where}: a header but no rows; add one prompt per line below the header")
    return examples, expected


def _read_jsonl(text: str, where: str, task: bool) -> tuple[list[ChatExample], str | None]:
    examples: list[ChatExample] = []
    kinds: set[str] = set()
    for number, raw in enumerate(text.splitlines(), 1):
        if not raw.strip():
            continue
        line = f"{where} line {number}"
        try:
            row = json.loads(raw)
        except json.JSONDecodeError as error:
            raise SafeEditError(f"{line}: not valid JSON ({error.msg}); {_ROW_HINT}") from None
        if not isinstance(row, dict):
            raise SafeEditError(f"{line}: a JSON {type(row).__name__}, not an object; {_ROW_HINT}")
        if "messages" in row:
            prompt, answer = _chat_row(row["messages"], line)
            if task and not answer:
                raise SafeEditError(f"{line}: no assistant turn; in a task file each chat row ends with the "
                                    "expected answer as the assistant's turn")
            examples.append(ChatExample(prompt, answer if task else ""))
            kinds.add("answer")
            continue
        if PROMPT not in row:
            raise SafeEditError(f"{line}: no {PROMPT!r} field (it has {', '.join(map(repr, row)) or 'none'}); "
                                f"{_ROW_HINT}")
        expected = _expected_column(list(row), line, "field", "it has") if task else None
        examples.append(ChatExample(_text(row[PROMPT], line, PROMPT),
                                    _text(row[expected], line, expected) if expected else ""))
        kinds.add(expected or "")
    if not examples:
        raise SafeEditError(f"{where}: no rows; write one JSON object per line")
    if task and len(kinds) > 1:
        raise SafeEditError(f"{where}: rows mix labels and answers; give every row a 'label', or every row an "
                            "'answer' (a chat row's assistant turn is an answer)")
    return examples, (kinds.pop() if task else None)


def _expected_column(names: list[str], where: str, what: str, has: str) -> str:
    found = [name for name in EXPECTED if name in names]
    if not found:
        raise SafeEditError(f"{where}: no 'label' or 'answer' {what} ({has} {', '.join(map(repr, names))}); a task "
                            "file gives each prompt the label or answer it should get")
    if len(found) > 1:
        raise SafeEditError(f"{where}: both 'label' and 'answer' {what}s; keep one (label: the answer must start "
                            "with it; answer: also scored by ROUGE-L)")
    return found[0]


def _text(value: Any, line: str, name: str) -> str:
    if not isinstance(value, str | int | float) or isinstance(value, bool) or not str(value).strip():
        raise SafeEditError(f"{line}: empty or missing {name!r}; every row needs one")
    return str(value).strip()


def _chat_row(messages: Any, line: str) -> tuple[str, str]:
    """(user turn, assistant turn or "") of a chat row: an optional system turn, one user turn, an optional answer."""
    if not isinstance(messages, list) or not all(isinstance(m, dict) for m in messages):
        raise SafeEditError(f"{line}: 'messages' is not a list of {{\"role\", \"content\"}} objects")
    turns = [m for m in messages if m.get("role") != "system"]
    roles = [m.get("role") for m in turns]
    if roles not in (["user"], ["user", "assistant"]):
        raise SafeEditError(f"{line}: 'messages' has the turns {roles}; a prompt row is one user turn, optionally "
                            "followed by the assistant's expected answer")
    prompt = _text(turns[0].get("content"), line, "content")
    return prompt, (_text(turns[1].get("content"), line, "content") if len(turns) == 2 else "")


def shared_prompts(first: PromptFile, second: PromptFile) -> list[str]:
    """Prompts of `second` that are also in `first` (after case and punctuation folding)."""
    seen = {normalized(prompt) for prompt in first.prompts}
    return [prompt for prompt in second.prompts if normalized(prompt) in seen]
