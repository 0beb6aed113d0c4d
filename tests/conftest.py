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


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """One cache for the test module (`SAFEEDIT_CACHE`): what it builds (digits data, a trained model) is reused
    within the module and never read from an earlier run."""
    path = tmp_path_factory.mktemp("cache")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("SAFEEDIT_CACHE", str(path))
        yield path


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> Path:
    """The own-files example's tiny model, reference and files, built once per module (tests/tiny_llmfiles.py)."""
    from tiny_llmfiles import build

    root = tmp_path_factory.mktemp("llmfiles")
    build(root)
    return root
