"""The model card (`README.md`) of an edited model folder: what the model is, what was removed, how it was made and
loaded, and the weights' SHA-256, with YAML front matter the Hugging Face Hub reads (library_name, base_model,
tags).

The card cannot hold the run record's hash (the record hashes the card, as every output), so it names the record
file instead; `safeedit verify RUN` checks both. The card holds no time or absolute path of the run, so the same
run gives the same bytes wherever it is written. User text is HTML-escaped (Markdown renderers pass HTML through).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jinja2
import yaml

TEMPLATE = "model_card.md.j2"
HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")  # owner/name, the only base_model the Hub accepts


@dataclass(frozen=True)
class MethodFacts:
    """What the card says of a method (or a reference such as `retrain`)."""

    summary: str
    limitations: str = ""
    options: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class RunFacts:
    """What a run knows for its model cards: the scenario, its request and source, and every method it runs."""

    scenario: str  # its name ("" outside a scenario: `safeedit merge`)
    kind: str
    request: dict[str, Any]  # what, requested_by, reason, date
    source: str  # the model the run started from, as the scenario names it
    source_sha256: str  # content hash of the weights the methods edited
    methods: dict[str, MethodFacts] = field(default_factory=dict)


@dataclass(frozen=True)
class Written:
    """What `safeedit.models.export.write_model_folder` wrote."""

    form: str  # "full model", "LoRA adapter" or "merged LoRA"
    library: str  # transformers, diffusers or peft
    loader: str  # the loading callable, e.g. transformers.AutoModelForSequenceClassification
    weights: dict[str, str]  # weight file name in the folder -> SHA-256
    base: str | None = None  # the adapter's base model (LoRA adapter and merged LoRA)

    def load_line(self, folder: str | Path) -> str:
        """The Python line that loads the folder at `folder` (after `import <library>`)."""
        return f'{self.loader}.from_pretrained("{Path(folder).as_posix()}")'


def hub_id(name: str | None) -> str | None:
    """`name` if it is a hub id (owner/name) and no local path, else None: the Hub refuses a local path as
    base_model."""
    return name if name and HUB_ID.fullmatch(name) and not Path(name).exists() else None


def front_matter(run: RunFacts, method: str, written: Written) -> str:
    base = hub_id(written.base if written.base else run.source)
    matter: dict[str, Any] = {"library_name": written.library}
    if base:
        relation = "adapter" if written.form == "LoRA adapter" else "merge" if "merge" in run.kind else "finetune"
        matter |= {"base_model": base, "base_model_relation": relation}  # how the Hub files the model under base
    tags = ["safeedit", run.kind, method, *(["lora"] if written.base else [])]
    matter["tags"] = list(dict.fromkeys(tag for tag in tags if tag))
    return yaml.safe_dump(matter, sort_keys=False, allow_unicode=True)


def render_model_card(run: RunFacts, method: str, written: Written, record_name: str = "record.json",
                      inside: bool = False) -> str:
    """The card of method `method`'s folder (`README.md`); `record_name` is the run record in the run folder above
    it, or with `inside` a record in the folder itself (`safeedit merge`'s merge.json)."""
    environment = jinja2.Environment(
        loader=jinja2.PackageLoader("safeedit.report", "templates"),
        autoescape=True,  # request, reason, paths: user text, escaped as HTML (Markdown shows entities as text)
        undefined=jinja2.StrictUndefined, trim_blocks=True, lstrip_blocks=True, keep_trailing_newline=True,
    )
    facts = run.methods.get(method, MethodFacts(summary=""))
    body = environment.get_template(TEMPLATE).render(
        run=run, method=method, facts=facts, written=written, record_name=record_name, inside=inside,
        load=written.load_line("path/to/this-folder" if inside else f"path/to/{method}"),  # no user text: raw
        library=written.library)
    return f"---\n{front_matter(run, method, written)}---\n\n{body}"


__all__ = ["MethodFacts", "RunFacts", "Written", "hub_id", "render_model_card"]
