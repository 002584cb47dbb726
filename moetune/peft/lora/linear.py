"""LoRA on an ``nn.Linear``: the wrapper holding named adapters (LoRA, DoRA, PiSSA, AdaLoRA, mixtures).

Each adapter is an object of :mod:`.linear_adapters` (:class:`~.linear_adapters.LinearAdapter`); this module
runs them, folds them into the weight and back, and hands their file tensors through.

Legend: N tokens, in/out the linear's features, r rank, s scaling (``alpha / r``, rsLoRA
``alpha / sqrt(r)``). Adapter ``name`` adds ``s * B @ A @ dropout(x)`` with ``lora_A[name]`` (r, in)
and ``lora_B[name]`` (out, r). Adapter parameters are fp32 whatever the base dtype; the forward
runs in the input's dtype. Gradients are plain autograd (dropout included), so they are exact.

DoRA (``use_dora``) follows PEFT 0.21 exactly: a trained magnitude ``m`` (out,), initialised to
the row norms of ``W + s*B@A``; the output is ``base + (m/n - 1) * W@x' + (m/n) * s * B@A@x'``
with ``n = ||W + s*B@A||`` per row, detached, and ``x' = dropout(x)`` (``x' = x`` when dropout
is off, when PEFT reuses the base output). With several adapters running on one token, each
term is relative to the base output alone (PEFT feeds DoRA the running sum instead; the two agree
whenever one adapter runs, which is the only case PEFT parity is tested on).

PiSSA (``init="pissa"``) moves the top-r singular part of ``W`` into the adapter, as PEFT's
``init_lora_weights="pissa"``: ``A = sqrt(S_r/s) Vh_r``, ``B = U_r sqrt(S_r/s)`` and the base
becomes ``W_res = W - s*B@A``, so the model's output is unchanged at init but **the base weight
is modified**. The initial pair is kept; files are written as the equivalent plain LoRA of rank
2r against the original ``W`` (``A' = [A; A0]``, ``B' = [B, -B0]``, alpha doubled - PEFT's
``path_initial_model_for_weight_conversion``), so PEFT and vLLM load them on the untouched base.
A PiSSA adapter must be the only adapter of its layer; deleting it restores ``W``. Inside
``disable_adapters`` (and in ``save_pretrained`` before merging) the layer holds ``W_res``, not ``W``.
"""

from __future__ import annotations

from typing import Iterator

import torch
from torch import nn
from typing_extensions import override

from ...config import LoraConfig
from ...errors import AdapterError
from ..core.context import Selection
from ..core.layer import DEFAULT_OPTIONS, AdapterLayer, AddOptions, TensorStore
from ..core.selection import cat
from .linear_adapters import LinearAdapter, lora_adapter


class LoraLinear(AdapterLayer):
    """An ``nn.Linear`` (attention/MLP projection or LM head) with named adapters.

    Args:
        base_layer: the frozen linear, weight (out, in).
    """

    b_side = ("lora_B",)
    base_is_writable = True  # merging and PiSSA write into the base weight (not a 4-bit one)

    def __init__(self, base_layer: nn.Linear) -> None:
        super().__init__(base_layer)
        self.in_features, self.out_features = base_layer.in_features, base_layer.out_features
        self.lora_A = nn.ParameterDict()  # name -> (r, in)
        self.lora_B = nn.ParameterDict()  # name -> (out, r)
        self.lora_magnitude_vector = nn.ParameterDict()  # name -> (out,), DoRA only
        self.lora_dropout = nn.ModuleDict()
        self.pissa_init = TensorStore()  # "{name}_A" (r, in), "{name}_B" (out, r)
        self.dora_factor = TensorStore()  # name -> (out,) m/n of a merged DoRA adapter
        self.lora_E = nn.ParameterDict()  # AdaLoRA: name -> Lambda (r, 1)
        self.rank_mask = TensorStore()  # AdaLoRA: name -> bool (r,), kept triplets
        self.adapters: dict[str, LinearAdapter] = {}
        self.configs: dict[str, LoraConfig] = {}
        self.scaling: dict[str, float] = {}

    # --- protocol -------------------------------------------------------------------------
    @property
    def adapter_names(self) -> list[str]:
        return list(self.adapters)

    @override
    def add_adapter(self, name: str, config: LoraConfig, options: AddOptions = DEFAULT_OPTIONS) -> None:
        """Create adapter ``name``: ``options.adapter``, or by default LoRA (DoRA with ``use_dora``);
        a linear has one projection, so ``parts`` and ``param_configs`` do not apply."""
        if name in self.adapters:
            raise AdapterError(f"adapter '{name}' already exists on this layer")
        if self.configs and (config.init == "pissa" or any(self.is_pissa(n) for n in self.configs)):
            raise AdapterError("a PiSSA adapter changes the base weight, so it must be the only adapter of its layer")
        adapter = options.adapter if options.adapter is not None else self.default_adapter(name, config)
        adapter.create(self)
        self.adapters[name], self.configs[name], self.scaling[name] = adapter, config, adapter.scaling
        if adapter.routed and not self.active:  # as MixtureFFN: a lone mixture layer runs its first adapter
            self.active.append(name)

    def default_adapter(self, name: str, config: LoraConfig) -> LinearAdapter:
        """The adapter object ``config`` gets when none is given."""
        if config.mixture is not None or config.adalora is not None:
            raise AdapterError(
                f"adapter '{name}': a {'mixture' if config.mixture else 'AdaLoRA'} config needs its adapter "
                "object (moetune.add_adapter chooses it)"
            )
        return lora_adapter(name, config)

    def delete_adapter(self, name: str) -> None:
        """Remove adapter ``name``; a merged one is unmerged first, a PiSSA one restores ``W``."""
        if name in self.merged:
            self.unmerge(name)
        self.adapters.pop(name).remove(self)
        self.dora_factor.pop(name)
        self.configs.pop(name, None)
        self.scaling.pop(name, None)
        self.active = [n for n in self.active if n != name]

    def adapter_params(self, name: str | None = None) -> Iterator[tuple[str, nn.Parameter]]:
        for n in [name] if name is not None else self.adapter_names:
            yield from self.adapters[n].params(self)

    def peft_config_targets(self, module_path: str, name: str | None = None) -> dict:
        """``target_modules`` entry, plus this module's rank and alpha as PEFT patterns (the writer
        keeps only those that differ from the adapter-wide values)."""
        out: dict = {"target_modules": [module_path]}
        if name is not None:
            r, alpha = self.adapters[name].rank_alpha(self)
            out["rank_pattern"], out["alpha_pattern"] = {module_path: r}, {module_path: alpha}
        return out

    def is_pissa(self, name: str) -> bool:
        return self.pissa_init.get(f"{name}_A") is not None

    def is_svd(self, name: str) -> bool:
        return name in self.lora_E

    def svd_triplets(self, name: str) -> dict[str, tuple[nn.Parameter, nn.Parameter, nn.Parameter]]:
        """``{name: (P (r, in), Lambda (r, 1), Q (out, r))}`` of an AdaLoRA adapter: one matrix, under
        the mask key ``name``."""
        return {name: (self.lora_A[name], self.lora_E[name], self.lora_B[name])}

    # --- forward --------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (..., in) -> (..., out): base output plus each running adapter, on its tokens only."""
        selection = self.selection()
        if self.merged:
            if self.disabled or selection.names is not None:
                raise AdapterError(
                    f"adapter(s) {self.merged} are merged into the base weights; unmerge them "
                    "before disabling adapters or choosing adapters per sample"
                )
        base = result = self.base_layer(x)
        names = self.running()
        if names and selection.runs is not None and len(selection.runs.runs) > 1:
            delta = self._per_sample(names, selection, x, base)
            return base if delta is None else base + delta
        for name in names:  # each adapter's term is relative to the base output alone
            result = result + self.adapters[name].output(self, x, base)
        return result

    def _per_sample(
        self, names: list[str], selection: Selection, x: torch.Tensor, base: torch.Tensor
    ) -> torch.Tensor | None:
        """The adapters' terms when samples choose adapters: each adapter runs on its samples only
        (host-known runs of samples, or of token rows, split apart along the first dim and put back
        together: no mask, no index), zeros where no adapter here runs; None when no row of this
        call chose one of ``names``. ``x`` is samples first (B, ...) or token rows first (n, ...)."""
        runs, B = selection.runs, selection.batch_size
        if x.dim() >= 3 and x.shape[0] == B and selection.rows == range(B * runs.seq_len):
            segments = [(end - first, slot) for first, end, slot in runs.runs]  # samples first: (B, ...)
        else:
            segments = runs.segments(selection.rows)  # token rows: (n, ...)
        sizes = [n for n, _ in segments]
        if x.shape[0] != sum(sizes):
            raise AdapterError(
                f"per-sample adapters need this layer's input samples or tokens first ({sum(sizes)} rows); "
                f"got shape {tuple(x.shape)}"
            )
        hs, bs = x.split(sizes), base.split(sizes)  # split, not sliced: one concatenation in backward
        out: list[torch.Tensor | None] = [None] * len(segments)
        for name in names:
            mine = [i for i, (_, slot) in enumerate(segments) if slot == runs.slot(name)]
            if mine:
                delta = self.adapters[name].output(self, cat([hs[i] for i in mine]), cat([bs[i] for i in mine]))
                for i, piece in zip(mine, delta.split([sizes[i] for i in mine])):
                    out[i] = piece
        if all(piece is None for piece in out):
            return None
        parts = [base.new_zeros(n, *base.shape[1:]) if p is None else p for n, p in zip(sizes, out)]
        return cat(parts)

    # --- weights --------------------------------------------------------------------------
    def delta_weight(self, name: str) -> torch.Tensor:
        """``s * B @ A`` (out, in) in fp32."""
        return self.adapters[name].delta_weight(self)

    def _merged_delta(self, name: str, w0: torch.Tensor) -> torch.Tensor:
        delta = self.delta_weight(name)
        factor = self.dora_factor.get(name)
        if factor is None:
            return delta
        return (factor[:, None] - 1) * w0 + factor[:, None] * delta

    def base_weight(self) -> torch.Tensor:
        """The base weight with every merged adapter taken out, fp32, no grad.

        With merged plain deltas ``D_j`` and merged DoRA factors ``f_j``, the current weight is
        ``W = W0 * (1 + sum_j (f_j - 1)) + sum_j f_j * D_j`` (row-wise), solved here for ``W0``.
        """
        w = self.base_layer.weight.detach()
        if not self.merged:
            return w.float()
        with torch.no_grad():
            w, scale = w.float().clone(), torch.ones(self.out_features, device=w.device)
            for n in self.merged:
                factor = self.dora_factor.get(n)
                f = torch.ones_like(scale) if factor is None else factor
                w -= f[:, None] * self.delta_weight(n)
                scale += f - 1
            return w / scale[:, None]

    @torch.no_grad()
    def merge(self, name: str) -> None:
        """Fold adapter ``name`` into the base weight; a merged adapter no longer runs separately."""
        if name in self.merged:
            return
        w0 = self.base_weight()
        factor = self.adapters[name].merge_factor(self, w0)
        if factor is not None:
            self.dora_factor.put(name, factor, persistent=False)
        w = self.base_layer.weight
        w.copy_((w.float() + self._merged_delta(name, w0)).to(w.dtype))
        self.merged.append(name)

    @torch.no_grad()
    def unmerge(self, name: str) -> None:
        """Take a merged adapter back out of the base weight (any order)."""
        if name not in self.merged:
            return
        w0 = self.base_weight()
        w = self.base_layer.weight
        w.copy_((w.float() - self._merged_delta(name, w0)).to(w.dtype))
        self.merged.remove(name)
        self.dora_factor.pop(name)

    # --- files ----------------------------------------------------------------------------
    def peft_tensors(self, name: str) -> dict[str, torch.Tensor]:
        return self.adapters[name].file_tensors(self)

    def load_peft_tensors(self, name: str, tensors: dict[str, torch.Tensor], *, where: str) -> None:
        """Fill adapter ``name`` from PEFT tensors; ``where`` is ``"<file>: <key prefix>"``."""
        self.adapters[name].load_file_tensors(self, tensors, where=where)

    def plain_pair(self, name: str) -> bool:
        """Whether adapter ``name`` is a plain LoRA pair (what adapter arithmetic combines)."""
        return not self.adapters[name].routed

    def extra_repr(self) -> str:
        return ", ".join(f"{n}: r={c.r}{' dora' if c.use_dora else ''}" for n, c in self.configs.items())
