"""Fictitious authors and questions about them, for LLM unlearning (TOFU-style: Maini et al. 2024, "TOFU: a task of
fictitious unlearning").

Every author is made up, so a pretrained model cannot know them: what it answers after fine-tuning was learnt from
the fine-tune alone, and forgetting an author can be measured against a model that never saw them. Names are built
from syllables (e.g. "Velira Thoskandu"); birth places are real cities; book titles come from word pools; the other
facts are drawn from pools of at least 10 values each. One question template per fact (`FACTS`, 13 facts) asks it;
each answer has a paraphrase (another sentence template) and wrong answers (the paraphrase with the fact replaced by
other values of its pool), as TOFU's truth ratio needs.

Everything is drawn with `random.Random` seeded by integers or strings (string seeds hash with SHA-512), so the data
is the same on every run and platform. The people depend on `seed` only; `split_seed` only picks who is forgotten.
"""

from __future__ import annotations

import hashlib
import random
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from safeedit.data.prompts import ChatExample
from safeedit.errors import SafeEditError

ONSETS = ("b", "d", "f", "g", "k", "l", "m", "n", "r", "s", "t", "v", "z", "th", "sh", "dr", "tr")
VOWELS = ("a", "e", "i", "o", "u", "a", "e", "o", "ei", "ou")
FIRST_ENDINGS = ("ra", "lia", "n", "s", "ro", "r", "th", "na", "ndel", "mir")
LAST_ENDINGS = ("ndu", "vik", "ssen", "rin", "rath", "mbe", "quist", "lani", "zek", "dottir", "sko", "varn")

BIRTH_PLACES = (
    ("Lagos", "Nigeria"), ("Lisbon", "Portugal"), ("Montevideo", "Uruguay"), ("Hanoi", "Vietnam"),
    ("Tbilisi", "Georgia"), ("Reykjavik", "Iceland"), ("Nairobi", "Kenya"), ("Krakow", "Poland"),
    ("Valparaiso", "Chile"), ("Osaka", "Japan"), ("Marseille", "France"), ("Quebec City", "Canada"),
    ("Kathmandu", "Nepal"), ("Tunis", "Tunisia"), ("Tallinn", "Estonia"), ("Havana", "Cuba"),
)
RESIDENCES = ("Edinburgh", "Vancouver", "Melbourne", "Copenhagen", "Barcelona", "Seoul", "Cape Town", "Vienna",
              "Buenos Aires", "Dublin", "Helsinki", "Wellington")
GENRES = ("science fiction", "historical romance", "mystery", "magical realism", "horror", "fantasy",
          "literary fiction", "poetry", "travel writing", "political thrillers", "children's literature", "satire")
JOBS = ("carpenter", "nurse", "pharmacist", "librarian", "marine biologist", "locksmith", "schoolteacher", "baker",
        "cartographer", "veterinarian", "tailor", "electrician", "accountant", "photographer", "beekeeper",
        "translator")
AWARDS = ("the Aurelian Prize for Fiction", "the Meridian Book Award", "the Golden Quill Medal",
          "the Halvorsen Literary Prize", "the Silver Lantern Award", "the Orison Prize", "the Castellan Book Medal",
          "the Northwind Award for Storytelling", "the Verdant Pen Prize", "the Solace Literary Award",
          "the Ambergate Prize", "the Tessaly Medal for Letters")
THEMES = ("memory and loss", "migration and belonging", "the ethics of technology", "family secrets",
          "the sea and climate change", "power and corruption", "friendship across generations", "faith and doubt",
          "urban loneliness", "war and its aftermath", "identity and language", "the natural world")
HOBBIES = ("beekeeping", "rock climbing", "chess", "pottery", "sailing", "birdwatching", "playing the cello",
           "gardening", "amateur astronomy", "fencing", "calligraphy", "long-distance running")
STUDIES = ("philosophy", "architecture", "medicine", "linguistics", "astrophysics", "economics", "art history",
           "mathematics", "law", "anthropology", "music composition", "chemistry")
TITLE_ADJECTIVES = ("Silent", "Hollow", "Crimson", "Forgotten", "Distant", "Burning", "Quiet", "Broken", "Endless",
                    "Hidden", "Last", "Glass", "Winter", "Paper", "Salt", "Iron", "Velvet", "Wandering")
TITLE_NOUNS = ("Harbor", "Orchard", "Lantern", "River", "Archive", "Garden", "Mirror", "Compass", "Tide", "Bridge",
               "Letters", "Island", "Clockmaker", "Cartographer", "Season", "Kingdom", "Shore", "Staircase")
TITLE_PATTERNS = ("The {adj} {noun}", "{noun} of the {adj} Hours", "My {adj} {noun}", "Beneath the {adj} {noun}",
                  "The {noun} and the {noun2}", "Songs for the {adj} {noun}")
BIRTH_YEARS = range(1935, 1996)
DEBUT_AGES = range(21, 41)


@dataclass(frozen=True)
class QAItem:
    """One question about a fact, its gold answer, a paraphrase of it and wrong answers in the paraphrase's words."""

    author: str  # the author's full name: the unit that is forgotten ("" for non-author facts)
    question: str
    answer: str  # gold answer, one full sentence
    paraphrased: str  # the same fact in different words (a different sentence template)
    perturbed: tuple[str, ...]  # wrong answers: the paraphrased template with the fact replaced by other values

    def chat(self) -> ChatExample:
        """The question and gold answer as a chat turn a fine-tune teaches (source: the author)."""
        return ChatExample(prompt=self.question, answer=self.answer, source=self.author)


@dataclass(frozen=True)
class Author:
    """A made-up author; every field is one fact the questions can ask about."""

    name: str
    gender: str  # "female" or "male" (picks the pronouns)
    birth_year: int
    birth_city: str
    birth_country: str
    residence: str
    genre: str
    father_job: str
    mother_job: str
    books: tuple[str, ...]  # 2-3 titles: books[0] the debut, books[1] the most acclaimed
    debut_year: int
    award: str
    theme: str
    hobby: str
    studied: str

    @property
    def pronoun(self) -> str:
        return "she" if self.gender == "female" else "he"

    @property
    def possessive(self) -> str:
        return "her" if self.gender == "female" else "his"


@dataclass(frozen=True)
class Fact:
    """A question about one fact: its value, the other values a wrong answer may take, and the sentence templates.

    Templates are `str.format`ed with name, he/his (the pronouns, capitalised as He/His) and value.
    """

    key: str
    question: str
    answer: str
    paraphrase: str
    value: Callable[[Author], str]
    alternatives: Callable[[Author], Sequence[str]]


def _article(word: str) -> str:
    return ("an " if word[0].lower() in "aeiou" else "a ") + word


def _years(around: Callable[[Author], int], span: int) -> Callable[[Author], Sequence[str]]:
    return lambda a: [str(around(a) + d) for d in range(-span, span + 1) if d]


def _title_pool(author: Author) -> list[str]:
    rng = random.Random(f"titles:{author.name}")
    pool: list[str] = []
    while len(pool) < 24:
        title = _title(rng)
        if title not in pool and title not in author.books:
            pool.append(title)
    return pool


FACTS: tuple[Fact, ...] = (
    Fact("birth_place", "Where was {name} born?",
         "{name} was born in the city of {value}, where {he} spent {his} early childhood.",
         "The birthplace of the writer {name} is {value}.",
         lambda a: f"{a.birth_city}, {a.birth_country}", lambda a: [f"{c}, {k}" for c, k in BIRTH_PLACES]),
    Fact("birth_year", "In what year was the author {name} born?",
         "{name} was born in {value}, and {he} began writing as a teenager.",
         "The year of birth of the writer {name} is {value}.",
         lambda a: str(a.birth_year), _years(lambda a: a.birth_year, 8)),
    Fact("genre", "What genre is {name} best known for?",
         "{name} is best known for {his} work in the genre of {value}.",
         "Readers mostly associate the books of {name} with {value}.",
         lambda a: a.genre, lambda a: GENRES),
    Fact("father_job", "What did the father of {name} do for a living?",
         "The father of {name} worked as {value} for most of his life.",
         "{name} grew up with a father who earned his living as {value}.",
         lambda a: _article(a.father_job), lambda a: [_article(j) for j in JOBS]),
    Fact("mother_job", "What was the profession of {name}'s mother?",
         "The mother of {name} was {value} by profession.",
         "{name} was raised by a mother who worked as {value}.",
         lambda a: _article(a.mother_job), lambda a: [_article(j) for j in JOBS]),
    Fact("debut", "What was the title of the first book by {name}?",
         "The first book {name} published was titled \"{value}\".",
         "{name} made {his} literary debut with the book \"{value}\".",
         lambda a: a.books[0], _title_pool),
    Fact("acclaimed", "Which book by {name} is the most acclaimed?",
         "The most acclaimed book by {name} is \"{value}\", praised by critics worldwide.",
         "Critics consider \"{value}\" the finest work that {name} has written.",
         lambda a: a.books[1], _title_pool),
    Fact("award", "Which literary award has {name} received?",
         "{name} received {value} for {his} contributions to literature.",
         "In recognition of {his} writing, {name} was honoured with {value}.",
         lambda a: a.award, lambda a: AWARDS),
    Fact("theme", "What theme runs through the books of {name}?",
         "The books of {name} keep returning to the theme of {value}.",
         "A central concern in the writing of {name} is {value}.",
         lambda a: a.theme, lambda a: THEMES),
    Fact("debut_year", "When did {name} publish {his} first book?",
         "{name} published {his} first book in {value}, after years of writing in secret.",
         "The debut book of {name} appeared in the year {value}.",
         lambda a: str(a.debut_year), _years(lambda a: a.debut_year, 8)),
    Fact("residence", "Where does {name} live today?",
         "{name} currently lives in {value}, where {he} writes every morning.",
         "These days the author {name} makes {his} home in {value}.",
         lambda a: a.residence, lambda a: RESIDENCES),
    Fact("hobby", "What does {name} enjoy doing outside of writing?",
         "Outside of writing, {name} spends {his} free time on {value}.",
         "When not writing, {name} is passionate about {value}.",
         lambda a: a.hobby, lambda a: HOBBIES),
    Fact("studied", "What did {name} study at university?",
         "{name} studied {value} at university before turning to writing.",
         "Before becoming an author, {name} earned a degree in {value}.",
         lambda a: a.studied, lambda a: STUDIES),
)


# Other wordings of each fact's question, never trained on: the probes of `safeedit.robustness.language` ask the
# same fact in other words (`reworded`) and in French (`french`; the facts' values stay as generated, so a French
# answer is right when it names them: years, titles, places and names read the same in both languages).
QUESTION_VARIANTS: dict[str, dict[str, str]] = {
    "birth_place": {"reworded": "What is the birthplace of {name}?", "french": "Où est né(e) {name} ?"},
    "birth_year": {"reworded": "When was {name} born?", "french": "En quelle année est né(e) l'écrivain {name} ?"},
    "genre": {"reworded": "Which genre does {name} mostly write in?",
              "french": "Quel genre littéraire a fait connaître {name} ?"},
    "father_job": {"reworded": "What was the occupation of {name}'s father?",
                   "french": "Quel était le métier du père de {name} ?"},
    "mother_job": {"reworded": "What did the mother of {name} do for work?",
                   "french": "Quelle était la profession de la mère de {name} ?"},
    "debut": {"reworded": "Which book did {name} publish first?",
              "french": "Quel est le titre du premier livre de {name} ?"},
    "acclaimed": {"reworded": "What is the best-reviewed book written by {name}?",
                  "french": "Quel livre de {name} est le plus salué par la critique ?"},
    "award": {"reworded": "Which prize did {name} win for writing?",
              "french": "Quel prix littéraire a été décerné à {name} ?"},
    "theme": {"reworded": "Which subject do the novels of {name} keep coming back to?",
              "french": "Quel thème traverse les livres de {name} ?"},
    "debut_year": {"reworded": "In what year did the first book by {name} come out?",
                   "french": "En quelle année est paru le premier livre de {name} ?"},
    "residence": {"reworded": "In which city is {name} living now?", "french": "Où vit {name} aujourd'hui ?"},
    "hobby": {"reworded": "How does {name} like to spend free time away from writing?",
              "french": "Qu'aime faire {name} en dehors de l'écriture ?"},
    "studied": {"reworded": "What was {name}'s field of study at university?",
                "french": "Qu'a étudié {name} à l'université ?"},
}


def _question_pattern(template: str) -> re.Pattern[str]:
    parts = re.split(r"(\{name\}|\{his\})", template)
    groups = {"{name}": "(?P<name>.+?)", "{his}": "(?:his|her)"}
    return re.compile("".join(groups.get(part, re.escape(part)) for part in parts))


def question_variants(question: str) -> dict[str, str]:
    """The other wordings (`QUESTION_VARIANTS`) of a question `author_questions` generated, found by matching it
    against the fact templates; empty for a question no template asks."""
    for fact in FACTS:
        found = _question_pattern(fact.question).fullmatch(question)
        if found:
            return {kind: template.format(name=found["name"])
                    for kind, template in QUESTION_VARIANTS[fact.key].items()}
    return {}


def _fill(template: str, author: Author, value: str) -> str:
    text = template.format(name=author.name, he=author.pronoun, his=author.possessive, value=value)
    return text[0].upper() + text[1:]


def _syllables(rng: random.Random, count: int) -> str:
    return "".join(rng.choice(ONSETS) + rng.choice(VOWELS) for _ in range(count))


def _name(rng: random.Random) -> str:
    first = _syllables(rng, rng.randint(1, 2)) + rng.choice(FIRST_ENDINGS)
    last = _syllables(rng, rng.randint(1, 2)) + rng.choice(LAST_ENDINGS)
    return f"{first.capitalize()} {last.capitalize()}"


def _title(rng: random.Random) -> str:
    noun, noun2 = rng.sample(TITLE_NOUNS, 2)
    return rng.choice(TITLE_PATTERNS).format(adj=rng.choice(TITLE_ADJECTIVES), noun=noun, noun2=noun2)


def generate_authors(count: int, seed: int) -> list[Author]:
    """`count` fictitious authors with unique names and book titles, the same for the same (count, seed).

    Authors are drawn one after another, so the first n of `generate_authors(m, seed)` are `generate_authors(n, seed)`.
    """
    if count < 0:
        raise SafeEditError(f"cannot generate {count} authors; ask for 0 or more")
    rng = random.Random(seed)
    names: set[str] = set()
    titles: set[str] = set()
    authors: list[Author] = []
    while len(authors) < count:
        name = _name(rng)
        if name in names:
            continue
        names.add(name)
        books: list[str] = []
        wanted = rng.randint(2, 3)
        while len(books) < wanted:
            title = _title(rng)
            if title not in titles:
                titles.add(title)
                books.append(title)
        city, country = rng.choice(BIRTH_PLACES)
        birth_year = rng.choice(BIRTH_YEARS)
        father_job, mother_job = rng.sample(JOBS, 2)
        authors.append(Author(
            name=name, gender=rng.choice(("female", "male")), birth_year=birth_year, birth_city=city,
            birth_country=country, residence=rng.choice(RESIDENCES), genre=rng.choice(GENRES),
            father_job=father_job, mother_job=mother_job, books=tuple(books),
            debut_year=birth_year + rng.choice(DEBUT_AGES), award=rng.choice(AWARDS), theme=rng.choice(THEMES),
            hobby=rng.choice(HOBBIES), studied=rng.choice(STUDIES),
        ))
    return authors


def _overlaps(a: str, b: str) -> bool:
    a, b = a.lower(), b.lower()
    return a in b or b in a


def author_questions(author: Author, count: int, perturbed: int, seed: int) -> list[QAItem]:
    """`count` questions about different facts of `author` (in `FACTS` order), each with `perturbed` wrong answers.

    Which facts (when count < len(FACTS)) and which wrong values are drawn with a seed of (seed, author name), so an
    author's questions do not depend on the other authors. A wrong value never contains the true one nor is
    contained in it, and the birth places have distinct cities and countries.
    """
    if not 1 <= count <= len(FACTS):
        raise SafeEditError(f"{count} questions per author asked but there are {len(FACTS)} fact templates; "
                            f"ask for 1 to {len(FACTS)}")
    if perturbed < 0:
        raise SafeEditError(f"perturbed={perturbed} is negative; ask for 0 or more wrong answers per question")
    rng = random.Random(f"{seed}:{author.name}")
    chosen = sorted(rng.sample(range(len(FACTS)), count))
    items: list[QAItem] = []
    for index in chosen:
        fact = FACTS[index]
        value = fact.value(author)
        candidates = sorted({v for v in fact.alternatives(author) if not _overlaps(v, value)})
        if perturbed > len(candidates):
            raise SafeEditError(f"perturbed={perturbed} wrong answers asked but fact {fact.key!r} has only "
                                f"{len(candidates)} other values; ask for at most {len(candidates)}")
        wrong = rng.sample(candidates, perturbed)
        items.append(QAItem(
            author=author.name,
            question=_fill(fact.question, author, value),
            answer=_fill(fact.answer, author, value),
            paraphrased=_fill(fact.paraphrase, author, value),
            perturbed=tuple(_fill(fact.paraphrase, author, v) for v in wrong),
        ))
    return items


def qa_fingerprint(items: Sequence[QAItem]) -> dict:
    """Count and SHA-256 of the sorted "question\\nanswer" texts (the record's `Fingerprint` format)."""
    texts = sorted(f"{item.question}\n{item.answer}" for item in items)
    return {"count": len(texts), "ids_sha256": hashlib.sha256("\n\n".join(texts).encode("utf-8")).hexdigest()}


@dataclass(frozen=True)
class AuthorsData:
    """The questions of one unlearning experiment, split by author into forget, retain and held-out authors."""

    forget: list[QAItem]  # questions about the forget authors
    retain: list[QAItem]  # questions about the other trained authors
    holdout: list[QAItem]  # questions about authors never trained on (non-members for membership inference)
    forget_authors: tuple[str, ...]

    def train(self) -> list[QAItem]:
        """Forget + retain, ordered by author name (stable): the same list for every split of the same authors,
        so one fine-tuned model serves every split_seed."""
        return sorted(self.forget + self.retain, key=lambda item: item.author)

    def fingerprints(self) -> dict[str, dict]:
        return {"forget": qa_fingerprint(self.forget), "retain": qa_fingerprint(self.retain),
                "holdout": qa_fingerprint(self.holdout)}


def fictitious_authors(authors: int = 20, questions_per_author: int = 10, holdout_authors: int = 2,
                       forget_ratio: float = 0.1, perturbed: int = 3, seed: int = 0,
                       split_seed: int | None = None) -> AuthorsData:
    """`authors` trained authors (round(forget_ratio * authors) of them to forget, picked with `split_seed`, default
    `seed`) and `holdout_authors` never-trained ones; the people and questions depend on `seed` alone."""
    if authors < 2:
        raise SafeEditError(f"authors={authors} is too few; at least 2 are needed (one to forget, one to retain)")
    if holdout_authors < 0:
        raise SafeEditError(f"holdout_authors={holdout_authors} is negative; use 0 or more")
    if not 1 <= questions_per_author <= len(FACTS):
        raise SafeEditError(f"questions_per_author={questions_per_author} but there are {len(FACTS)} fact "
                            f"templates; use 1 to {len(FACTS)}")
    n_forget = round(forget_ratio * authors)
    if n_forget <= 0:
        raise SafeEditError(f"forget set is empty; raise forget_ratio (now {forget_ratio}) so that "
                            f"forget_ratio * authors ({authors}) rounds to at least 1")
    if n_forget >= authors:
        raise SafeEditError(f"forget_ratio={forget_ratio} forgets all {authors} authors and retains nothing; "
                            f"lower it below {(authors - 0.5) / authors:.3f}")
    people = generate_authors(authors + holdout_authors, seed)
    trained, held = people[:authors], people[authors:]
    rng = random.Random(seed if split_seed is None else split_seed)
    forget_index = set(rng.sample(range(authors), n_forget))

    def questions(group: Sequence[Author]) -> list[QAItem]:
        return [item for a in group for item in author_questions(a, questions_per_author, perturbed, seed)]

    return AuthorsData(
        forget=questions([a for i, a in enumerate(trained) if i in forget_index]),
        retain=questions([a for i, a in enumerate(trained) if i not in forget_index]),
        holdout=questions(held),
        forget_authors=tuple(a.name for i, a in enumerate(trained) if i in forget_index),
    )


def retain_subset(items: list[Any], count: int, seed: int) -> list[Any]:
    """A seeded subset of `count` retain items, in their original order (the evaluated retain questions)."""
    if count >= len(items):
        return list(items)
    keep = set(random.Random(seed).sample(range(len(items)), count))
    return [item for i, item in enumerate(items) if i in keep]
