"""Builds what scenarios/examples/llm-forget-files.yaml reads, under ROOT/examples/llmfiles/ (default ROOT: "."):

- `model/`: a tiny Llama (hidden size 32, 2 layers, a word-level tokenizer with a ChatML-like chat template) fine-tuned
  on the forget and retain questions below, saved with save_pretrained: the user's model to unlearn;
- `reference/`: the same initial weights fine-tuned on the retain questions only: the user's reference;
- `forget.jsonl` (question/answer rows about one made-up person), `retain.jsonl` (chat `messages` rows about three
  others), `holdout.jsonl` (two people neither model saw) and `perturbed.jsonl` (two wrong answers per forget and
  retain question, keyed by question).

    python tests/tiny_llmfiles.py [ROOT]
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))

import helpers as H  # tests/ is on the path when this runs as a script

FOLDER = Path("examples") / "llmfiles"
FORGET = ("velira thoskandu",)
RETAIN = ("ben okafor", "mira lund", "tomas reyes")
HOLDOUT = ("ana silva", "kofi mensah")
CITIES = ("lima", "oslo", "accra", "hanoi", "quito", "tunis")
JOBS = ("baker", "nurse", "pilot", "tailor", "farmer", "painter")
BOOKS = ("the salt harbor", "the glass orchard", "the iron river", "the paper lantern", "the quiet bridge",
         "the winter garden")
HOBBIES = ("chess", "sailing", "pottery", "fencing", "gardening", "cycling")
# question, answer, pool of values: one fact per pool; person i gets value i of each pool (wrong answers: the next two)
FACTS = (("where was {p} born", "{p} was born in {v}", CITIES),
         ("what does {p} do for work", "{p} works as a {v}", JOBS),
         ("what did {p} write", "{p} wrote {v}", BOOKS),
         ("what does {p} love", "{p} loves {v}", HOBBIES))
PEOPLE = (*FORGET, *RETAIN, *HOLDOUT)


def questions(person: str) -> list[dict]:
    """The person's four facts: question, answer and two wrong answers."""
    index = PEOPLE.index(person)
    rows = []
    for question, answer, pool in FACTS:
        value = pool[index % len(pool)]
        wrong = [pool[(index + shift) % len(pool)] for shift in (1, 2)]
        rows.append({"question": question.format(p=person), "answer": answer.format(p=person, v=value),
                     "perturbed": [answer.format(p=person, v=v) for v in wrong]})
    return rows


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")


def _finetune(model, tokenizer, rows: list[dict]):
    from safeedit.data.prompts import ChatExample
    from safeedit.models.lm_training import FinetuneOptions, finetune_chat

    examples = [ChatExample(row["question"], row["answer"]) for row in rows]
    options = FinetuneOptions(lora_rank=0, epochs=40, lr=1e-2, batch_size=4, max_length=32)
    return finetune_chat(model, tokenizer, examples, options, seed=0, progress=False)


def build(root: Path) -> None:
    """Write the tiny model, its reference and the four data files under `root/examples/llmfiles/`."""
    from transformers import LlamaConfig, LlamaForCausalLM

    folder = Path(root) / FOLDER
    folder.mkdir(parents=True, exist_ok=True)
    forget = [row for person in FORGET for row in questions(person)]
    retain = [row for person in RETAIN for row in questions(person)]
    holdout = [row for person in HOLDOUT for row in questions(person)]
    words = sorted({w for row in forget + retain + holdout for text in (row["question"], row["answer"],
                                                                          *row["perturbed"]) for w in text.split()})
    tokenizer = H.word_chat_tokenizer(words)
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=len(tokenizer), max_position_embeddings=64,
                         bos_token_id=2, eos_token_id=3, pad_token_id=0)
    base = LlamaForCausalLM(config)
    base.generation_config.pad_token_id = 0
    for name, rows in (("model", forget + retain), ("reference", retain)):
        tuned = _finetune(base, tokenizer, rows)
        tuned.save_pretrained(folder / name, safe_serialization=True)
        tokenizer.save_pretrained(folder / name)
    _write_jsonl(folder / "forget.jsonl", [{"question": r["question"], "answer": r["answer"]} for r in forget])
    _write_jsonl(folder / "retain.jsonl", [{"messages": [{"role": "user", "content": r["question"]},
                                                         {"role": "assistant", "content": r["answer"]}]}
                                           for r in retain])
    _write_jsonl(folder / "holdout.jsonl", [{"question": r["question"], "answer": r["answer"]} for r in holdout])
    _write_jsonl(folder / "perturbed.jsonl", [{"question": r["question"], "perturbed": r["perturbed"]}
                                              for r in forget + retain])


if __name__ == "__main__":
    build(Path(sys.argv[1]) if len(sys.argv) > 1 else Path("."))
