"""Frozen base weights held in a stored format (NF4, FP8 ...): quantized linears and grouped experts.

Legend: N rows, in/out features, E experts, D model dim, F expert hidden.

:class:`QuantLinear` and :class:`QuantGroupedExperts` hold their weights in
:class:`~.stored.StoredWeight` holders, whatever the format. Two ways to get them: a checkpoint
released quantized is read as stored (the loader swaps in holders of its format, see
:mod:`moetune.model.prequantized`), and :func:`quantize_model` quantizes a full-precision base to
NF4 for QLoRA. :func:`quantize_model` swaps every frozen ``nn.Linear`` for a :class:`QuantLinear` and every
:class:`GroupedExperts` for a :class:`QuantGroupedExperts`, under the same module names. Kept in
full precision, as QLoRA and bitsandbytes do: the LM head (logits are the most error-sensitive
output, it is often tied to the embedding, and PEFT files may carry it whole) and the routers
(``gate``, ``router``, ``shared_expert_gate``: a tiny share of the parameters that decides where
every token goes). Embeddings are lookups, not matmuls, and are left alone too.

Forward dequantizes a stored weight into the input's dtype just for the matmul; backward dequantizes it again
(a custom autograd Function that saves no weight), so no dequantized base weight outlives its
matmul. Gradients flow to the input only: the base is frozen.

On the meta device the swap only creates empty holders, so the loader can allocate ~0.52 bytes
per weight element and quantize each checkpoint tensor as it is read (:meth:`~.nf4_weight.NF4Weight.write`).
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from ...errors import CheckpointError
from ..grouped import grouped_linear, grouped_linear_loop
from ..moe import GroupedExperts
from . import cpu_workers
from .nf4_weight import NF4Weight
from .stored import StoredWeight

KEEP_FULL_PRECISION = frozenset({"lm_head", "gate", "router", "shared_expert_gate"})


class _StoredLinear(torch.autograd.Function):
    """y = x @ W^T with W dequantized in forward and again in backward (never saved)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: StoredWeight) -> torch.Tensor:
        ctx.weight = weight
        return F.linear(x, weight.dequantize(x.dtype))

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        if not ctx.needs_input_grad[0]:
            return None, None
        return grad @ ctx.weight.dequantize(grad.dtype), None  # (..., out) @ (out, in)


class _StoredGrouped(torch.autograd.Function):
    """Per-expert x_e @ W_e^T on expert-sorted rows, W (E, out, in) recomputed for backward."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: StoredWeight, offsets: torch.Tensor, loop: bool, placed: bool):
        ctx.weight, ctx.loop, ctx.placed = weight, loop, placed
        ctx.save_for_backward(offsets)
        w = weight.dequantize(x.dtype)
        y = grouped_linear_loop(x, w, offsets) if loop else grouped_linear(x, w, offsets, placed=placed)
        # grouped_linear returns a same-shape view (its grad hook); return the base so later
        # in-place ops on the output are not in-place ops on a view made inside a Function.
        return y._base if y._base is not None and y._base.shape == y.shape else y

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        if not ctx.needs_input_grad[0]:
            return None, None, None, None, None
        (offsets,) = ctx.saved_tensors
        w_t = ctx.weight.dequantize(grad.dtype).transpose(-2, -1)  # (E, in, out): dx_e = g_e @ W_e
        g = grad.contiguous()
        dx = grouped_linear_loop(g, w_t, offsets) if ctx.loop else grouped_linear(g, w_t, offsets, placed=ctx.placed)
        return dx, None, None, None, None


class QuantLinear(nn.Linear):
    """A frozen ``nn.Linear`` whose weight (out, in) is held in a stored format (``stored``, NF4 by default).

    It stays an ``nn.Linear`` for ``isinstance`` checks (target matching, "all-linear"), keeps
    ``in_features``/``out_features``/``bias``, and offers the weight read-only: ``weight`` and
    :meth:`dequantized_weight` return a fresh dequantized tensor, so writing into it changes
    nothing (an adapter must not merge into it; see ``moetune.peft.qlora``).
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        *,
        bias: bool = False,
        dtype: torch.dtype = torch.float32,
        device=None,
        stored: StoredWeight | None = None,
    ) -> None:
        nn.Module.__init__(self)  # not nn.Linear.__init__: there is no full-precision weight
        self.in_features, self.out_features = in_features, out_features
        self.stored = stored or NF4Weight((out_features, in_features), dtype=dtype, device=device)
        self.register_parameter(
            "bias", nn.Parameter(torch.empty(out_features, dtype=dtype, device=device)) if bias else None
        )

    @property
    def weight(self) -> torch.Tensor:  # type: ignore[override]
        return self.stored.dequantize()

    def dequantized_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """(out, in) dequantized weight in ``dtype`` (default the model dtype), not saved anywhere."""
        return self.stored.dequantize(dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = _StoredLinear.apply(x, self.stored)
        return y if self.bias is None else y + self.bias.to(y.dtype)

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> QuantLinear:
        """Quantize ``linear`` (on meta: an empty holder to fill later)."""
        w = linear.weight
        q = cls(linear.in_features, linear.out_features, bias=linear.bias is not None, dtype=w.dtype, device=w.device)
        if not w.is_meta:
            q.stored.write(0, w.detach())
            if linear.bias is not None:
                q.bias.data.copy_(linear.bias.detach())
        return q

    def extra_repr(self) -> str:
        fmt = self.stored.format
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, {fmt}"


class QuantGroupedExperts(GroupedExperts):
    """:class:`GroupedExperts` with ``gate_up_proj`` (E, 2F, D) and ``down_proj`` (E, D, F) stored.

    The projections are :class:`StoredWeight` holders under the same names (NF4 unless ``stored``,
    a function of the weight's shape, makes them in another format); :meth:`linear` accepts
    either a holder (dequantize + grouped GEMM, recomputed in backward) or a plain 3D tensor (an
    expert LoRA's A or B), so the base forward and an expert-LoRA wrapper run unchanged.
    """

    def __init__(
        self,
        *,
        num_experts: int,
        dim: int,
        hidden: int,
        act: str = "silu",
        use_loop: bool = False,
        dtype: torch.dtype = torch.float32,
        device=None,
        stored: Callable[[tuple[int, ...]], StoredWeight] | None = None,
    ) -> None:
        with torch.device("meta"):  # the parent's full-precision parameters are replaced at once
            super().__init__(num_experts=num_experts, dim=dim, hidden=hidden, act=act, use_loop=use_loop)
        del self.gate_up_proj, self.down_proj
        make = stored or (lambda shape: NF4Weight(shape, dtype=dtype, device=device))
        self.gate_up_proj = make((num_experts, 2 * hidden, dim))
        self.down_proj = make((num_experts, dim, hidden))

    plain_class: type = GroupedExperts  # the full-precision class (dequantize_model swaps back to it)

    def linear(self, x: torch.Tensor, weight, offsets: torch.Tensor, placed: bool = False) -> torch.Tensor:
        if isinstance(weight, StoredWeight):
            return _StoredGrouped.apply(x, weight, offsets, self.use_loop, placed)
        return super().linear(x, weight, offsets, placed)

    def dequantized_weight(self, name: str, dtype: torch.dtype | None = None) -> torch.Tensor:
        """``gate_up_proj`` (E, 2F, D) or ``down_proj`` (E, D, F), dequantized."""
        return getattr(self, name).dequantize(dtype)

    @classmethod
    def from_experts(cls, experts: GroupedExperts) -> QuantGroupedExperts:
        w = experts.gate_up_proj
        q = cls(**expert_shape(experts), dtype=w.dtype, device=w.device)
        if not w.is_meta:
            for name in ("gate_up_proj", "down_proj"):
                getattr(q, name).write(0, getattr(experts, name).detach())
        return q


_STORED_CLASSES: dict[type, type] = {}


def stored_experts(experts: GroupedExperts, stored: Callable[[tuple[int, ...]], StoredWeight]) -> GroupedExperts:
    """``experts`` with ``gate_up_proj`` / ``down_proj`` held by ``stored(shape)`` holders.

    Plain :class:`GroupedExperts` become a :class:`QuantGroupedExperts`. A family's subclass (gpt-oss's
    biased experts) keeps its own module, biases and activation: it becomes an instance of
    ``Quant<Class>`` (:class:`QuantGroupedExperts` first in its MRO, then the family's class), so its
    projections run through the stored-weight ``linear`` and adapters find the quantized wrapper.
    """
    if type(experts) is GroupedExperts:
        return QuantGroupedExperts(**expert_shape(experts), stored=stored)
    cls = type(experts)
    if cls not in _STORED_CLASSES:
        _STORED_CLASSES[cls] = type(f"Quant{cls.__name__}", (QuantGroupedExperts, cls), {"plain_class": cls})
    shapes = {name: tuple(getattr(experts, name).shape) for name in ("gate_up_proj", "down_proj")}
    for name, shape in shapes.items():
        delattr(experts, name)
    experts.__class__ = _STORED_CLASSES[cls]
    for name, shape in shapes.items():
        setattr(experts, name, stored(shape))
    return experts


def quantize_model(model: nn.Module) -> nn.Module:
    """Swap frozen linears and grouped experts for 4-bit ones, in place; returns ``model``.

    On the meta device the new modules are empty holders for the loader to fill. Adapters must
    be added after quantizing (a wrapper made for a full-precision layer would not know its base
    became read-only), so a model that already has adapter layers is refused.
    """
    for path, module in list(model.named_modules()):
        if hasattr(module, "base_layer"):
            raise ValueError(f"'{path}' already carries adapters; quantize the base model before adding adapters")
    for path, module in list(model.named_modules())[1:]:  # [0] is the model itself
        name = path.rsplit(".", 1)[-1]
        if type(module) is nn.Linear and name not in KEEP_FULL_PRECISION:
            model.set_submodule(path, QuantLinear.from_linear(module))
        elif type(module) is GroupedExperts:
            model.set_submodule(path, QuantGroupedExperts.from_experts(module))
        elif isinstance(module, GroupedExperts) and not isinstance(module, QuantGroupedExperts):
            # e.g. gpt-oss's biased experts: leaving them full precision would silently break the promise
            kind = type(module).__name__
            raise CheckpointError(f"quantize='nf4' does not support the experts of '{path}' ({kind}) yet")
    cpu_workers.shutdown()  # the quantizer's CPU workers, if it started them, are not needed now
    return model


def dequantize_model(model: nn.Module) -> nn.Module:
    """Inverse swap, in place: stored (quantized) modules become ``nn.Linear`` / ``GroupedExperts`` holding the
    dequantized weights (the model a QLoRA adapter was trained against, in full precision)."""
    for path, module in list(model.named_modules())[1:]:
        if isinstance(module, QuantLinear):
            w = module.dequantized_weight()
            linear = nn.Linear(module.in_features, module.out_features, bias=module.bias is not None, device="meta")
            linear.weight = nn.Parameter(w, requires_grad=False)
            if module.bias is not None:
                linear.bias = module.bias
            model.set_submodule(path, linear)
        elif isinstance(module, QuantGroupedExperts):
            weights = {name: module.dequantized_weight(name) for name in ("gate_up_proj", "down_proj")}
            if module.plain_class is GroupedExperts:
                with torch.device("meta"):
                    experts = GroupedExperts(**expert_shape(module))
            else:  # a family's experts: the same module, its class and full-precision weights back
                experts = module
                for name in weights:
                    delattr(experts, name)
                experts.__class__ = module.plain_class
            for name, w in weights.items():
                setattr(experts, name, nn.Parameter(w, requires_grad=False))
            model.set_submodule(path, experts)
    return model


def expert_shape(experts: GroupedExperts) -> dict:
    """The constructor arguments that describe a group of experts (full precision or stored)."""
    return {
        "num_experts": experts.num_experts,
        "dim": experts.dim,
        "hidden": experts.hidden,
        "act": experts.act_name,
        "use_loop": experts.use_loop,
    }


def quantized_weights(model: nn.Module, *, recurse: bool = True) -> dict[str, StoredWeight]:
    """Native parameter name -> stored holder (``...q_proj.weight``, ``...experts.gate_up_proj``);
    with ``recurse=False`` only ``model``'s own (``weight`` / ``gate_up_proj``, ``down_proj``)."""
    out: dict[str, StoredWeight] = {}
    for path, module in model.named_modules() if recurse else [("", model)]:
        dot = f"{path}." if path else ""
        if isinstance(module, QuantLinear):
            out[f"{dot}weight"] = module.stored
        elif isinstance(module, QuantGroupedExperts):
            out[f"{dot}gate_up_proj"], out[f"{dot}down_proj"] = module.gate_up_proj, module.down_proj
    return out


def quantized_bytes(model: nn.Module) -> tuple[int, int]:
    """(stored bytes, weight elements) over the model's stored (quantized) weights."""
    holders = [m for m in model.modules() if isinstance(m, StoredWeight)]
    return sum(h.storage_bytes() for h in holders), sum(h.numel() for h in holders)
