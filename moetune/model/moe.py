"""Mixture-of-Experts FFN: router, grouped experts, shared experts, aux loss (dispatch: :mod:`.dispatch`).

Legend: N tokens (B*T flattened), D model dim, F expert hidden, E experts, k experts per token,
R = N*k routed rows. Expert weights are 3D ``(E, out, in)``: ``gate_up_proj`` (E, 2F, D) with gate
rows first, ``down_proj`` (E, D, F) - the same layout and names as transformers 5 in memory, so
module paths in adapter files match PEFT's.

Dispatch sorts the R rows by expert once per layer; the experts module sees only sorted rows and
int32 cumulative ``offsets``, which is all a grouped GEMM (and an expert LoRA) needs.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .dispatch import combine, dispatch, gather_rows
from .grouped import RowLayout, grouped_linear, grouped_linear_loop, row_layout
from .layers import ACTIVATIONS, SwiGLU


@dataclass
class Routing:
    weights: torch.Tensor  # (N, k) combine weights
    experts: torch.Tensor  # (N, k) expert ids
    probs: torch.Tensor  # (N, E) fp32 probabilities (for the aux loss)
    # (N, k) the choices the aux loss counts where its definition is not the routing itself
    # (MiniMax-M2, after transformers); None: ``experts``
    aux_experts: torch.Tensor | None = None


@dataclass
class RouterStats:
    """One MoE layer's routing: sums for the load-balancing loss and metrics, and per token.

    Attributes:
        counts: (E,) number of routed rows per expert (non-padding tokens only).
        prob_sum: (E,) sum of router probabilities over non-padding tokens (carries gradient).
        tokens: number of non-padding tokens.
        routing: the router's output for each of the forward's N = B*T tokens in batch order
            (what :func:`moetune.model.loss.router_stats_of_samples` splits by sample); None for
            sums over several batches. Autograd keeps ``probs`` for the router's backward anyway.
        token_mask: (N,) 1 for real tokens, 0 for padding, or None when there is no padding.
        aux_counts: (E,) the counts of ``routing.aux_experts`` where the router gives them, else None.
    """

    counts: torch.Tensor
    prob_sum: torch.Tensor
    tokens: torch.Tensor
    routing: Routing | None = None
    token_mask: torch.Tensor | None = None
    aux_counts: torch.Tensor | None = None

    @property
    def loss_counts(self) -> torch.Tensor:
        """(E,) the counts the load-balancing loss uses (``counts`` - the routed rows - unless the
        router defines the loss on other choices); balancing and metrics read ``counts``."""
        return self.counts if self.aux_counts is None else self.aux_counts


class Router(nn.Module):
    """Base of the MoE routers: ``forward(x (N, D)) -> Routing``.

    A router may hold a selection-only correction bias that aux-loss-free balancing moves
    (DeepSeek-V3's ``e_score_correction_bias``): such a router says so with
    :attr:`has_correction_bias` and implements :meth:`update_correction_bias`.
    """

    @property
    def has_correction_bias(self) -> bool:
        return False

    def update_correction_bias(self, counts: torch.Tensor, speed: float) -> torch.Tensor:  # noqa: ARG002 - the interface
        """One balancing step from (E,) routed counts; returns the (E,) change applied."""
        raise ValueError(f"this router ({type(self).__name__}) has no e_score_correction_bias to update")


class TopKRouter(Router):
    """Softmax over E logits, top-k, optional renormalisation of the k weights."""

    def __init__(self, *, dim: int, num_experts: int, top_k: int, norm_topk_prob: bool) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(num_experts, dim))
        self.num_experts, self.top_k, self.norm_topk_prob = num_experts, top_k, norm_topk_prob

    def forward(self, x: torch.Tensor) -> Routing:
        logits = F.linear(x, self.weight)
        probs = torch.softmax(logits.float(), dim=-1)
        top, idx = torch.topk(probs, self.top_k, dim=-1)
        if self.norm_topk_prob:
            top = top / top.sum(dim=-1, keepdim=True)
        return Routing(weights=top.to(x.dtype), experts=idx, probs=probs)


class GroupedExperts(nn.Module):
    """E SwiGLU experts as 3D weights, computed with grouped GEMMs on expert-sorted rows."""

    # True where the Hugging Face tensor interleaves gate and up (gpt-oss): files in HF's layout
    # (PEFT target_parameters) then hold gate_up rows interleaved too. In memory they never are.
    gate_up_interleaved = False
    # False where a stage needs the rows as routed (gpt-oss indexes its biases by row): no layout.
    places_rows = True

    def __init__(self, *, num_experts: int, dim: int, hidden: int, act: str = "silu", use_loop: bool = False) -> None:
        super().__init__()
        self.gate_up_proj = nn.Parameter(torch.empty(num_experts, 2 * hidden, dim))  # (E, 2F, D)
        self.down_proj = nn.Parameter(torch.empty(num_experts, dim, hidden))  # (E, D, F)
        self.num_experts, self.dim, self.hidden = num_experts, dim, hidden
        self.act_name = act
        self.act = ACTIVATIONS[act]
        self.use_loop = use_loop  # reference path for tests

    def linear(self, x: torch.Tensor, weight: torch.Tensor, offsets: torch.Tensor, placed: bool = False):
        """Per-expert ``x_e @ W_e^T``; ``placed``: x's rows are in this forward's :meth:`layout`."""
        if self.use_loop:
            return grouped_linear_loop(x, weight, offsets)
        return grouped_linear(x, weight, offsets, placed=placed)

    def layout(self, x: torch.Tensor, offsets: torch.Tensor) -> RowLayout | None:
        """Where the expert GEMMs of one forward place x's rows, once for all of them (CPU bf16/fp16),
        or None: each GEMM takes the rows as they are."""
        return None if self.use_loop or not self.places_rows else row_layout(x, offsets)

    # The three stages of an expert, apart so an expert LoRA adds its deltas between them and a
    # family changes one stage (gpt-oss: biases, its own gated activation) without a new forward.
    def project_gate_up(self, x: torch.Tensor, offsets: torch.Tensor, placed: bool = False) -> torch.Tensor:
        """x (R, D) sorted by expert -> (R, 2F), gate columns first."""
        return self.linear(x, self.gate_up_proj, offsets, placed)

    def gated(self, gate_up: torch.Tensor) -> torch.Tensor:
        """(R, 2F) -> (R, F): ``act(gate) * up``."""
        gate, up = gate_up.chunk(2, dim=-1)
        return self.act(gate) * up

    def project_down(self, h: torch.Tensor, offsets: torch.Tensor, placed: bool = False) -> torch.Tensor:
        """h (R, F) sorted by expert -> (R, D)."""
        return self.linear(h, self.down_proj, offsets, placed)

    def row_subgroups(self) -> tuple[torch.Tensor, int] | None:
        """((N,) subgroup of each token, S) to have each expert's rows sorted by it (:func:`dispatch`); None: no."""
        return None

    def forward(
        self,
        x: torch.Tensor,
        offsets: torch.Tensor,
        *,
        token_index: torch.Tensor,  # noqa: ARG002 - LoRA wrappers use it
        groups: torch.Tensor | None = None,  # noqa: ARG002 - LoRA wrappers use it
    ) -> torch.Tensor:
        """x (R, D) sorted by expert; offsets (E,) int32; token_index (R,) token of each row; groups:
        the dispatch's (E*S,) subgroup ends when the rows were sorted by :meth:`row_subgroups` -> (R, D)."""
        layout = self.layout(x, offsets)
        if layout is None:
            return self.project_down(self.gated(self.project_gate_up(x, offsets)), offsets)
        h = self.gated(self.project_gate_up(layout.place(x), layout.offsets, placed=True))
        return layout.take(self.project_down(h, layout.offsets, placed=True))


def masked_counts(experts: torch.Tensor, num_experts: int, token_mask: torch.Tensor | None) -> torch.Tensor:
    """(E,) float choices of each expert in ``experts`` (N, k), tokens weighted by ``token_mask`` (N,)."""
    weights = torch.ones_like(experts, dtype=torch.float32) if token_mask is None else token_mask.float()[:, None]
    counts = torch.zeros(num_experts, dtype=torch.float32, device=experts.device)
    return counts.scatter_add_(0, experts.reshape(-1), weights.expand_as(experts).reshape(-1))


def router_stats(routing: Routing, counts: torch.Tensor, token_mask: torch.Tensor | None) -> RouterStats:
    E = routing.probs.shape[1]
    aux = None if routing.aux_experts is None else masked_counts(routing.aux_experts, E, token_mask)
    if token_mask is None:
        return RouterStats(
            counts=counts.float(),
            prob_sum=routing.probs.sum(0),
            # a fill on the device: new_tensor(N) would copy N from the host and wait for the stream
            tokens=routing.probs.new_full((), routing.probs.shape[0]),
            routing=routing,
            aux_counts=aux,
        )
    m = token_mask.float()
    counts = masked_counts(routing.experts, E, token_mask)
    prob_sum = (routing.probs * m[:, None]).sum(0)
    return RouterStats(
        counts=counts, prob_sum=prob_sum, tokens=m.sum(), routing=routing, token_mask=token_mask, aux_counts=aux
    )


class MoEBlock(nn.Module):
    """Routed experts plus optional shared expert(s) (with Qwen2-MoE's sigmoid gate)."""

    def __init__(
        self,
        *,
        gate: nn.Module,
        experts: GroupedExperts,
        shared_expert: SwiGLU | None = None,
        shared_expert_gate: nn.Linear | None = None,
        shared_name: str = "shared_expert",
        router_name: str = "gate",
    ) -> None:
        super().__init__()
        self.router_name = router_name
        setattr(self, router_name, gate)  # HF module names: gate / router (gpt-oss)
        self.experts = experts
        self.shared_name = shared_name
        if shared_expert is not None:
            setattr(self, shared_name, shared_expert)  # HF module names: shared_expert / shared_experts
        self.shared_expert_gate = shared_expert_gate

    @property
    def routing_module(self) -> nn.Module:
        """The routing module, whatever its name (``gate`` or ``router``)."""
        return getattr(self, self.router_name)

    def forward(self, x: torch.Tensor, *, token_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, RouterStats]:
        """x (B, T, D); token_mask (B*T,) 1 for real tokens -> (B, T, D) and routing stats."""
        shape = x.shape
        h = x.reshape(-1, shape[-1])
        routing = self.routing_module(h)
        d = dispatch(routing.experts, self.experts.num_experts, self.experts.row_subgroups())
        rows = self.experts(gather_rows(h, d.token_index), d.offsets, token_index=d.token_index, groups=d.groups)
        out = combine(rows, d, routing.weights)
        shared = getattr(self, self.shared_name, None)
        if shared is not None:
            s = shared(h)
            if self.shared_expert_gate is not None:
                s = torch.sigmoid(self.shared_expert_gate(h)) * s
            out = out + s
        return out.view(shape), router_stats(routing, d.counts, token_mask)
