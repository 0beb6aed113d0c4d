"""Tiny models and data for the edited-model outputs path (issue 18, item 6): a BERT ticket classifier saved with
save_pretrained, a peft LoRA adapter on it (its base named by a path relative to ROOT, as a user's adapter names
its base), and a CSV of 60 support tickets of 10 customers, under ROOT/examples/outputs/.

    python tests/tiny_outputs.py [ROOT]      (ROOT default ".")
"""

from __future__ import annotations

import random
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))

from helpers import word_tokenizer

WORDS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "late", "paid", "refund", "card", "loan", "ok"]
CUSTOMERS = [f"C{n:03d}" for n in range(1, 11)]
FOLDER = Path("examples") / "outputs"
BASE, ADAPTER, TICKETS = FOLDER / "ticket-classifier", FOLDER / "ticket-adapter", FOLDER / "tickets.csv"


def tiny_bert(seed: int = 0, hidden: int = 8, layers: int = 1):
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(seed)
    return BertForSequenceClassification(BertConfig(vocab_size=len(WORDS), hidden_size=hidden,
                                                    num_hidden_layers=layers, num_attention_heads=2,
                                                    intermediate_size=16, num_labels=2))


def lora_adapter(base, base_name: str, seed: int = 1):
    """A LoRA adapter (query and value, rank 2; the classifier head trained with it) with random, non-zero
    factors, so the adapter changes what the model computes."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    base.name_or_path = base_name  # what peft writes as base_model_name_or_path
    config = LoraConfig(r=2, lora_alpha=4, target_modules=["query", "value"], task_type="SEQ_CLS",
                        init_lora_weights=False)
    return get_peft_model(base, config)


def build(root: Path) -> None:
    """Write the classifier, its adapter and the tickets under `root`/examples/outputs."""
    root = Path(root)
    base = tiny_bert()
    base.save_pretrained(root / BASE)
    word_tokenizer(WORDS).save_pretrained(root / BASE)
    # no embedding layers to save: peft would look the base up (on the hub, from elsewhere than ROOT) to decide
    lora_adapter(tiny_bert(), BASE.as_posix()).save_pretrained(root / ADAPTER, save_embedding_layers=False)
    rng = random.Random(0)
    rows = ["id,customer_id,text,label"]
    for index in range(60):
        words = rng.choices(WORDS[4:], k=4)
        rows.append(f"{index},{CUSTOMERS[index % 10]},{' '.join(words)},{int('late' in words)}")
    (root / TICKETS).write_text("\n".join(rows) + "\n")


if __name__ == "__main__":
    build(Path(sys.argv[1] if len(sys.argv) > 1 else "."))
