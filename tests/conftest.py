import logging
import os

# Idle OpenMP threads sleep instead of spinning. Read once, when torch loads its OpenMP runtime, so set
# before the import below (the CLI and torchrun subprocesses inherit it). On a 2-core machine that runs
# anything else, spinning threads burn the time slices the other thread waits for: two threads made
# the MixLoRA demo's tiny pre-training over 10x slower than one, in wall and in CPU time.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
torch.set_num_threads(min(2, os.cpu_count() or 1))
logging.getLogger("transformers").setLevel(logging.ERROR)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope="module")
def one_thread():
    """A module's tests on one torch thread (``pytestmark = pytest.mark.usefixtures("one_thread")``)."""
    from train_helpers import one_torch_thread

    with one_torch_thread():
        yield
