"""AdaLoRA's rank allocation and orthogonality regulariser, as PEFT 0.21's ``RankAllocator``.

Legend: r initial rank, E experts; a *matrix* is one adapted linear or one (expert, 3D parameter)
of the routed experts; a *triplet* is ``(P[i], Lambda[i], Q[:, i])`` of one matrix.

Importance of every adapter entry ``w`` after a backward: ``I = |w * grad w|``; smoothed sensitivity
``S = b1 S + (1 - b1) I``; uncertainty ``U = b2 U + (1 - b2) |I - S|``; score ``S * U``. A triplet's
score is Lambda's score plus the mean score of its P row and of its Q column. The budget (total
kept triplets) follows PEFT's cubic schedule from ``init_r * matrices`` down to
``target_r * matrices``: flat for ``tinit`` steps, cubic until ``total_step - tfinal``, then fixed.
Every ``delta_t`` steps of the shrinking phase, and once at ``total_step - tfinal``, the triplets
scoring at or below the ``(init - budget)``-th smallest score get ``Lambda = 0``; afterwards the final
pattern is re-applied each step (the optimizer would otherwise revive masked entries). The pool is
every triplet of the adapter at once, experts included, so the budget moves between layers,
attention and experts.

Steps are 1-based (the number of optimizer steps taken, this one included), so with ``tfinal = 0``
the final allocation happens on the last step. Call :func:`update_and_allocate` after the
optimizer step and before ``zero_grad`` (the importance reads the gradients).

An allocator's state beyond the step count (which fixes the budget) is its EMAs and the masks:
:meth:`RankAllocator.state_dict` gives them as named tensors for training checkpoints, so a resumed
run allocates exactly as an uninterrupted one.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from ...config import AdaLoraOptions
from ...errors import AdapterError
from ..core.state import adapter_state
from .adapters import svd_layers

_PARTS = ("lora_A", "lora_E", "lora_B")  # P, Lambda, Q: PEFT's names, for state-dict keys


class RankAllocator:
    """Budget schedule, importance EMAs and masks of one AdaLoRA adapter.

    Args:
        model: the model holding the adapter.
        name: the adapter.
        options: its :class:`AdaLoraOptions` (``total_step`` set).
    """

    def __init__(self, model: nn.Module, name: str, options: AdaLoraOptions) -> None:
        if options.total_step is None:
            raise AdapterError(
                f"AdaLoRA adapter '{name}': adalora.total_step is not set (the trainer sets it "
                "from optim.max_steps; set it yourself when training outside moetune train)"
            )
        self.name, self.options = name, options
        self.triplets = {
            f"{path}:{key}": (layer, key) for path, layer in svd_layers(model, name) for key in layer.svd_triplets(name)
        }
        if not self.triplets:
            raise AdapterError(f"no AdaLoRA adapter named '{name}' in this model")
        shapes = [self._tensors(k)[1].shape for k in self.triplets]  # Lambda (r, 1) or (E, r, 1)
        self.matrices = sum(s[0] if len(s) == 3 else 1 for s in shapes)
        self.init_budget = sum(s[:-1].numel() for s in shapes)
        self.target_budget = options.target_r * self.matrices
        self.signature = self._signature()
        self.reset_importance()

    def _tensors(self, key: str) -> tuple[nn.Parameter, nn.Parameter, nn.Parameter]:
        layer, local = self.triplets[key]
        return layer.svd_triplets(self.name)[local]

    def _signature(self) -> tuple[int, ...]:
        return tuple(id(t) for k in self.triplets for t in self._tensors(k))

    def reset_importance(self) -> None:
        self.sensitivity: dict[int, torch.Tensor] = {}
        self.uncertainty: dict[int, torch.Tensor] = {}

    # --- schedule -------------------------------------------------------------------------
    def budget_schedule(self, step: int) -> tuple[int, bool]:
        """(budget, whether to mask at ``step``): PEFT's ``budget_schedule``."""
        o = self.options
        if step <= o.tinit:
            return self.init_budget, False
        if step > o.total_step - o.tfinal:
            return self.target_budget, True
        left = 1 - (step - o.tinit) / (o.total_step - o.tfinal - o.tinit)
        budget = int((self.init_budget - self.target_budget) * left**3 + self.target_budget)
        return budget, step % o.delta_t == 0

    # --- importance -----------------------------------------------------------------------
    @torch.no_grad()
    def update_importance(self) -> None:
        b1, b2 = self.options.beta1, self.options.beta2
        for key in self.triplets:
            for p in self._tensors(key):
                grad = p.grad if p.grad is not None else torch.zeros_like(p)
                ipt = (p * grad).abs()
                s = self.sensitivity.get(id(p), torch.zeros_like(p))
                u = self.uncertainty.get(id(p), torch.zeros_like(p))
                s = b1 * s + (1 - b1) * ipt
                self.sensitivity[id(p)], self.uncertainty[id(p)] = s, b2 * u + (1 - b2) * (ipt - s).abs()

    def _score(self, p: torch.Tensor) -> torch.Tensor:
        s = self.sensitivity.get(id(p))
        return torch.zeros_like(p) if s is None else s * self.uncertainty[id(p)]

    def triplet_scores(self, key: str) -> torch.Tensor:
        """(r,) or (E, r): Lambda's score + mean over P's row + mean over Q's column (PEFT's order)."""
        a, e, b = self._tensors(key)
        sa, se, sb = self._score(a).mean(-1), self._score(e).squeeze(-1), self._score(b).mean(-2)
        return se + (sa + sb)

    @torch.no_grad()
    def mask_to_budget(self, budget: int) -> None:
        """Zero Lambda of every triplet scoring at or below the (init - budget)-th smallest score."""
        scores = {k: self.triplet_scores(k) for k in self.triplets}
        k = self.init_budget - budget
        if k <= 0:  # nothing to prune (PEFT's kthvalue would fail on k = 0)
            threshold = -float("inf")
        else:
            threshold = torch.kthvalue(
                torch.cat([s.reshape(-1) for s in scores.values()]).float().cpu(), k
            ).values.item()
        for key, score in scores.items():
            layer, local = self.triplets[key]
            keep = ~(score <= threshold)
            layer.rank_mask.put(local, keep, persistent=False)
            self._tensors(key)[1].masked_fill_(~keep.unsqueeze(-1), 0.0)

    @torch.no_grad()
    def apply_masks(self) -> None:
        for key in self.triplets:
            layer, local = self.triplets[key]
            self._tensors(key)[1].masked_fill_(~layer.rank_mask.get(local).unsqueeze(-1), 0.0)

    def update_and_allocate(self, step: int) -> int:
        """One step of PEFT's ``AdaLoraModel.update_and_allocate``; returns the current budget."""
        final = self.options.total_step - self.options.tfinal
        if step < final:
            self.update_importance()
            budget, mask = self.budget_schedule(step)
            if mask:
                self.mask_to_budget(budget)
            return budget
        if step == final:
            self.mask_to_budget(self.target_budget)
            self.reset_importance()
        else:
            self.apply_masks()
        return self.target_budget

    # --- checkpoint state -----------------------------------------------------------------
    def state_dict(self) -> dict[str, torch.Tensor]:
        """The EMAs (``sensitivity/<matrix>/<part>``, ``uncertainty/...``; absent while reset) and
        masks (``mask/<matrix>``), keyed by module path rather than tensor id so they outlive the process."""
        state = {}
        for key in self.triplets:
            layer, local = self.triplets[key]
            state[f"mask/{key}"] = layer.rank_mask.get(local)
            for part, p in zip(_PARTS, self._tensors(key)):
                if id(p) in self.sensitivity:
                    state[f"sensitivity/{key}/{part}"] = self.sensitivity[id(p)]
                    state[f"uncertainty/{key}/{part}"] = self.uncertainty[id(p)]
        return state

    @torch.no_grad()
    def load_state_dict(
        self, state: dict[str, torch.Tensor], *, copy: Callable[[torch.Tensor, torch.Tensor], None] | None = None
    ) -> None:
        """Restore :meth:`state_dict`'s tensors. ``copy(dst, src)`` fills a tensor laid out like the
        parameter (a sharded one takes its shard); default ``dst.copy_(src)``.

        Raises:
            AdapterError: keys that do not belong to this adapter's matrices (another config).
        """
        copy = copy or (lambda dst, src: dst.copy_(src))
        unknown = set(state) - set(self._state_keys())
        if unknown:
            raise AdapterError(
                f"AdaLoRA adapter '{self.name}': saved allocator state has '{min(unknown)}', which is "
                "not a matrix of this adapter (was it made with a different config?)"
            )
        self.reset_importance()
        for key in self.triplets:
            layer, local = self.triplets[key]
            if f"mask/{key}" in state:
                copy(layer.rank_mask.get(local), state[f"mask/{key}"])
            for part, p in zip(_PARTS, self._tensors(key)):
                if f"sensitivity/{key}/{part}" in state:
                    self.sensitivity[id(p)], self.uncertainty[id(p)] = torch.zeros_like(p), torch.zeros_like(p)
                    copy(self.sensitivity[id(p)], state[f"sensitivity/{key}/{part}"])
                    copy(self.uncertainty[id(p)], state[f"uncertainty/{key}/{part}"])

    def _state_keys(self) -> list[str]:
        return [
            f"{kind}/{key}/{part}"
            for key in self.triplets
            for kind in ("sensitivity", "uncertainty")
            for part in _PARTS
        ] + [f"mask/{key}" for key in self.triplets]

    @torch.no_grad()
    def masks_from_lambda(self) -> None:
        """Masks rebuilt as ``Lambda != 0`` (for checkpoints without allocator state). Once the final
        allocation has run every step zeroes the pruned Lambda again, so this is the mask, except
        that a kept triplet whose Lambda never left 0 (an expert that got no tokens) reads as pruned."""
        for key in self.triplets:
            layer, local = self.triplets[key]
            layer.rank_mask.get(local).copy_(self._tensors(key)[1].squeeze(-1) != 0)

    def kept(self) -> int:
        """Triplets kept now (the mask), over the whole adapter."""
        return sum(int(layer.rank_mask.get(local).sum()) for layer, local in self.triplets.values())


def allocators(model: nn.Module) -> dict[str, RankAllocator]:
    """One allocator per trainable AdaLoRA adapter of ``model``, kept in its adapter state
    (:class:`~moetune.peft.core.state.AdapterState`; rebuilt when the adapter's parameters were replaced)."""
    store = adapter_state(model).allocators
    for name in svd_adapter_names(model):
        layer = next(layer for _, layer in svd_layers(model, name))
        alloc = store.get(name)
        if alloc is None or alloc.signature != alloc._signature():
            store[name] = RankAllocator(model, name, layer.configs[name].adalora)
    return {n: a for n, a in store.items() if n in svd_adapter_names(model)}


def svd_adapter_names(model: nn.Module, *, trainable: bool = True) -> list[str]:
    """Names of the AdaLoRA adapters in ``model`` (with ``trainable``, only those being trained)."""
    names: list[str] = []
    for _, layer in svd_layers(model):
        for name in layer.adapter_names:
            if layer.is_svd(name) and name not in names:
                if not trainable or any(p.requires_grad for _, p in layer.adapter_params(name)):
                    names.append(name)
    return names


def update_and_allocate(model: nn.Module, step: int) -> dict[str, int]:
    """Update importance and masks of every trainable AdaLoRA adapter at (1-based) ``step``;
    returns each adapter's budget. Call after ``optimizer.step()``, before ``zero_grad``."""
    return {name: alloc.update_and_allocate(step) for name, alloc in allocators(model).items()}


def orth_regularization(model: nn.Module) -> torch.Tensor | None:
    """``sum_adapters w * mean_matrices(||P P^T - I||_F and ||Q^T Q - I||_F)`` over the trainable
    AdaLoRA adapters (PEFT's term; each expert's P and Q count as separate matrices), or None."""
    total = None
    for name in svd_adapter_names(model):
        weight = next(layer for _, layer in svd_layers(model, name)).configs[name].adalora.orth_reg_weight
        if not weight:
            continue
        norms, count = [], 0
        for _, layer in svd_layers(model, name):
            for a, _, b in layer.svd_triplets(name).values():
                for cov in (a @ a.transpose(-1, -2), b.transpose(-1, -2) @ b):
                    eye = torch.eye(cov.shape[-1], dtype=cov.dtype, device=cov.device)
                    norm = torch.linalg.matrix_norm(cov - eye, ord="fro")  # () or (E,)
                    norms.append(norm.sum())
                    count += norm.numel()
        term = weight * torch.stack(norms).sum() / count
        total = term if total is None else total + term
    return total


def rank_pattern(model: nn.Module, name: str) -> dict[str, list[bool] | list[list[bool]]]:
    """``<module path>[.<pair>] -> kept triplets`` of adapter ``name`` (per expert for experts)."""
    out = {}
    for path, layer in svd_layers(model, name):
        for local in layer.svd_triplets(name):
            suffix = local[len(name) :].replace(":", ".")  # "" for a linear, ".gate_up" / ".down" for experts
            out[f"{path}{suffix}"] = layer.rank_mask.get(local).tolist()
    return out
