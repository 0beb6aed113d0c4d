"""RMU (Li et al. 2024, "The WMDP benchmark"; as open-unlearning's src/trainer/unlearn/rmu.py): steer the hidden
states of one decoder layer on forget answers toward a fixed random direction c·u, and keep them on retain answers
where the frozen original has them."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from safeedit.data.chat import IGNORE_INDEX
from safeedit.errors import SafeEditError
from safeedit.unlearn.lm_objectives import LMUnlearnData, Loss, read_frozen
from safeedit.unlearn.objectives import Objective, Phase


def decoder_layer(model: nn.Module, layer: int) -> str:
    """The module path of decoder layer `layer` (`model.layers.7` in a Llama): the first module list holding
    `config.num_hidden_layers` blocks."""
    count = getattr(getattr(model, "config", None), "num_hidden_layers", None)
    stacks = [name for name, module in model.named_modules() if isinstance(module, nn.ModuleList) and
              count is not None and len(module) == count]
    if not stacks:
        raise SafeEditError(f"rmu: no list of decoder layers found in {type(model).__name__}; RMU steers the "
                            "output of one decoder layer of a Hugging Face causal LM (config.num_hidden_layers)")
    if not 0 <= layer < count:
        raise SafeEditError(f"rmu: layer {layer} does not exist; the model has {count} decoder layers "
                            f"(0-{count - 1}); set the method's `layer` to one of them")
    return f"{stacks[0]}.{layer}"


def layer_output(model: nn.Module, path: str, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """The output (b, s, d) of module `path` of `model` on `batch`, in float32 (the hidden states, the first element
    where the layer returns a tuple). Only the body (`base_model`) runs: the output head is not needed."""
    captured: list[torch.Tensor] = []

    def keep(module: nn.Module, inputs: Any, output: Any) -> None:
        captured.append(output[0] if isinstance(output, tuple) else output)

    handle = model.get_submodule(path).register_forward_hook(keep)
    try:
        model.base_model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    finally:
        handle.remove()
    return captured[0].float()


def steering_vector(dim: int, steering_coeff: float, seed: int) -> torch.Tensor:
    """c·u: u = r/‖r‖ with r uniform on [0, 1)^dim drawn from a generator seeded with `seed` (`torch.rand`, as in
    open-unlearning's `get_control_vector` and the WMDP code it borrows from)."""
    r = torch.rand(dim, generator=torch.Generator().manual_seed(seed))
    return steering_coeff * r / r.norm()


def activation_distance(hidden: torch.Tensor, target: torch.Tensor, answer: torch.Tensor) -> torch.Tensor:
    """Squared difference averaged over the hidden units, then over each sequence's `answer` positions (b, s), then
    over the sequences (open-unlearning's `compute_activation_loss`)."""
    per_token = (hidden - target).pow(2).mean(dim=-1)
    per_sequence = (per_token * answer).sum(dim=1) / answer.sum(dim=1).clamp(min=1)
    return per_sequence.mean()


def rmu_loss(reference: nn.Module, path: str, steering_coeff: float, seed: int, retain_weight: float) -> Loss:
    """RMU (Li et al. 2024, WMDP): the hidden states at `path` on forget answers toward c·u, on retain answers
    toward the frozen reference's. The positions are the answer tokens (labels not ignored), as open-unlearning."""
    target: list[torch.Tensor] = []  # c·u, drawn once the hidden size is seen

    def loss(model: nn.Module, batch: dict) -> torch.Tensor:
        forget, retain = batch["forget"], batch["retain"]
        hidden = layer_output(model, path, forget)
        if not target:
            target.append(steering_vector(hidden.shape[-1], steering_coeff, seed))
        original = read_frozen(reference, lambda frozen: layer_output(frozen, path, retain))
        forget_term = activation_distance(hidden, target[0].to(hidden.device), forget["labels"] != IGNORE_INDEX)
        retain_term = activation_distance(layer_output(model, path, retain), original,
                                          retain["labels"] != IGNORE_INDEX)
        return forget_term + retain_weight * retain_term

    return loss


def rmu(data: LMUnlearnData, reference: nn.Module, layer: int = 7, steering_coeff: float = 2.0,
        retain_weight: float = 1.0) -> Objective:
    loader = data.loader()
    loss = rmu_loss(reference, decoder_layer(reference, layer), steering_coeff, data.seed, retain_weight)
    return lambda epoch: [Phase("rmu", loader, loss)]
