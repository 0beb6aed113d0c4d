"""Concrete task arithmetic (Tang et al., 2023, "Concrete subspace learning"): learn one mask shared by all task
vectors so that θ = θ₀ + λ Σᵢ (M ⊙ τᵢ), λ = 0.3 fixed, has low prediction entropy on unlabeled data of every task.
The mask has a Concrete gate per weight (`ConcreteGates`); the merge uses the deterministic final mask.
"""

from __future__ import annotations

import torch
from pydantic import BaseModel, ConfigDict, Field
from tqdm.auto import tqdm

from safeedit.masks import Mask
from safeedit.merge.gates import ConcreteGates
from safeedit.merge.setting import MergeSetting
from safeedit.progress import bars_off


class GateOptions(BaseModel):
    """How Concrete gates are learned (shared by Concrete task arithmetic and DAM)."""

    model_config = ConfigDict(extra="forbid")
    steps: int = Field(default=60, ge=1)
    lr: float = Field(default=0.1, gt=0, description="Adam learning rate of the gate logits")
    init_logit: float = Field(default=3.0, description="initial logit: σ(3) = 0.95, nearly every weight kept")
    scale: float = Field(default=0.3, ge=0, description="λ: the task-arithmetic coefficient (DAM: its start)")


def concrete_task_arithmetic(setting: MergeSetting, options: GateOptions, seed: int, progress: bool = True
                             ) -> tuple[dict[str, torch.Tensor], Mask]:
    setting.restart()
    generator = torch.Generator(setting.device).manual_seed(seed)
    gates = ConcreteGates(setting.shapes(), options.init_logit, device=setting.device)
    optimizer = torch.optim.Adam(gates.parameters(), lr=options.lr)
    coefficients = torch.full((len(setting.tasks),), options.scale, device=setting.device)
    for _ in tqdm(range(options.steps), desc="concrete task arithmetic", disable=bars_off(progress), leave=False):
        batches = {task: setting.batch(task) for task in setting.tasks}
        optimizer.zero_grad(set_to_none=True)
        setting.entropy_loss(setting.parameters(coefficients, gates.sample(generator)), batches).backward()
        optimizer.step()
    mask = gates.mask({"method": "concrete_ta", "kept": "task-vector entries"})
    with torch.no_grad():
        return setting.parameters(coefficients, gates.deterministic()), mask
