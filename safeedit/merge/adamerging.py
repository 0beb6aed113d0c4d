"""AdaMerging (Yang et al., ICLR 2024): learn the merge coefficients by minimizing the prediction entropy of the
merged model on unlabeled data of every task.

θ = θ₀ + Σᵢ λᵢ τᵢ with λ one number per task (`task`) or per task and parameter tensor (`layer`), initialised at
0.3 (task arithmetic), optimised with Adam and clipped to [0, 1] after each step.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field
from tqdm.auto import tqdm

from safeedit.merge.setting import MergeSetting
from safeedit.progress import bars_off


class AdaMergingOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    granularity: Literal["task", "layer"] = "layer"
    init: float = Field(default=0.3, ge=0, le=1)
    steps: int = Field(default=60, ge=1)
    lr: float = Field(default=0.01, gt=0)


def adamerging(setting: MergeSetting, options: AdaMergingOptions, progress: bool = True
               ) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Merged parameters and the learned coefficients ([tasks] or [tasks, tensors])."""
    setting.restart()
    shape = (len(setting.tasks),) if options.granularity == "task" else (len(setting.tasks), len(setting.names))
    coefficients = torch.full(shape, options.init, device=setting.device, requires_grad=True)
    optimizer = torch.optim.Adam([coefficients], lr=options.lr)
    for _ in tqdm(range(options.steps), desc="adamerging", disable=bars_off(progress), leave=False):
        batches = {task: setting.batch(task) for task in setting.tasks}
        optimizer.zero_grad(set_to_none=True)
        setting.entropy_loss(setting.parameters(coefficients), batches).backward()
        optimizer.step()
        with torch.no_grad():
            coefficients.clamp_(0, 1)
    coefficients = coefficients.detach()
    with torch.no_grad():
        return setting.parameters(coefficients), coefficients
