"""Model merging: task vectors, data-free baselines (task arithmetic, TIES), learned merges (AdaMerging, Concrete
task arithmetic) and DAM, the defence-aware merge that drops backdoors."""

from safeedit.merge.adamerging import AdaMergingOptions, adamerging
from safeedit.merge.baselines import task_arithmetic, ties, ties_vector, trimmed
from safeedit.merge.concrete import GateOptions, concrete_task_arithmetic
from safeedit.merge.dam import DAMOptions, DAMResult, dam
from safeedit.merge.gates import ConcreteGates
from safeedit.merge.setting import MergeSetting, entropy
from safeedit.merge.vectors import check_same_architecture, merged_parameters, task_vectors, with_parameters

__all__ = ["AdaMergingOptions", "ConcreteGates", "DAMOptions", "DAMResult", "GateOptions", "MergeSetting",
           "adamerging", "check_same_architecture", "concrete_task_arithmetic", "dam", "entropy",
           "merged_parameters", "task_arithmetic", "task_vectors", "ties", "ties_vector", "trimmed",
           "with_parameters"]
