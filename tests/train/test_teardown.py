"""A process that joined a process group leaves with its status and its output flushed but without
the interpreter's teardown (where a backend thread could abort it); any other process exits as usual."""

from __future__ import annotations

import subprocess
import sys

import pytest

SCRIPT = """
import atexit, sys
from moetune.train import teardown
atexit.register(lambda: print(" teardown ran"))
if sys.argv[1] == "joined":
    teardown.joined_process_group()
print("written before", end="")  # stdout is a pipe: buffered, out only with a flush
teardown.exit_process(3)
"""


@pytest.mark.parametrize("joined", [True, False], ids=["joined-a-process-group", "plain"])
def test_exit_status_and_flushed_output_with_teardown_only_without_a_process_group(joined):
    proc = subprocess.run(
        [sys.executable, "-c", SCRIPT, "joined" if joined else "plain"], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 3, proc.stderr
    assert proc.stdout.startswith("written before")
    assert ("teardown ran" in proc.stdout) is not joined
