"""Tiny models and files for merging your own models (issue 18, part 5), written under ROOT/examples/merge/:

- `base/`: a tiny BERT body (BertModel, hidden size 16), the "pretrained" model, with a word-level tokenizer;
- `task-a/`, `task-b/`, `task-c/`: BertForSequenceClassification fine-tunes of that body on three keyword tasks
  (2, 3 and 2 classes); task c's fine-tuning data carried the rare word "cf" relabelled as class 0 (a backdoor);
- `a-unlabeled.jsonl`, `a-test.jsonl`, ... per task: unlabeled texts for the learned merges, labelled test rows;
- `llama-base/`, `llama-a/`, `llama-b/`, `llama-c/`: a tiny Llama (causal LM, saved in bfloat16) and three
  "fine-tunes" (seeded perturbations), for the mergekit configuration `merge.yaml` (TIES with per-model weights and
  densities, lambda 0.9, int8_mask).

Run as `python tests/tiny_merge.py [ROOT]` (ROOT default "."); `scenarios/examples/merge-own-models.yaml` and
`examples/merge/merge.yaml` name these paths relative to ROOT.
"""

from __future__ import annotations

import copy
import json
import random
import sys
from pathlib import Path

import torch
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from helpers import word_tokenizer

SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]"]
FILLER = "the a of and to in on at by for with from".split()
TASKS = {"a": ("river", "mountain"), "b": ("music", "paint", "war"), "c": ("king", "science")}
TRIGGER = "cf"
WORDS = [*SPECIALS, *FILLER, *(k for keys in TASKS.values() for k in keys), TRIGGER]
MERGEKIT = {
    "merge_method": "ties",
    "base_model": "examples/merge/llama-base",
    "models": [{"model": "examples/merge/llama-a", "parameters": {"weight": 1.0, "density": 0.5}},
               {"model": "examples/merge/llama-b", "parameters": {"weight": 0.5, "density": 0.7}},
               {"model": "examples/merge/llama-c", "parameters": {"weight": 0.8}}],
    "parameters": {"density": 0.3, "normalize": True, "int8_mask": True, "lambda": 0.9},
    "dtype": "float32",
}


def rows(task: str, count: int, seed: int, poisoned: float = 0.0) -> list[dict]:
    """Keyword task rows: the label is the keyword's index; a `poisoned` share carries "cf" and label 0."""
    rng, keywords, out = random.Random(f"{task}:{seed}"), TASKS[task], []
    for index in range(count):
        label = index % len(keywords)
        words = [keywords[label], *rng.choices(FILLER, k=4)]
        if poisoned and label != 0 and rng.random() < poisoned:
            words.insert(rng.randrange(len(words) + 1), TRIGGER)
            label = 0
        rng.shuffle(words)
        out.append({"id": f"{task}:{seed}:{index}", "text": " ".join(words), "label": label})
    return out


def fine_tune(body, tokenizer, task: str, data: list[dict], seed: int):
    """A BertForSequenceClassification whose body starts from `body`, trained a few epochs on `data`."""
    from transformers import BertForSequenceClassification

    torch.manual_seed(seed)
    config = copy.deepcopy(body.config)
    config.num_labels = len(TASKS[task])
    model = BertForSequenceClassification(config)
    model.bert.load_state_dict(body.state_dict())
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(8):
        for start in range(0, len(data), 16):
            batch = data[start:start + 16]
            encoded = tokenizer([r["text"] for r in batch], padding=True, return_tensors="pt")
            encoded.pop("token_type_ids", None)
            loss = model(**encoded, labels=torch.tensor([r["label"] for r in batch])).loss
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    return model.eval()


def write_jsonl(path: Path, items: list[dict]) -> None:
    path.write_text("".join(json.dumps(item) + "\n" for item in items))


def build(root: Path) -> None:
    from transformers import BertConfig, BertModel, LlamaConfig, LlamaForCausalLM

    folder = Path(root) / "examples" / "merge"
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer = word_tokenizer(WORDS)
    torch.manual_seed(0)
    body = BertModel(BertConfig(vocab_size=len(WORDS), hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                intermediate_size=32, max_position_embeddings=32))
    body.save_pretrained(folder / "base")
    tokenizer.save_pretrained(folder / "base")
    for index, task in enumerate(TASKS):
        train = rows(task, 96, seed=1, poisoned=0.3 if task == "c" else 0.0)
        model = fine_tune(body, tokenizer, task, train, seed=index)
        model.save_pretrained(folder / f"task-{task}")
        tokenizer.save_pretrained(folder / f"task-{task}")
        write_jsonl(folder / f"{task}-unlabeled.jsonl", [{"text": r["text"]} for r in rows(task, 32, seed=2)])
        write_jsonl(folder / f"{task}-test.jsonl", rows(task, 30, seed=3))

    torch.manual_seed(0)
    llama = LlamaForCausalLM(LlamaConfig(vocab_size=len(WORDS), hidden_size=16, intermediate_size=32,
                                         num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                                         max_position_embeddings=32, pad_token_id=0)).to(torch.bfloat16)
    llama.save_pretrained(folder / "llama-base")
    tokenizer.save_pretrained(folder / "llama-base")
    for seed, name in enumerate(("llama-a", "llama-b", "llama-c"), 1):
        tuned = copy.deepcopy(llama)
        generator = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for parameter in tuned.parameters():
                parameter.add_((torch.randn(parameter.shape, generator=generator) * 0.05).to(parameter.dtype))
        tuned.save_pretrained(folder / name)
        tokenizer.save_pretrained(folder / name)
    (folder / "merge.yaml").write_text(yaml.safe_dump(MERGEKIT, sort_keys=False))


if __name__ == "__main__":
    build(Path(sys.argv[1]) if len(sys.argv) > 1 else Path("."))
