"""Adapter-file layouts of expert LoRA pairs: PEFT ``target_parameters`` and per-expert (vLLM).

Legend: E experts, r rank, D model dim, F expert hidden; ours ``a`` (E, r, in), ``b`` (E, out, r).

PEFT 0.21 on transformers-5 fused experts (pinned by tests/test_lora_experts.py against the real
package) wraps each targeted 3D parameter in a ``ParamWrapper``, nested in the order the experts
module registers its parameters: ``gate_up_proj`` innermost, ``down_proj`` outside it. The key of
a parameter's pair carries one ``base_layer.`` per wrapper outside it and never the parameter
name, so with both targeted::

    <experts>.base_layer.lora_A.weight  (E*r, D)     gate_up_proj
    <experts>.base_layer.lora_B.weight  (2F, r*E)    gate_up_proj (gate rows first)
    <experts>.lora_A.weight             (E*r, F)     down_proj
    <experts>.lora_B.weight             (D, r*E)     down_proj

and with only one of them targeted, that one is the outer ``<experts>.lora_A.weight``. A is
expert-slowest (row ``e*r + i``), B expert-fastest (column ``i*E + e``).

The per-expert layout that vLLM and SGLang read has 2D keys per expert and projection,
``<experts>.{e}.gate_proj.lora_A.weight`` (r, D) and ``...lora_B.weight`` (F, r).
"""

from __future__ import annotations

import torch

from ..errors import AdapterError

PROJ_PARAMS = ("gate_up_proj", "down_proj")  # registration order in GroupedExperts (= PEFT nesting)
EXPERT_PROJS = ("gate_proj", "up_proj", "down_proj")


def peft_prefixes(targeted: list[str]) -> dict[str, str]:
    """Key prefix of each targeted 3D parameter: one ``base_layer.`` per PEFT wrapper outside it."""
    ordered = [p for p in PROJ_PARAMS if p in targeted]
    return {p: "base_layer." * (len(ordered) - 1 - i) for i, p in enumerate(ordered)}


def to_peft(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(E, r, in), (E, out, r) -> PEFT's A (E*r, in) expert-slowest and B (out, r*E) expert-fastest."""
    E, r, _ = a.shape
    return a.reshape(E * r, -1).contiguous(), b.permute(1, 2, 0).reshape(b.shape[1], r * E).contiguous()


def from_peft(a2: torch.Tensor, b2: torch.Tensor, num_experts: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Inverse of :func:`to_peft`."""
    E = num_experts
    a = a2.reshape(E, a2.shape[0] // E, a2.shape[1])
    b = b2.reshape(b2.shape[0], b2.shape[1] // E, E).permute(2, 0, 1)
    return a, b


def block_diag_pairs(pairs: list[tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Several pairs on stacked outputs as one pair: A stacked on rank, B block-diagonal.

    ``B_bd @ A_cat`` equals the row-stack of the ``B_i @ A_i``, so it is exact (rank = sum of ranks).
    """
    a = torch.cat([a for a, _ in pairs], dim=-2)
    outs, ranks = [b.shape[-2] for _, b in pairs], [b.shape[-1] for _, b in pairs]
    b = pairs[0][1].new_zeros(pairs[0][1].shape[0], sum(outs), sum(ranks))
    row = col = 0
    for (_, bi), o, r in zip(pairs, outs, ranks):
        b[:, row:row + o, col:col + r] = bi
        row, col = row + o, col + r
    return a, b


def per_expert_keys(e: int, proj: str) -> tuple[str, str]:
    return f"{e}.{proj}.lora_A.weight", f"{e}.{proj}.lora_B.weight"


def split_per_expert(tensors: dict[str, torch.Tensor], proj: str, num_experts: int, *, where: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack ``{e}.{proj}.lora_A/B.weight`` over experts -> (E, r, in), (E, out, r)."""
    a_list, b_list = [], []
    for e in range(num_experts):
        ka, kb = per_expert_keys(e, proj)
        for key in (ka, kb):
            if key not in tensors:
                raise AdapterError(f"{where}: missing tensor '{key}' for expert {e} of {num_experts}")
        a_list.append(tensors[ka])
        b_list.append(tensors[kb])
    try:
        return torch.stack(a_list), torch.stack(b_list)
    except RuntimeError as err:
        raise AdapterError(f"{where}: per-expert {proj} tensors differ in shape across experts ({err})") from None


def check_shape(t: torch.Tensor, shape: tuple[int, ...], *, where: str, key: str) -> None:
    if tuple(t.shape) != tuple(shape):
        raise AdapterError(f"{where}: tensor '{key}' has shape {tuple(t.shape)}, expected {tuple(shape)}")


def check_zero(t: torch.Tensor, *, where: str, what: str) -> None:
    if t.numel() and t.abs().max().item() != 0:
        raise AdapterError(f"{where}: {what} is non-zero, which this adapter cannot represent")


def shared_from(t: torch.Tensor, *, where: str, key: str) -> torch.Tensor:
    """(E, ...) -> (...) for expert_rank='shared'; every expert must hold the same tensor."""
    if not torch.equal(t, t[:1].expand_as(t)):
        raise AdapterError(f"{where}: tensor '{key}' differs across experts, but the adapter uses "
                           f"expert_rank='shared' (one pair for all experts); use expert_rank='per_expert'")
    return t[0]
