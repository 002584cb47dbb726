"""flash-linear-attention's chunked gated delta rule: an optional fast path on CUDA.

Installed with the ``fla`` extra (``pip install moetune[fla]``) and used only for CUDA tensors; the
PyTorch form in :mod:`.delta_rule` stays the reference and the path everywhere else. Which one runs is
said once, at INFO. The kernel takes the same inputs (q, k raw: it L2-normalises them itself; g in log
space; beta after the sigmoid) and returns the same output and final state.

Sequence starts (``resets``) have no argument in the kernel without splitting the batch into
variable-length sequences, which needs their lengths on the host (a synchronisation in every step).
Instead the log decay of a token that starts a sequence is set to :data:`RESET_LOG_DECAY`: the state
before it is multiplied by exp(-200), which is 0 in fp32, and the gradient into that g is zero as in
the reference. The cost is precision: within a chunk the running sum of log decays then reaches
~200, so decays after a reset carry a relative error of ~1e-5 (fp32 at 200), far below bf16's.
"""

from __future__ import annotations

import functools
import importlib.util
import logging
from typing import Callable

import torch

from .delta_rule import DeltaRuleInputs

log = logging.getLogger(__name__)
RESET_LOG_DECAY = -200.0
_said: set[str] = set()


@functools.lru_cache(maxsize=None)
def _kernel() -> tuple[Callable | None, str]:
    """flash-linear-attention's ``chunk_gated_delta_rule``, or None and why not."""
    if importlib.util.find_spec("fla") is None:
        return None, "flash-linear-attention is not installed (pip install moetune[fla])"
    try:
        from fla.ops.gated_delta_rule import chunk_gated_delta_rule
    except Exception as exc:  # an installed but broken package must not stop training on the reference path
        return None, f"flash-linear-attention cannot be imported ({type(exc).__name__}: {exc})"
    return chunk_gated_delta_rule, "flash-linear-attention"


def _say_once(message: str) -> None:
    if message not in _said:
        _said.add(message)
        log.info("gated DeltaNet: %s", message)


def fast_chunk_rule(device: torch.device) -> Callable | None:
    """The fast chunked rule for tensors on ``device``, or None (the PyTorch reference then runs)."""
    if device.type != "cuda":
        return None
    kernel, why = _kernel()
    _say_once("flash-linear-attention chunked kernel" if kernel else f"PyTorch chunked form ({why})")
    return fla_chunk_gated_delta_rule if kernel else None


def fla_chunk_gated_delta_rule(x: DeltaRuleInputs) -> tuple[torch.Tensor, torch.Tensor]:
    """Same inputs and results as :func:`.delta_rule.chunk_gated_delta_rule` (CUDA only)."""
    kernel, _ = _kernel()
    g = x.g.float()
    if x.resets is not None:
        g = g.masked_fill(x.resets[..., None], RESET_LOG_DECAY)
    state = None if x.initial_state is None else x.initial_state.float()
    beta = x.beta.to(x.v.dtype)
    kw = {"initial_state": state, "output_final_state": True, "use_qk_l2norm_in_kernel": True}
    out, final = kernel(x.q, x.k, x.v, g, beta, **kw)
    return out.to(x.q.dtype), final
