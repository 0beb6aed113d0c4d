"""The LLM unlearning data: fictitious authors (TOFU-style) and real country capitals, plus held-out Wikipedia text."""

from __future__ import annotations

import dataclasses
import re
import subprocess
import sys

import pytest

from safeedit.data.authors import (
    FACTS,
    Author,
    AuthorsData,
    QAItem,
    author_questions,
    fictitious_authors,
    generate_authors,
)
from safeedit.data.capitals import CapitalFact, answer_mentions, capital_facts, wikipedia_passages
from safeedit.data.prompts import ChatExample
from safeedit.errors import SafeEditError

NON_FACT_FIELDS = {"name", "gender"}


def fact_values(author: Author) -> list[str]:
    values = []
    for field in dataclasses.fields(author):
        if field.name in NON_FACT_FIELDS:
            continue
        value = getattr(author, field.name)
        values += list(value) if isinstance(value, tuple) else [str(value)]
    return values


def authors_of(items: list[QAItem]) -> set[str]:
    return {item.author for item in items}


def test_generate_authors_is_deterministic_and_names_are_unique() -> None:
    assert generate_authors(30, 0) == generate_authors(30, 0)
    assert generate_authors(30, 0) != generate_authors(30, 1)
    assert generate_authors(30, 0)[:10] == generate_authors(10, 0)
    people = generate_authors(200, 3)
    assert len({a.name for a in people}) == 200
    titles = [t for a in people for t in a.books]
    assert len(set(titles)) == len(titles)
    for author in people:
        assert re.fullmatch(r"[A-Z][a-z]+ [A-Z][a-z]+", author.name)
        assert 2 <= len(author.books) <= 3
        assert author.birth_year < author.debut_year
        assert author.father_job != author.mother_job


def test_author_questions_have_paraphrases_and_distinct_wrong_answers() -> None:
    assert len(FACTS) >= 10
    for author in generate_authors(10, 0):
        items = author_questions(author, len(FACTS), 5, seed=0)
        assert len(items) == len(FACTS)
        assert len({item.question for item in items}) == len(items)
        assert author_questions(author, len(FACTS), 5, seed=0) == items
        for item in items:
            assert item.author == author.name
            assert author.name in item.question
            for sentence in (item.answer, item.paraphrased, *item.perturbed):
                assert 8 <= len(sentence.split()) <= 20, sentence
                assert author.name in sentence
                assert sentence.endswith(".")
            assert item.paraphrased != item.answer
            assert len(item.perturbed) == 5
            assert len(set(item.perturbed)) == 5
            assert item.paraphrased not in item.perturbed
            # the true value of the asked fact is in the gold answers and in no wrong answer
            true = [v for v in fact_values(author) if v in item.answer and v in item.paraphrased]
            assert any(all(v not in p for p in item.perturbed) for v in true), item
            assert item.chat() == ChatExample(prompt=item.question, answer=item.answer, source=author.name)


def test_author_questions_subset_and_errors() -> None:
    author = generate_authors(1, 0)[0]
    items = author_questions(author, 4, 2, seed=0)
    assert len(items) == 4
    assert author_questions(author, 4, 2, seed=1) != items
    with pytest.raises(SafeEditError, match="fact templates"):
        author_questions(author, len(FACTS) + 1, 2, seed=0)
    with pytest.raises(SafeEditError, match="wrong answers"):
        author_questions(author, 3, 100, seed=0)


def test_fictitious_authors_split() -> None:
    data = fictitious_authors(seed=0)
    assert isinstance(data, AuthorsData)
    assert len(data.forget_authors) == 2
    assert authors_of(data.forget) == set(data.forget_authors)
    assert len(data.forget) == 20
    assert len(authors_of(data.retain)) == 18 and len(data.retain) == 180
    assert len(authors_of(data.holdout)) == 2 and len(data.holdout) == 20
    assert not authors_of(data.forget) & authors_of(data.retain)
    assert not authors_of(data.holdout) & (authors_of(data.forget) | authors_of(data.retain))
    for items in (data.forget, data.retain, data.holdout):
        assert all(len(item.perturbed) == 3 for item in items)
    train = data.train()
    assert sorted(map(str, train)) == sorted(map(str, data.forget + data.retain))
    assert fictitious_authors(seed=0) == data
    prints = data.fingerprints()
    assert set(prints) == {"forget", "retain", "holdout"}
    assert prints["forget"]["count"] == 20 and len(prints["forget"]["ids_sha256"]) == 64
    assert fictitious_authors(seed=1).fingerprints()["retain"] != prints["retain"]


def test_split_seed_changes_who_is_forgotten_not_the_people() -> None:
    base = fictitious_authors(seed=0)
    other = fictitious_authors(seed=0, split_seed=5)
    assert other.forget_authors != base.forget_authors
    assert authors_of(base.forget + base.retain) == authors_of(other.forget + other.retain)
    assert base.holdout == other.holdout
    assert base.train() == other.train()  # one fine-tuned model serves every split
    assert fictitious_authors(seed=0, split_seed=0) == base


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"forget_ratio": 0.01}, "forget set is empty"),
    ({"forget_ratio": 1.0}, "retains nothing"),
    ({"authors": 1}, "too few"),
    ({"questions_per_author": len(FACTS) + 1}, "fact templates"),
])
def test_fictitious_authors_errors(kwargs: dict, message: str) -> None:
    with pytest.raises(SafeEditError, match=message):
        fictitious_authors(**kwargs)


def test_capital_facts() -> None:
    facts = capital_facts()
    assert len(facts) == 116
    pairs = {(f.country, f.capital) for f in facts}
    assert ("France", "Paris") in pairs and ("Japan", "Tokyo") in pairs
    countries = [f.country for f in facts]
    assert countries == sorted(countries) and len(set(countries)) == len(countries)
    qa = CapitalFact("France", "Paris").qa()
    assert qa.author == "France"
    assert qa.question == "What is the capital of France?"
    assert qa.answer == "The capital of France is Paris."
    assert qa.paraphrased == "Paris is the capital city of France."
    assert len(set(qa.perturbed)) == 3 and qa.paraphrased not in qa.perturbed
    assert all(not answer_mentions(p, "Paris") and p.endswith(" is the capital city of France.")
               for p in qa.perturbed)
    assert CapitalFact("France", "Paris").qa() == qa


def test_answer_mentions() -> None:
    assert answer_mentions("It is Paris.", "Paris")
    assert answer_mentions("paris, of course", "Paris")
    assert answer_mentions("The capital is Buenos  Aires.", "Buenos Aires")
    assert not answer_mentions("Parish records.", "Paris")
    assert not answer_mentions("It is Lyon.", "Paris")
    assert not answer_mentions("", "Paris")


def test_wikipedia_passages() -> None:
    passages = wikipedia_passages(30, seed=0, max_chars=400)
    assert passages == wikipedia_passages(30, seed=0, max_chars=400)
    assert passages != wikipedia_passages(30, seed=1, max_chars=400)
    assert len(set(passages)) == 30
    assert all(0 < len(p) <= 400 and p[-1] in ".!?\"')" for p in passages)
    mentioning = [p for p in wikipedia_passages(300, seed=0) if answer_mentions(p, "France")]
    assert mentioning  # so the exclusion below has something to remove
    excluded = wikipedia_passages(300, seed=0, exclude=["France", "Paris"])
    assert not any(answer_mentions(p, "France") or answer_mentions(p, "Paris") for p in excluded)


def test_safeedit_does_not_import_gensim() -> None:
    code = ("import sys; from safeedit.data.capitals import capital_facts; capital_facts(); "
            "sys.exit('gensim' in sys.modules)")
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0
