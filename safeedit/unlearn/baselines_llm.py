"""SimNPO and RMU, the baselines LLM-unlearning papers compare against, as objectives of the one masked loop.

Like GradDiff, NPO and refusal (`safeedit.unlearn.wagle`), each is a method of kind `llm-unlearning` that any
mask confines (`simnpo+wagle`, `rmu+random`, ...) or none (`simnpo`, `rmu`: every weight may change). The losses
are `lm_objectives.simnpo_loss` and `rmu.rmu_loss`. The defaults are open-unlearning's
(github.com/locuslab/open-unlearning, `configs/trainer/SimNPO.yaml` and `configs/trainer/RMU.yaml`), set there
for TOFU on Llama-class models and not tuned here.
"""

from __future__ import annotations

from pydantic import Field

from safeedit.methods import EditResult, register_method
from safeedit.unlearn import lm_objectives
from safeedit.unlearn import rmu as rmu_objective
from safeedit.unlearn.wagle import APPROXIMATE, KIND, MASK_SCORES, LMUnlearnOptions, LMUnlearnSetting, masked_unlearn

UNTUNED = ("The defaults are open-unlearning's for TOFU on Llama-class models, not tuned here; another model or "
           "request may need them re-tuned.")


class SimNPOOptions(LMUnlearnOptions):
    """SimNPO's options; defaults from open-unlearning `configs/trainer/SimNPO.yaml` (`alpha: 1.0` there is
    `retain_weight`, whose default is already 1)."""

    beta: float = Field(default=4.5, gt=0, description="inverse temperature β (SimNPO.yaml: beta 4.5)")
    delta: float = Field(default=0.0, ge=0, description="margin δ on the mean NLL per answer token; the paper's γ "
                                                         "is β·δ (SimNPO.yaml: delta 0.0)")
    forget_weight: float = Field(default=0.125, gt=0, description="weight of the SimNPO term (SimNPO.yaml: gamma "
                                                                   "0.125, the authors' npo_coeff)")


class RMUOptions(LMUnlearnOptions):
    """RMU's options; defaults from open-unlearning `configs/trainer/RMU.yaml` (which trains every parameter; the
    mask decides here)."""

    layer: int = Field(default=7, ge=0, description="decoder layer whose output is steered (RMU.yaml: "
                                                    "module_regex model.layers.7)")
    steering_coeff: float = Field(default=2.0, gt=0, description="c, the norm of the forget target c·u "
                                                                 "(RMU.yaml: steering_coeff 2)")
    # open-unlearning's `alpha` (RMU.yaml: alpha 1) is the retain weight of every objective: `retain_weight` here. Not
    # an alias: the scenario's shared `retain_weight` would shadow a per-method `alpha`.
    retain_weight: float = Field(default=1.0, ge=0, description="α, the weight of the retain activation term")


@register_method(KIND, paper="Fan et al. 2024, 'Simplicity prevails: rethinking negative preference optimization "
                             "for LLM unlearning'",
                 summary="SimNPO: NPO without a reference model, on the forget answers' mean NLL per token "
                         "(β = 4.5, δ = 0, weight 0.125), plus the retain NLL",
                 limitations=f"{APPROXIMATE} {UNTUNED}", mask_scores=MASK_SCORES)
def simnpo(setting: LMUnlearnSetting, options: SimNPOOptions, seed: int, progress: bool) -> EditResult:
    return masked_unlearn("simnpo", lambda data: lm_objectives.simnpo(
        data, options.retain_weight, options.beta, options.delta, options.forget_weight), setting, options, seed,
        progress)


@register_method(KIND, paper="Li et al., ICML 2024, 'The WMDP benchmark' (RMU)",
                 summary="RMU: one decoder layer's output on forget answers steered to a fixed random direction c·u, "
                         "kept at the original's on retain answers",
                 limitations=(f"{APPROXIMATE} RMU scrambles one layer's representation of the forget answers rather "
                              "than lowering their probability directly. The WMDP code trains only the MLP output "
                              "projections of the steered layer and the two below it; here the mask decides which "
                              "weights change and with no mask every weight may (as open-unlearning's RMU.yaml), "
                              "though the layers above the steered one get no gradient and stay as they were. "
                              f"{UNTUNED}"),
                 mask_scores=MASK_SCORES)
def rmu(setting: LMUnlearnSetting, options: RMUOptions, seed: int, progress: bool) -> EditResult:
    rmu_objective.decoder_layer(setting.model, options.layer)  # a missing layer fails before any mask is scored
    return masked_unlearn("rmu", lambda data: rmu_objective.rmu(
        data, setting.model, options.layer, options.steering_coeff, options.retain_weight), setting, options, seed,
        progress)
