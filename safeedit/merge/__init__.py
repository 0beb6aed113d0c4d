"""Model merging: task vectors, data-free baselines (task arithmetic, TIES, DARE), learned merges (AdaMerging,
Concrete task arithmetic) and DAM, the defence-aware merge that drops backdoors. `safeedit.merge.own` loads a
user's own base and task models and decides what is merged; `safeedit.merge.mergekit` reads mergekit's YAML.

Importing the package registers every merge method, DARE last (`safeedit.merge.methods` imports
`safeedit.merge.dare` at its end), so the registry has one order whichever merge module is imported first. DARE's
pieces are imported from `safeedit.merge.dare` (importing them here first would register it first)."""

from safeedit.merge.adamerging import AdaMergingOptions, adamerging
from safeedit.merge.baselines import task_arithmetic, ties, ties_vector, trimmed
from safeedit.merge.concrete import GateOptions, concrete_task_arithmetic
from safeedit.merge.dam import DAMOptions, DAMResult, dam
from safeedit.merge.gates import ConcreteGates
from safeedit.merge.methods import IndividualOptions, TaskArithmeticOptions, TiesOptions
from safeedit.merge.setting import MergeSetting, entropy
from safeedit.merge.vectors import check_same_architecture, merged_parameters, task_vectors, with_parameters

__all__ = ["AdaMergingOptions", "ConcreteGates", "DAMOptions", "DAMResult", "GateOptions",
           "IndividualOptions", "MergeSetting", "TaskArithmeticOptions", "TiesOptions", "adamerging",
           "check_same_architecture", "concrete_task_arithmetic", "dam", "entropy",
           "merged_parameters", "task_arithmetic", "task_vectors", "ties", "ties_vector", "trimmed",
           "with_parameters"]
