"""DAM (Yang et al., ICLR 2025): merge task models through two learned masks so that the merge keeps the tasks and
drops a backdoor that one of the task models may carry.

    θ = θ₀ + Σᵢ λᵢ (M₁ ⊙ M₂ ⊙ τᵢ)

Each step alternates:
1. task-shared mask M₁ (Concrete gates): first-order meta-learning. An inner step adapts λ on the entropy of the
   merged model over unlabeled data of every task; the gates then take a step on the entropy at the adapted λ.
2. one inverted universal trigger δₖ per task (the defender does not know which model is backdoored): a few signed
   gradient steps that maximize KL(p(x) ‖ p(x + δₖ)), the change of prediction a universal perturbation can cause.
3. backdoor-detection mask M₂ (Concrete gates): switch off weights so that the merge becomes robust to δₖ,
   minimising the entropy on x + δₖ plus KL(p(x) ‖ p(x + δₖ)) (`consistency`; 0 leaves DESIGN.md's entropy alone;
   entropy alone would also reward a confident backdoor, so the default adds the consistency term).

The final masks are deterministic (σ(x) > 0.5), so the same seed gives the same masks and merge.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from pydantic import Field
from tqdm.auto import tqdm

from safeedit.masks import Mask
from safeedit.merge.concrete import GateOptions
from safeedit.merge.gates import ConcreteGates
from safeedit.merge.setting import MergeSetting, entropy
from safeedit.progress import bars_off


class DAMOptions(GateOptions):
    inner_lr: float = Field(default=0.01, ge=0, description="step size of the inner (meta) update of λ")
    trigger_steps: int = Field(default=3, ge=1, description="signed-gradient steps per trigger update")
    trigger_every: int = Field(default=1, ge=1, description="update the triggers every n steps (warm-started)")
    consistency: float = Field(default=1.0, ge=0, description="weight of KL(p(x) ‖ p(x + δ)) in the M₂ loss")
    trigger_entropy: float = Field(default=1.0, ge=0, description="weight of the entropy on x + δ in the M₂ loss")


@dataclass
class DAMResult:
    parameters: dict[str, torch.Tensor]
    shared_mask: Mask
    backdoor_mask: Mask
    coefficients: torch.Tensor
    triggers: dict[str, torch.Tensor]


def _product(first: dict[str, torch.Tensor], second: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {name: first[name] * second[name] for name in first}


def _detached(gates: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {name: gate.detach() for name, gate in gates.items()}


def invert_trigger(setting: MergeSetting, parameters: dict[str, torch.Tensor], task: str, batch: dict,
                   delta: torch.Tensor, steps: int) -> torch.Tensor:
    """Signed-gradient ascent on KL(p(x) ‖ p(x + δ)) for a universal δ, kept in the body's allowed set."""
    encoder = setting.trigger_space
    with torch.no_grad():
        clean = F.log_softmax(setting.logits(parameters, task, batch), dim=-1)
    for _ in range(steps):
        delta = delta.detach().requires_grad_(True)
        shifted = F.log_softmax(setting.logits(parameters, task, batch, delta), dim=-1)
        change = F.kl_div(shifted, clean, log_target=True, reduction="batchmean")
        (gradient,) = torch.autograd.grad(change, delta)
        with torch.no_grad():
            delta = encoder.project_delta(delta + encoder.delta_step * gradient.sign())
    return delta.detach()


def dam(setting: MergeSetting, options: DAMOptions, seed: int, progress: bool = True) -> DAMResult:
    setting.restart()
    generator = torch.Generator(setting.device).manual_seed(seed)
    shared = ConcreteGates(setting.shapes(), options.init_logit, device=setting.device)
    backdoor = ConcreteGates(setting.shapes(), options.init_logit, device=setting.device)
    shared_optimizer = torch.optim.Adam(shared.parameters(), lr=options.lr)
    backdoor_optimizer = torch.optim.Adam(backdoor.parameters(), lr=options.lr)
    coefficients = torch.full((len(setting.tasks),), options.scale, device=setting.device)
    triggers = {task: setting.trigger_space.new_delta(generator) for task in setting.tasks}

    for step in tqdm(range(options.steps), desc="dam", disable=bars_off(progress), leave=False):
        batches = {task: setting.batch(task) for task in setting.tasks}
        # 1. task-shared mask M₁, with a first-order meta step on λ
        shared_gates, backdoor_gates = shared.sample(generator), _detached(backdoor.sample(generator))
        inner = coefficients.clone().requires_grad_(True)
        inner_loss = setting.entropy_loss(setting.parameters(inner, _detached(_product(shared_gates, backdoor_gates))),
                                          batches)
        (gradient,) = torch.autograd.grad(inner_loss, inner)
        coefficients = (coefficients - options.inner_lr * gradient).clamp(0, 1).detach()
        shared_optimizer.zero_grad(set_to_none=True)
        setting.entropy_loss(setting.parameters(coefficients, _product(shared_gates, backdoor_gates)),
                             batches).backward()
        shared_optimizer.step()

        # 2. an inverted universal trigger per task, against the current deterministic merge
        if step % options.trigger_every == 0:
            with torch.no_grad():
                current = setting.parameters(coefficients, _product(shared.deterministic(), backdoor.deterministic()))
            for task in setting.tasks:
                triggers[task] = invert_trigger(setting, current, task, batches[task], triggers[task],
                                                options.trigger_steps)

        # 3. backdoor-detection mask M₂: the merge must not respond to the triggers
        shared_gates, backdoor_gates = _detached(shared.sample(generator)), backdoor.sample(generator)
        parameters = setting.parameters(coefficients, _product(shared_gates, backdoor_gates))
        loss = torch.zeros((), device=setting.device)
        for task in setting.tasks:
            clean = F.log_softmax(setting.logits(parameters, task, batches[task]), dim=-1).detach()
            triggered = setting.logits(parameters, task, batches[task], triggers[task])
            loss = loss + options.trigger_entropy * entropy(triggered)
            if options.consistency:
                shifted = F.log_softmax(triggered, dim=-1)
                loss = loss + options.consistency * F.kl_div(shifted, clean, log_target=True, reduction="batchmean")
        backdoor_optimizer.zero_grad(set_to_none=True)
        loss.backward()
        backdoor_optimizer.step()

    with torch.no_grad():
        parameters = setting.parameters(coefficients, _product(shared.deterministic(), backdoor.deterministic()))
    return DAMResult(parameters=parameters,
                     shared_mask=shared.mask({"method": "dam", "mask": "task-shared (M1)", "seed": str(seed)}),
                     backdoor_mask=backdoor.mask({"method": "dam", "mask": "backdoor-detection (M2)",
                                                  "seed": str(seed)}),
                     coefficients=coefficients, triggers=triggers)
