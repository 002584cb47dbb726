import logging
import os

# Idle OpenMP threads sleep instead of spinning. Read once, when torch loads its OpenMP runtime, so set
# before the import below (the CLI and torchrun subprocesses inherit it). On a 2-core machine that runs
# anything else, spinning threads burn the time slices the other thread waits for: two threads made
# the MixLoRA demo's tiny pre-training over 10x slower than one, in wall and in CPU time.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
# Each test process uses at most two threads, its share of the cores under pytest-xdist (``-n 2``), and the
# CLI and torchrun subprocesses it starts use the same number (set, not defaulted: the xdist workers inherit
# the controller's value): tests compare a subprocess's run with one in this process bit for bit.
_THREADS = max(1, min(2, (os.cpu_count() or 1) // int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))))
os.environ["OMP_NUM_THREADS"] = str(_THREADS)

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
torch.set_num_threads(_THREADS)
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
