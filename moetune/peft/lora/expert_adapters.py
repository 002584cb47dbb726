"""The adapters a :class:`~.experts.LoraGroupedExperts` holds: split-LoRA pairs per expert.

One object per named adapter, with the interface every expert adapter kind implements
(:class:`ExpertAdapter`): create, remove, its scaling per 3D parameter, the A side the forward
multiplies by (``effective_a``), its delta per pair (to fold it into the experts), and the plain
(E, r, in) / (E, out, r) pair its files are written from. AdaLoRA's per-expert triplets
(:mod:`moetune.peft.adalora.experts`) are the other kind. Parameters live in the layer's
``lora_A_{pair}`` / ``lora_B_{pair}`` stores keyed by adapter name.

Legend: E experts, r rank, D model dim, F expert hidden; pairs as in :mod:`.experts`.
"""

from __future__ import annotations

import math
import torch
from torch import nn

from ...config import LoraConfig
from ...errors import AdapterError
from ..core.layer import AdapterLayer
from .experts_layout import PROJ_OF_PAIR, PROJ_PARAMS

__all__ = ["ExpertAdapter"]


class ExpertAdapter:
    """Plain LoRA pairs on routed experts (``expert_rank="shared"``: one pair for all experts).

    Args:
        name: the adapter.
        config: its options; ``param_configs`` may override rank and alpha per 3D parameter.
    """

    def __init__(self, name: str, config: LoraConfig, param_configs: dict[str, LoraConfig] | None = None) -> None:
        self.name, self.config = name, config
        self.param_configs = {p: (param_configs or {}).get(p, config) for p in PROJ_PARAMS}

    def check(self) -> None:
        """Refuse options the experts do not implement."""
        if self.config.use_dora:
            raise AdapterError("use_dora is not supported on routed experts yet (supported on linears)")
        if self.config.init not in ("kaiming", "gaussian"):
            raise AdapterError(
                f"init={self.config.init!r} is not supported on routed experts yet (allowed there: kaiming, gaussian)"
            )

    def create(self, layer: AdapterLayer, pairs: list[str]) -> None:
        for pair in pairs:
            self.new_pair(layer, pair, self.param_configs[PROJ_OF_PAIR[pair]].r)

    def new_pair(self, layer: AdapterLayer, pair: str, rank: int) -> None:
        """A (E, r, in) initialised as ``config.init`` says, B (E, out, r) zeros (no E: shared)."""
        d_in, d_out = layer.dims(pair)
        lead = () if self.config.expert_rank == "shared" else (layer.num_experts,)
        device = layer.base_layer.gate_up_proj.device
        a = torch.empty(*lead, rank, d_in, dtype=torch.float32, device=device)
        if self.config.init == "kaiming":  # per expert = on the (E*r, in) view: fan_in is `in` either way
            nn.init.kaiming_uniform_(a.view(-1, d_in), a=math.sqrt(5))
        else:
            nn.init.normal_(a, std=1 / rank)
        layer.lora_a(pair)[self.name] = nn.Parameter(a)
        layer.lora_b(pair)[self.name] = nn.Parameter(
            torch.zeros(*lead, d_out, rank, dtype=torch.float32, device=device)
        )

    def remove(self, layer: AdapterLayer) -> None:
        for pair in layer.pairs(self.name):
            del layer.lora_a(pair)[self.name], layer.lora_b(pair)[self.name]

    def scaling(self, param: str) -> float:
        """The factor s on base parameter ``param`` (gate_up_proj or down_proj)."""
        return self.param_configs[param].scaling

    def effective_a(self, layer: AdapterLayer, pair: str) -> torch.Tensor:
        """The A side the forward and merging multiply by: (E, r, in), or (r, in) when shared."""
        return layer.lora_a(pair)[self.name]

    def file_pair(self, layer: AdapterLayer, pair: str) -> tuple[torch.Tensor, torch.Tensor]:
        """Detached fp32 pair with the expert dim: (E, r, in), (E, out, r) (what files hold)."""
        a, b = layer.lora_a(pair)[self.name].detach(), layer.lora_b(pair)[self.name].detach()
        if a.dim() == 2:
            a, b = a.expand(layer.num_experts, -1, -1), b.expand(layer.num_experts, -1, -1)
        return a, b

    def check_loadable(self, where: str) -> None:  # noqa: ARG002 - interface; SVD adapters refuse
        """Raise when files cannot fill this adapter (they hold plain LoRA)."""
        return None

    def file_rank_alpha(self, param: str, rank: int) -> tuple[int, float]:
        """Rank and alpha written for ``param`` when its file pair has ``rank`` (alpha keeps the scale)."""
        cfg = self.param_configs[param]
        ratio = rank / cfg.r
        return rank, cfg.alpha * (math.sqrt(ratio) if cfg.use_rslora else ratio)
