"""The one check of adapter-file tensors against the adapter they fill: keys and shapes.

Every reader (PEFT files, per-expert files, mixtures) validates through these, so a tensor that
maps to nothing, a missing tensor and a shape that does not fit are errors naming ``where`` and
the key, never a warning.
"""

from __future__ import annotations

import torch

from ...errors import AdapterError

__all__ = ["check_keys", "check_shape", "check_tensors"]


def check_tensors(
    expected: dict[str, tuple[int, ...]],
    tensors: dict[str, torch.Tensor],
    where: str,
    *,
    optional: dict[str, tuple[int, ...]] | None = None,
    differs: str = " or rank",
) -> None:
    """Every ``expected`` tensor present with its shape, nothing else (``optional`` ones may be
    present); errors name ``where`` and the key, and ``differs`` says what else may differ."""
    allowed = {**expected, **(optional or {})}
    for key, t in tensors.items():
        if key not in allowed:
            raise AdapterError(f"{where}.{key}: unexpected tensor for this layer (expected {sorted(expected)})")
        if tuple(t.shape) != allowed[key]:
            raise AdapterError(
                f"{where}.{key}: shape {tuple(t.shape)} does not match the model, expected {allowed[key]} "
                f"(an adapter for a different base model{differs}?)"
            )
    for key in expected:
        if key not in tensors:
            raise AdapterError(f"{where}.{key}: missing from the adapter file")


def check_keys(tensors: dict[str, torch.Tensor], expected: set[str], where: str) -> None:
    """Exactly the ``expected`` keys (a routed-experts layer, whose keys come as a set)."""
    missing, unexpected = sorted(expected - set(tensors)), sorted(set(tensors) - expected)
    if unexpected:
        raise AdapterError(
            f"{where}: tensor(s) {unexpected} map to nothing in this experts adapter (expected {sorted(expected)})"
        )
    if missing:
        raise AdapterError(f"{where}: missing tensor(s) {missing}")


def check_shape(t: torch.Tensor, shape: tuple[int, ...], *, where: str, key: str) -> None:
    if tuple(t.shape) != tuple(shape):
        raise AdapterError(f"{where}: tensor '{key}' has shape {tuple(t.shape)}, expected {tuple(shape)}")
