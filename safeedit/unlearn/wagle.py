"""WAGLE (Jia et al., NeurIPS 2024): weight attribution-guided LLM unlearning, as its algorithm box reads.

1. Attribution: g_f, the summed gradient of the forget NLL, and g_r, of the NLL on one paired retain example per
   forget example; s = |(θ − g_r/γ) ⊙ g_f| (the `wagle` score of the attribution core).
2. Mask: the globally top-r weights by s.
3. Unlearning: any LLM objective (GradDiff, NPO, refusal) with its retain term, updating only masked weights.

The objectives are the registered methods of kind `llm-unlearning` (`safeedit.methods`). A scenario names one as
`<objective>+<score>` (`npo+wagle`, `graddiff+random`, ...) or `<objective>` alone (dense: every weight may change),
so the mask ablation is one name: `wagle`, `saliency`, `magnitude` and `random` masks all take the same ratio.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from pydantic import AliasChoices, BaseModel, ConfigDict, Field, model_serializer
from torch import nn

from safeedit.attribution.select import score_mask
from safeedit.config import stated
from safeedit.data.chat import chat_loader
from safeedit.data.prompts import ChatExample
from safeedit.errors import SafeEditError
from safeedit.masks import Mask
from safeedit.methods import EditResult, Resolved, register_method, resolve
from safeedit.unlearn import lm_objectives
from safeedit.unlearn.lm_objectives import LMUnlearnData, check_forget_retain, paired_retain
from safeedit.unlearn.loop import TrainingOptions, unlearn
from safeedit.unlearn.objectives import Objective

KIND = "llm-unlearning"
# The attribution scores an objective can be confined to (`<objective>+<score>`), and what each mask lets change
# (`wagle`: Jia et al., NeurIPS 2024).
MASK_ABOUT = {
    None: "every weight may change",
    "wagle": "only the top-r weights by WAGLE attribution |(θ − g_r/γ) ⊙ g_f| change (Jia et al. 2024)",
    "saliency": "only the top-r weights by forget-gradient saliency |g_f| change",
    "magnitude": "only the top-r weights by magnitude change",
    "random": "only a random r of the weights change (the control for the masks)",
}
MASK_SCORES = tuple(score for score in MASK_ABOUT if score is not None)
APPROXIMATE = (
    "Approximate unlearning: the edited model is not proven identical to one never trained on the forget data; "
    "the evidence is behavioural (answers, answer probabilities, a membership attack) on the questions evaluated "
    "here, and paraphrased or indirect questions may still recover the facts.")
LIMITATIONS = (f"{APPROXIMATE} Hyper-parameters were chosen on other forget sets (benchmarks/wagle.py); another "
               "model or request may need them re-tuned.")


# Options for models past one device (issue 22): in a record only when set.
LARGE_MODEL_OPTIONS = ("gradient_accumulation_steps", "gradient_checkpointing", "mixed_precision")


class LMUnlearnOptions(BaseModel):
    """AdamW on the paired forget/retain batches; the mask options apply when the method names a score."""

    model_config = ConfigDict(extra="forbid")
    epochs: int = Field(default=5, ge=1, description="passes over the forget set")
    lr: float = Field(default=1e-5, gt=0)
    batch_size: int = Field(default=4, ge=1, description="forget examples per step (and as many retain examples)")
    max_length: int = Field(default=160, ge=8)
    grad_clip: float | None = Field(default=1.0, gt=0)
    retain_weight: float = Field(default=1.0, ge=0, description="γ_r, the weight of the retain NLL")
    ratio: float = Field(default=0.2, gt=0, le=1, validation_alias=AliasChoices("ratio", "mask_ratio"),
                         description="share of weights the masked methods edit (`mask_ratio` is the old name)")
    gamma: float = Field(default=1.0, gt=0, description="WAGLE's Hessian-diagonal constant γ")
    gradient_accumulation_steps: int = Field(default=1, ge=1, description="batches per optimizer step")
    gradient_checkpointing: bool = Field(default=False, description="recompute activations in backward (less memory)")
    mixed_precision: Literal["no", "bf16"] = Field(default="no", description="bf16: forward passes under autocast")

    @model_serializer(mode="wrap")
    def _stated(self, handler: Any) -> dict[str, Any]:
        return stated(handler(self), self, LARGE_MODEL_OPTIONS)


class NPOOptions(LMUnlearnOptions):
    beta: float = Field(default=0.1, gt=0, description="NPO's inverse temperature")


class LMUnlearnDefaults(NPOOptions):
    """A scenario's `unlearning:` section: the options every objective starts from; each takes those it has."""

    @classmethod
    def for_method(cls, options: BaseModel, method_options: type[BaseModel]) -> dict[str, Any]:
        """The part of `options` that `method_options` (an objective's configuration) shares by inheritance: from
        these defaults, the `LMUnlearnOptions` go to every objective and `beta` only to NPO's (`NPOOptions`), so an
        objective's own option of the same name (SimNPO's β, on another scale) keeps its default unless set for that
        method; options of the objective's own class pass whole."""
        shared = next(base for base in type(options).__mro__ if issubclass(method_options, base))
        return {k: v for k, v in options.model_dump().items() if k in getattr(shared, "model_fields", {})}


@dataclass(frozen=True)
class LMUnlearnSetting:
    """What every LLM unlearning method reads: the model (the frozen reference: it is not modified), its tokenizer,
    the forget and retain examples, the mask score from the method's name (`None`: dense) and, to edit in place,
    the model to edit (`target`: the reference itself, or a second copy of it; `None`: a copy of the reference)."""

    model: nn.Module
    tokenizer: Any
    forget: Sequence[ChatExample]
    retain: Sequence[ChatExample]
    mask_score: str | None = None
    target: nn.Module | None = None


# The objectives that compare against the frozen reference model while training: editing that model in place would
# move their reference.
READ_REFERENCE = ("npo", "rmu")


def about(resolved: Resolved) -> dict[str, str]:
    """The record's `about` entry: the objective's summary and what its mask lets change, and its limitations."""
    return {**resolved.spec.about, "summary": f"{resolved.spec.summary}; {MASK_ABOUT[resolved.mask_score]}"}


def lm_mask(model: nn.Module, score: str, data: LMUnlearnData, options: LMUnlearnOptions,
            progress: bool = True) -> Mask:
    """Steps 1-2: the top-r weights by `score`, read from the forget set and its paired retain examples."""
    tokenizer, size, length = data.tokenizer, data.batch_size, data.max_length
    roles = {"forget": chat_loader(tokenizer, data.forget, size, length),
             "retain": chat_loader(tokenizer, paired_retain(data.forget, data.retain, data.seed), size, length)}
    score_options = {"wagle": {"gamma": options.gamma}, "random": {"seed": data.seed}}.get(score)
    return score_mask(model, score, roles, options.ratio, options=score_options, progress=progress)


def masked_unlearn(name: str, objective: Callable[[LMUnlearnData], Objective], setting: LMUnlearnSetting,
                   options: LMUnlearnOptions, seed: int, progress: bool) -> EditResult:
    """Step 3 (after steps 1-2 when the setting names a mask score): `objective` on a copy of the model, or on
    `setting.target` in place."""
    check_forget_retain(setting.forget, setting.retain)
    if setting.target is setting.model and name in READ_REFERENCE:
        raise SafeEditError(f"{name} compares against the frozen original model, which editing it in place would "
                            "move; pass reference= (a second copy of the model, sharded the same way), or use "
                            "graddiff, refusal or simnpo")
    if setting.mask_score not in (None, *MASK_SCORES):
        raise SafeEditError(f"unknown mask score {setting.mask_score!r}; one of {', '.join(MASK_SCORES)}")
    data = LMUnlearnData(setting.tokenizer, setting.forget, setting.retain, options.batch_size, options.max_length,
                         seed)
    mask = lm_mask(setting.model, setting.mask_score, data, options, progress) if setting.mask_score else None
    training = TrainingOptions(epochs=options.epochs, lr=options.lr, weight_decay=0.0, batch_size=options.batch_size,
                               grad_clip=options.grad_clip, optimizer="adamw_fused",
                               gradient_accumulation_steps=options.gradient_accumulation_steps,
                               gradient_checkpointing=options.gradient_checkpointing,
                               mixed_precision=options.mixed_precision)
    torch.manual_seed(seed)  # dropout, where the architecture has it: the same seed repeats the same run
    label = f"{name}+{setting.mask_score}" if setting.mask_score else name
    in_place = setting.target is not None
    edited = unlearn(setting.target if in_place else setting.model, objective(data), training, mask, progress, label,
                     in_place=in_place)
    return EditResult(model=edited, masks={"mask": mask} if mask is not None else {})


@register_method(KIND, paper="Liu et al. 2022; as in TOFU, Maini et al. 2024",
                 summary="gradient ascent on the forget answers, descent on paired retain answers (GradDiff)",
                 limitations=LIMITATIONS, mask_scores=MASK_SCORES)
def graddiff(setting: LMUnlearnSetting, options: LMUnlearnOptions, seed: int, progress: bool) -> EditResult:
    return masked_unlearn("graddiff", lambda data: lm_objectives.graddiff(data, options.retain_weight), setting,
                          options, seed, progress)


@register_method(KIND, paper="Zhang et al., COLM 2024",
                 summary="negative preference optimization against the frozen original (NPO, β = 0.1) plus the "
                         "retain NLL",
                 limitations=LIMITATIONS, mask_scores=MASK_SCORES)
def npo(setting: LMUnlearnSetting, options: NPOOptions, seed: int, progress: bool) -> EditResult:
    return masked_unlearn("npo", lambda data: lm_objectives.npo(data, setting.model, options.retain_weight,
                                                                 options.beta), setting, options, seed, progress)


@register_method(KIND, paper="'I don't know' (rejection) tuning, as in TOFU, Maini et al. 2024",
                 summary="teach a refusal answer to the forget questions, plus the retain NLL",
                 limitations=LIMITATIONS, mask_scores=MASK_SCORES)
def refusal(setting: LMUnlearnSetting, options: LMUnlearnOptions, seed: int, progress: bool) -> EditResult:
    return masked_unlearn("refusal", lambda data: lm_objectives.refusal(data, options.retain_weight), setting,
                          options, seed, progress)


def lm_unlearn(model: nn.Module, tokenizer: Any, forget: Sequence[ChatExample], retain: Sequence[ChatExample],
               method: str, options: LMUnlearnOptions, seed: int = 0, progress: bool = True,
               in_place: bool = False, reference: nn.Module | None = None) -> tuple[nn.Module, Mask | None]:
    """The unlearned copy of `model` (the input is the frozen reference and is not modified) and its mask, for a
    method named `<objective>[+<mask score>]`.

    `in_place` edits `model` itself (no copy: a model sharded by FSDP2 cannot be copied; every process runs the same
    call) and returns it. NPO and RMU then need `reference`, an unedited second copy of the model (loaded and sharded
    like it), to compare against; the mask is scored on `reference` when given, else on `model` before the edit."""
    if reference is not None and not in_place:
        raise SafeEditError("reference= is for in_place=True runs; without in_place the input model is the reference")
    resolved = resolve(KIND, method)
    own = resolved.spec.validate(LMUnlearnDefaults.for_method(options, resolved.spec.options))
    setting = LMUnlearnSetting(reference if reference is not None else model, tokenizer, forget, retain,
                               resolved.mask_score, target=model if in_place else None)
    result = resolved.spec.run(setting, own, seed, progress)
    return result.model, result.mask
