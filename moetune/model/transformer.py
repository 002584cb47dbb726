"""Decoder block, decoder stack and causal LM with chunked loss and auxiliary router loss.

Module names mirror transformers 5 in memory (``model.layers.{i}.self_attn.q_proj``,
``model.layers.{i}.mlp.experts``, ``lm_head``) so adapter keys line up with PEFT's.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from .attention import KVCache, build_mask
from .config import ModelArgs
from .context import in_forward_context
from .layers import RMSNorm
from .loss import causal_lm_loss, load_balancing_loss
from .moe import Router, RouterStats


@dataclass
class CausalLMOutput:
    """What a forward returns.

    Attributes:
        logits: (B, T, V), or None when labels were given and ``return_logits`` was False.
        loss: scalar mean cross-entropy over counted tokens, or None without labels.
        aux_loss: scalar load-balancing loss (uncoefficiented), or None for dense models.
        router_stats: per MoE layer, routing sums (load per expert) and per-token routing.
        records: what forward hooks added (adapter mixtures report their routing statistics
            and router losses here); the model itself leaves it empty.
        token_loss: with labels, (B, T) fp32 cross-entropy of each position (predicting
            ``labels[t+1]``), 0 where nothing is counted; per-sample sums are
            :func:`moetune.model.loss.sample_losses`.
    """

    logits: torch.Tensor | None = None
    loss: torch.Tensor | None = None
    aux_loss: torch.Tensor | None = None
    router_stats: list[RouterStats] = field(default_factory=list)
    cache: KVCache | None = None
    records: dict = field(default_factory=dict)
    token_loss: torch.Tensor | None = None


class DecoderLayer(nn.Module):
    """Pre-norm block: ``x + attn(norm(x))`` then ``x + mlp(norm(x))``; mlp is dense or MoE.

    The token mixer is registered under ``attn_name``: ``self_attn``, or ``linear_attn`` for the
    gated DeltaNet layers of hybrid models (transformers' module names, so adapter keys match).
    """

    def __init__(
        self,
        *,
        self_attn: nn.Module,
        mlp: nn.Module,
        input_layernorm: nn.Module,
        post_attention_layernorm: nn.Module,
        is_moe: bool,
        attn_name: str = "self_attn",
    ) -> None:
        super().__init__()
        self.attn_name = attn_name
        setattr(self, attn_name, self_attn)
        self.mlp = mlp
        self.input_layernorm = input_layernorm
        self.post_attention_layernorm = post_attention_layernorm
        self.is_moe = is_moe

    def forward(self, x: torch.Tensor, *, rope, mask, cache: KVCache | None, token_mask: torch.Tensor | None):
        mixer = getattr(self, self.attn_name)
        x = x + mixer(self.input_layernorm(x), rope=rope, mask=mask, cache=cache)
        h = self.post_attention_layernorm(x)
        if self.is_moe:
            out, stats = self.mlp(h, token_mask=token_mask)
            return x + out, stats
        return x + self.mlp(h), None


class DecoderModel(nn.Module):
    """Embeddings, decoder layers and final norm (HF's ``model.`` prefix)."""

    def __init__(
        self, *, args: ModelArgs, layers: list[DecoderLayer], rotary_emb: nn.Module, norm: nn.Module | None = None
    ) -> None:
        super().__init__()
        self.args = args
        self.embed_tokens = nn.Embedding(args.vocab_size, args.hidden_size)
        self.layers = nn.ModuleList(layers)
        self.norm = norm if norm is not None else RMSNorm(args.hidden_size, eps=args.rms_norm_eps)
        self.rotary_emb = rotary_emb
        self.gradient_checkpointing = False

    def _masks(self, x, attention_mask, segment_ids, cache: KVCache | None):
        """One mask per window size; a cached sliding layer sees only the positions it kept."""
        B, T = x.shape[:2]
        past = cache.length if cache is not None else 0
        masks = {}
        for w in set(self.args.sliding_window):
            kept = cache.kept(w, past) if cache is not None else past
            masks[w] = build_mask(
                batch=B,
                q_len=T,
                past=kept,
                device=x.device,
                attention_mask=attention_mask,
                segment_ids=segment_ids,
                window=w if w is not None and w < kept + T else None,
            )
        return masks

    def _run_layer(self, layer: DecoderLayer, x, **kw):
        if not (self.gradient_checkpointing and self.training and torch.is_grad_enabled()):
            return layer(x, **kw)
        # backward recomputes the layer in the context this forward ran in (forward hooks' state)
        return checkpoint(in_forward_context(layer), x, use_reentrant=False, **kw)

    def forward(
        self, input_ids, *, attention_mask=None, position_ids=None, segment_ids=None, cache: KVCache | None = None
    ):
        x = self.embed_tokens(input_ids)
        past = cache.length if cache is not None else 0
        if position_ids is None:
            position_ids = _positions(input_ids, attention_mask, past)
        rope = self.rotary_emb(position_ids, x.dtype)
        if cache is not None:
            cache.windows = {i: w for i, w in enumerate(self.args.sliding_window) if w is not None}
        masks = self._masks(x, attention_mask, segment_ids, cache)
        token_mask = attention_mask[:, -input_ids.shape[1] :].reshape(-1) if attention_mask is not None else None
        stats: list[RouterStats] = []
        for i, layer in enumerate(self.layers):
            window = self.args.sliding_window[i]
            x, s = self._run_layer(layer, x, rope=rope, mask=masks[window], cache=cache, token_mask=token_mask)
            if s is not None:
                stats.append(s)
        return self.norm(x), stats


def _positions(input_ids: torch.Tensor, attention_mask: torch.Tensor | None, past: int) -> torch.Tensor:
    """Positions count real tokens only, so left padding does not shift RoPE (as transformers)."""
    B, T = input_ids.shape
    if attention_mask is None:
        return torch.arange(past, past + T, device=input_ids.device).expand(B, T)
    pos = attention_mask.long().cumsum(-1) - 1
    return pos.clamp_min(0)[:, -T:]


class CausalLM(nn.Module):
    """Decoder-only causal LM.

    ``forward(input_ids, attention_mask=None, labels=None, adapter_names=None)`` follows the
    transformers conventions: labels are shifted inside, -100 is ignored.
    """

    def __init__(self, *, args: ModelArgs, model: DecoderModel, lm_head: nn.Module) -> None:
        super().__init__()
        self.args = args
        self.model = model
        self.lm_head = lm_head
        self.loss_chunk_size = 1024

    @property
    def config(self) -> ModelArgs:
        return self.args

    def tie_weights(self) -> None:
        if self.args.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def save_pretrained(self, out_dir, *, max_shard_size: int = 5 * 2**30, **options):
        """Write a Hugging Face checkpoint folder (base weights; merge adapters first to include them).
        ``options``: see :func:`.saving.save_pretrained` (``overwrite``, ``extra_files``)."""
        from .saving import save_pretrained

        return save_pretrained(self, out_dir, max_shard_size=max_shard_size, **options)

    def set_gradient_checkpointing(self, enabled: bool = True) -> None:
        self.model.gradient_checkpointing = enabled

    def compile_blocks(self, **options) -> None:
        """Compile each decoder block's forward with ``torch.compile(fullgraph=True, **options)``
        (a graph break is an error, never a silent split). The forward only: hooks on a block run
        eagerly around it (peft hands its adapter layers the forward's selection there). Embedding,
        final norm, LM head and loss stay eager. Compiling again is a no-op."""
        for layer in self.model.layers:
            if "forward" not in vars(layer):  # an instance attribute: already compiled
                layer.forward = torch.compile(layer.forward, fullgraph=True, **options)

    @torch.no_grad()
    def update_router_biases(self, stats: list[RouterStats], speed: float) -> int:
        """One aux-loss-free balancing step on every router that holds a correction bias.

        Args:
            stats: per MoE layer, in layer order, as in ``CausalLMOutput.router_stats`` (their
                ``counts`` exclude padding; sum micro-batches and ranks first).
            speed: step size (DeepSeek-V3 used 1e-3).

        Returns:
            Number of routers updated (0 for models without correction biases).
        """
        routers = [layer.mlp.routing_module for layer in self.model.layers if layer.is_moe]
        if len(routers) != len(stats):
            raise ValueError(f"got router stats for {len(stats)} layers, the model has {len(routers)} MoE layers")
        biased = [(r, s) for r, s in zip(routers, stats) if isinstance(r, Router) and r.has_correction_bias]
        for router, s in biased:
            router.update_correction_bias(s.counts, speed)
        return len(biased)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        adapter_names: list[str | None] | None = None,  # noqa: ARG002 - read by adapter layers' forward hooks
        *,
        position_ids: torch.Tensor | None = None,
        segment_ids: torch.Tensor | None = None,
        cache: KVCache | None = None,
        return_logits: bool = False,
    ) -> CausalLMOutput:
        """Run the model.

        Args:
            input_ids: (B, T) token ids.
            attention_mask: (B, T) or (B, past+T) 1 for real tokens, 0 for padding.
            labels: (B, T) target ids, -100 ignored; position t is scored against labels[t+1].
            adapter_names: per-sample adapter name (None = base only); default: active adapters.
                The model does not read it: the adapters' forward hooks (``peft/``, installed by
                ``add_adapter``) take it from the call, with the token layout (``input_ids``,
                ``attention_mask``); a model without adapters ignores it.
            position_ids: (B, T) RoPE positions (packing restarts them per example).
            segment_ids: (B, T) packed-example ids; attention stays inside a segment.
            cache: KV cache for incremental decoding.
            return_logits: also return logits when labels are given.
        """
        hidden, stats = self.model(
            input_ids, attention_mask=attention_mask, position_ids=position_ids, segment_ids=segment_ids, cache=cache
        )
        out = CausalLMOutput(router_stats=stats, cache=cache)
        if labels is not None:
            out.loss, out.token_loss = causal_lm_loss(
                self.lm_head, hidden, labels, attention_mask, chunk_size=self.loss_chunk_size
            )
        if labels is None or return_logits:
            out.logits = self.lm_head(hidden)
        if stats:
            out.aux_loss = load_balancing_loss(stats, self.args.moe.num_experts)
        return out
