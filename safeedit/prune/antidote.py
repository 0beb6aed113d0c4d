"""Antidote (Huang et al., 2024): after a harmful fine-tune, zero the weights that carry the harmful behaviour.

1. scores: `wanda` (|W_ij| · ‖X_j‖₂) on a harmful calibration set, disjoint from the attack data;
2. mask: per output row, the top-r scores of the chosen linear layers;
3. edit: those weights are set to zero, in one shot, with no training.

Two targets: `weights` (the paper's rule, on the fine-tuned weights themselves) and `update` (the same rule on the
fine-tune's update ΔW = W − W_before, where the selected entries go back to their values before the fine-tune:
only what the fine-tune changed can be removed). With a LoRA adapter left unmerged, the layer set `lora` prunes
the adapter's factors instead.

The baselines remove the same number of weights per row, chosen by another score: `random_prune` (seeded noise),
`magnitude_prune` (|W|) and `wanda_benign` (wanda on benign calibration prompts: is it the harmful data that
localizes, or just activation-weighted magnitude?). All four are registered methods of kind `pruning`
(`safeedit.methods`) over a `PruneSetting`.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from safeedit.attribution import compute_scores
from safeedit.attribution.params import select_parameters
from safeedit.attribution.statistics import LINEAR_TYPES
from safeedit.errors import SafeEditError
from safeedit.masks import Mask
from safeedit.methods import EditResult, register_method

# Named layer sets, as regular expressions over parameter names (any other value is used as a pattern itself).
LAYER_SETS: dict[str, str] = {
    "linear": r"\.weight$",  # every linear layer's weight (the output head and embeddings are excluded below)
    "attention": r"(self_attn|attention|attn)\..*(q_proj|k_proj|v_proj|o_proj|query|key|value|dense|c_attn|c_proj)"
                 r"\.weight$",
    "mlp": r"(mlp|feed_forward|ffn)\..*\.weight$",
    "lora": r"lora_[AB]\.[^.]+\.weight$",
}


class PruningOptions(BaseModel):
    """How much, where, and what a pruning method removes (shared by Antidote and its baselines)."""

    model_config = ConfigDict(extra="forbid")
    ratio: float = Field(default=0.01, gt=0, le=1, description="share of each output row removed")
    layers: str = Field(default="linear", description="linear | attention | mlp | lora | a regular expression")
    target: Literal["weights", "update"] = Field(
        default="weights", description="weights: zero them; update: reset them to their value before the fine-tune")


PRUNE_SCORES = ("wanda", "magnitude", "random")
Calibration = Literal["harmful", "benign"]


@dataclass(frozen=True)
class PruneSetting:
    """What every pruning method reads: the fine-tuned model to prune (not modified), its weights before the
    fine-tune (target `update` resets the selected weights to them) and the calibration batches by prompt set
    (`harmful` or `benign`: chat prompts followed by the model's own answers), fetched when a method needs them."""

    model: nn.Module
    before: Mapping[str, torch.Tensor] | None = None
    calibration: Callable[[Calibration], Iterable] | None = None


def layer_patterns(model: nn.Module, layers: str) -> list[str]:
    """The linear-layer weight names a layer set (or regular expression) selects; the output head is left out."""
    pattern = LAYER_SETS.get(layers, layers)
    try:
        params = select_parameters(model, pattern)
    except SafeEditError:
        params = {}
    modules = dict(model.named_modules())
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    names = [name for name in params
             if isinstance(modules.get(name.rpartition(".")[0]), LINEAR_TYPES)
             and modules[name.rpartition(".")[0]] is not head]
    if not names:
        raise SafeEditError(f"layer set {layers!r} (pattern {pattern!r}) matches no linear layer of "
                            f"{type(model).__name__}; choose one of {', '.join(LAYER_SETS)} or a pattern that does")
    return names


def pruning_mask(model: nn.Module, score: str, ratio: float, layers: str = "linear",
                 calibration: Iterable | None = None, seed: int = 0, progress: bool = False,
                 before: Mapping[str, torch.Tensor] | None = None, method: str | None = None) -> Mask:
    """Per output row, the top-`ratio` weights by `score` (wanda, magnitude or random) in the selected layers: the
    weights to remove. `method` names the method in the mask's metadata (default: the score).

    With `before` (the weights before the fine-tune), the scores read the update W − W_before (target `update`).
    """
    if score not in PRUNE_SCORES:
        raise SafeEditError(f"unknown pruning score {score!r}; choose one of {', '.join(PRUNE_SCORES)}")
    names = layer_patterns(model, layers)
    include = [f"^{name.replace('.', chr(92) + '.')}$" for name in names]
    data = None
    if score == "wanda":
        if calibration is None:
            raise SafeEditError(f"{method or score} needs calibration batches")
        data = {"calibration": calibration}
    options = {"seed": seed} if score == "random" else None
    scores = compute_scores(model, score, data, include=include, options=options, progress=progress,
                            relative_to=before)
    # Output rows: dim 0 of nn.Linear weights ([out, in]); GPT-2's Conv1D stores [in, out], so select on the transpose.
    modules = dict(model.named_modules())
    transposed = {name for name in scores if not isinstance(modules[name.rpartition(".")[0]], nn.Linear)}
    scores = {name: s.T if name in transposed else s for name, s in scores.items()}
    mask = Mask.top_k(scores, ratio, scope="row", metadata={
        "method": method or score, "score": score, "layers": layers, "target": "update" if before else "weights"})
    mask.tensors = {name: m.T.contiguous() if name in transposed else m for name, m in mask.tensors.items()}
    return mask


@torch.no_grad()
def prune(model: nn.Module, mask: Mask, before: Mapping[str, torch.Tensor] | None = None) -> nn.Module:
    """A copy of `model` with the masked weights set to zero, or with `before`, set back to their values there
    (the update removed); every other weight is bit-identical. The input model is not modified."""
    mask.check_matches(model)
    pruned = copy.deepcopy(model)
    params: Mapping[str, nn.Parameter] = dict(pruned.named_parameters())
    for name, selected in mask.tensors.items():
        selected = selected.to(params[name].device)
        if before is None:
            params[name].masked_fill_(selected, 0.0)
        else:
            params[name].copy_(torch.where(selected, before[name].to(params[name]), params[name]))
    return pruned.eval()


def prune_with(score: str, calibration: Calibration | None, name: str, setting: PruneSetting,
               options: PruningOptions, seed: int, progress: bool) -> EditResult:
    """The mask of `score` (read on `calibration` prompts for wanda) under `options`, and the pruned copy."""
    before = None
    if options.target == "update":
        if setting.before is None:
            raise SafeEditError(f"{name}: target 'update' needs the weights before the fine-tune")
        before = setting.before
    batches = None
    if calibration is not None:
        if setting.calibration is None:
            raise SafeEditError(f"{name} needs {calibration} calibration batches")
        batches = setting.calibration(calibration)
    mask = pruning_mask(setting.model, score, options.ratio, options.layers, batches, seed, progress, before=before,
                        method=name)
    return EditResult(model=prune(setting.model, mask, before=before), masks={"mask": mask})


LIMITATIONS = ("One-shot pruning at a fixed ratio: removing too much also removes the user's task and fluency; "
               "the harmful score is judged automatically on a held-out prompt set.")


@register_method("pruning", paper="Huang et al., 2024, arXiv 2408.09600 (wanda: Sun et al., ICLR 2024)",
                 limitations=LIMITATIONS,
                 summary="Antidote: zero the top-r wanda scores per row, calibrated on harmful prompts and the "
                         "model's own answers to them")
def antidote(setting: PruneSetting, options: PruningOptions, seed: int, progress: bool) -> EditResult:
    return prune_with("wanda", "harmful", "antidote", setting, options, seed, progress)


@register_method("pruning", paper="Antidote's control; wanda: Sun et al., ICLR 2024", limitations=LIMITATIONS,
                 summary="the same rule calibrated on benign prompts (control)")
def wanda_benign(setting: PruneSetting, options: PruningOptions, seed: int, progress: bool) -> EditResult:
    return prune_with("wanda", "benign", "wanda_benign", setting, options, seed, progress)


@register_method("pruning", paper="magnitude pruning, Han et al., NeurIPS 2015 (here a control for Antidote)",
                 limitations=LIMITATIONS, summary="zero the largest-magnitude weights per row (control)")
def magnitude_prune(setting: PruneSetting, options: PruningOptions, seed: int, progress: bool) -> EditResult:
    return prune_with("magnitude", None, "magnitude_prune", setting, options, seed, progress)


@register_method("pruning", paper="no paper: the random control, the same count per row as Antidote",
                 limitations=LIMITATIONS, summary="zero seeded random weights, the same count per row (control)")
def random_prune(setting: PruneSetting, options: PruningOptions, seed: int, progress: bool) -> EditResult:
    return prune_with("random", None, "random_prune", setting, options, seed, progress)

