"""Build the files of scenarios/examples/forget-customer-reference.yaml: a user's ticket classifier fine-tuned from
a base checkpoint, that base, a reference the user fine-tuned from it without customer C007, and the tickets.

    python tests/tiny_reference.py [ROOT]      # writes ROOT/examples/reference/ (ROOT default ".")

Everything is tiny (a BERT with hidden size 8, one layer, a 10-word vocabulary) and seeded: the same files every
time. The classifier and the reference are fine-tuned on the rows the scenario trains on (its seeded 25% test
hold-out with seed 0 left out), the reference without C007's rows.
"""

from __future__ import annotations

import random
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))  # helpers, when run as a script
from helpers import word_tokenizer

WORDS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "late", "paid", "refund", "card", "loan", "ok"]
CUSTOMERS = [f"C{n:03d}" for n in range(1, 11)]
FORGET = "C007"
TEST_SPLIT, SEED = 0.25, 0  # as in the scenario: the rows it holds out for testing are never trained on


def tickets_csv(rows: int = 80) -> str:
    """Support tickets of ten customers; label 1 when the ticket says 'late'."""
    rng = random.Random(0)
    lines = ["id,customer_id,text,label"]
    for index in range(rows):
        words = rng.choices(WORDS[4:], k=4)
        lines.append(f"{index},{CUSTOMERS[index % 10]},{' '.join(words)},{int('late' in words)}")
    return "\n".join(lines) + "\n"


def bert_config(**overrides):
    from transformers import BertConfig

    return BertConfig(**{"vocab_size": len(WORDS), "hidden_size": 8, "num_hidden_layers": 1,
                         "num_attention_heads": 2, "intermediate_size": 16, **overrides})


def fine_tune(base: Path, rows, tokenizer, seed: int):
    """The base with a new two-class head, fine-tuned on `rows` (what a user's own training script would do)."""
    from transformers import BertForSequenceClassification

    from safeedit.data import make_loader
    from safeedit.models.training import train_classifier

    torch.manual_seed(seed)
    model = BertForSequenceClassification.from_pretrained(base, num_labels=2, use_safetensors=True)
    loader = make_loader(rows, model, tokenizer, batch_size=8, shuffle=True, seed=seed)
    return train_classifier(model, loader, epochs=3, lr=1e-2, progress=False)


def build(root: Path) -> None:
    """Write ROOT/examples/reference/: base/, ticket-classifier/, reference-model/ and tickets.csv."""
    from transformers.utils import logging

    verbosity = logging.get_verbosity()
    logging.set_verbosity_error()  # no "newly initialized: classifier" report: a new head is the point here
    try:
        _build(Path(root) / "examples" / "reference")
    finally:
        logging.set_verbosity(verbosity)


def _build(folder: Path) -> None:
    from transformers import BertModel

    from safeedit.data.sources import load_train_test

    folder.mkdir(parents=True, exist_ok=True)
    (folder / "tickets.csv").write_text(tickets_csv())
    tokenizer = word_tokenizer(WORDS)
    torch.manual_seed(1)
    BertModel(bert_config()).save_pretrained(folder / "base", safe_serialization=True)
    tokenizer.save_pretrained(folder / "base")
    train, _, _ = load_train_test(str(folder / "tickets.csv"), "train", TEST_SPLIT, SEED)
    retain = train.filter(lambda row: row["customer_id"] != FORGET)
    for name, rows in (("ticket-classifier", train), ("reference-model", retain)):
        fine_tune(folder / "base", rows, tokenizer, seed=2).save_pretrained(folder / name, safe_serialization=True)
        tokenizer.save_pretrained(folder / name)


if __name__ == "__main__":
    build(Path(sys.argv[1]) if len(sys.argv) > 1 else Path("."))
