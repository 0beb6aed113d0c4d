import sys
from pathlib import Path

import pytest
import torch

# `import helpers` from the test modules (and from processes the distributed test spawns), whatever import mode.
sys.path.insert(0, str(Path(__file__).parent))

# The models are tiny: intra-op threads only add synchronisation cost (and contention on small CI machines).
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seeded():
    """Every test starts from the same global RNG state, so failures reproduce."""
    torch.manual_seed(1234)
    yield
