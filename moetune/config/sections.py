"""The run file's plain sections: model, data, optim (with distillation), train, checkpoint,
logging and distributed.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Literal

from .preference import PREFERENCE_AUX_LOSS_COEF, PREFERENCE_OBJECTIVES, Objective, PreferenceSection
from .schema import PATH_FIELD, ConfigFieldError, ConfigSection, require

_DEVICE = re.compile(r"auto|cpu|mps|cuda(:\d+)?")


@dataclass(kw_only=True)
class ModelSection(ConfigSection):
    """The frozen base model: a local Hugging Face folder.

    Attributes:
        dtype: the base weights' dtype (compute runs in it; adapters stay fp32). ``fp16`` trains
            with a loss scaler (``torch.amp.GradScaler``): steps whose gradients overflow are
            skipped and the scale backs off; not with ``distributed.strategy: fsdp``.
    """

    path: str = field(metadata=PATH_FIELD)
    dtype: Literal["fp32", "bf16", "fp16"] = "fp32"
    device: str = "auto"
    quantize: Literal["nf4"] | None = None

    def validate(self) -> None:
        require(bool(self.path.strip()), "path", "a model folder", self.path)
        require(bool(_DEVICE.fullmatch(self.device)), "device", "auto, cpu, mps, cuda or cuda:N", self.device)


@dataclass(kw_only=True)
class DataSection(ConfigSection):
    """Training data: JSONL files, tokenizer, sequence length and packing.

    Attributes:
        train: JSONL file of training rows.
        eval: JSONL file of evaluation rows; or use ``val_fraction``, not both.
        format: row shape; ``auto`` detects it per file. ``preference`` (prompt, chosen, rejected)
            and ``kto`` (prompt, completion, label) rows train the preference objectives.
        tokenizer: a folder with ``tokenizer.json``, or ``byte`` (the built-in byte tokenizer).
            Default (null): the model folder's own tokenizer, the one ``eval`` and ``generate``
            use; the byte tokenizer only when the model folder has no ``tokenizer.json`` (with a
            warning).
        max_length: tokens per example (longer ones are truncated) and per packed row.
        packing: pack several examples into each row of ``max_length`` tokens.
        train_on_prompt: put loss on prompt tokens too, not only on responses.
        val_fraction: fraction of ``train`` rows held out for evaluation, in [0, 1).
        skip_bad_rows: skip and count malformed rows instead of failing.
        seed: seed of the validation split.
    """

    train: str = field(metadata=PATH_FIELD)
    eval: str | None = field(default=None, metadata=PATH_FIELD)
    format: Literal["auto", "instruction", "chat", "text", "preference", "kto"] = "auto"
    tokenizer: str | None = field(default=None, metadata={"path": True, "keep": ("byte",)})
    max_length: int = 512
    packing: bool = False
    train_on_prompt: bool = False
    val_fraction: float = 0.0
    skip_bad_rows: bool = False
    seed: int = 0

    def validate(self) -> None:
        require(self.max_length >= 2, "max_length", "an integer >= 2", self.max_length)
        require(0 <= self.val_fraction < 1, "val_fraction", "a number in [0, 1)", self.val_fraction)
        if self.eval is not None and self.val_fraction > 0:
            raise ConfigFieldError("{key}: give either eval or val_fraction, not both", ("val_fraction",))


_TEACHER = re.compile(r"base|adapter:[A-Za-z0-9_-]+|file:.+")


@dataclass(kw_only=True)
class DistillSection(ConfigSection):
    """Distillation: ``loss = CE + weight * T^2 * KL(softmax(t / T) || softmax(s / T))``, mean over
    the tokens that carry a label (teacher logits t, student logits s); see
    :mod:`moetune.train.objectives`.

    Attributes:
        teacher: ``base`` (the model with every adapter off); ``adapter:<name>`` (the base with
            only adapter ``name``: a ``frozen`` adapter of the run, which then does not run in
            the student's forward); ``file:<path>`` (logits saved with
            :func:`moetune.train.objectives.save_teacher_logits`, a relative path from the
            current directory).
        weight: factor on the distillation term.
        temperature: T, softening both distributions.
    """

    teacher: str = "base"
    weight: float = 1.0
    temperature: float = 1.0

    def validate(self) -> None:
        require(bool(_TEACHER.fullmatch(self.teacher)), "teacher", "base, adapter:<name> or file:<path>", self.teacher)
        require(self.weight >= 0, "weight", "a number >= 0", self.weight)
        require(self.temperature > 0, "temperature", "a number > 0", self.temperature)

    @property
    def kind(self) -> str:
        return self.teacher.partition(":")[0]

    @property
    def target(self) -> str:
        """The adapter name or file path after ``adapter:`` / ``file:`` ("" for base)."""
        return self.teacher.partition(":")[2]


@dataclass(kw_only=True)
class OptimSection(ConfigSection):
    """Optimizer (AdamW), schedule, batch size and step count.

    Attributes:
        loraplus_lr_ratio: LoRA+; B matrices get ``lr * ratio``. None turns it off.
        batch_size: examples (or packed rows) per micro-batch on each device.
        grad_accum: micro-batches per optimizer step.
        max_grad_norm: gradient clipping threshold; None turns clipping off.
        aux_loss_coef: weight of the router load-balancing loss added to the LM loss (default 0;
            0.001 with a preference objective, as TRL does for MoE policies).
        objective: ``sft`` (cross-entropy on the responses) or a preference objective: ``dpo``,
            ``ipo``, ``simpo``, ``orpo``, ``kto`` (options in ``preference``; see
            :class:`~moetune.config.preference.PreferenceSection`).
        preference: the preference objective's options.
        distill: add a distillation term towards a teacher (see :class:`DistillSection`).
        router_bias_update_speed: DeepSeek-V3 aux-loss-free balancing: after each optimizer step
            every router's ``e_score_correction_bias`` moves by this step toward equal expert
            load (0 = off; DeepSeek-V3 used 1e-3). The biases are base-model state: they are
            kept in checkpoints and written to ``router_biases.safetensors`` in the run folder.
    """

    lr: float = 2e-4
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    loraplus_lr_ratio: float | None = None
    lr_schedule: Literal["cosine", "linear", "constant"] = "cosine"
    warmup_steps: int = 0
    max_steps: int
    batch_size: int
    grad_accum: int = 1
    max_grad_norm: float | None = 1.0
    aux_loss_coef: float = 0.0
    activation_checkpointing: bool = False
    router_bias_update_speed: float = 0.0
    distill: DistillSection | None = None
    objective: Objective = "sft"
    preference: PreferenceSection | None = None

    def validate(self) -> None:
        self._validate_objective()
        require(self.lr > 0, "lr", "a number > 0", self.lr)
        require(self.weight_decay >= 0, "weight_decay", "a number >= 0", self.weight_decay)
        require(all(0 <= b < 1 for b in self.betas), "betas", "two numbers in [0, 1)", list(self.betas))
        require(self.eps > 0, "eps", "a number > 0", self.eps)
        ratio = self.loraplus_lr_ratio
        require(ratio is None or ratio > 0, "loraplus_lr_ratio", "a number > 0 or null", ratio)
        require(self.max_steps >= 1, "max_steps", "an integer >= 1", self.max_steps)
        require(0 <= self.warmup_steps <= self.max_steps, "warmup_steps", "in [0, max_steps]", self.warmup_steps)
        require(self.batch_size >= 1, "batch_size", "an integer >= 1", self.batch_size)
        require(self.grad_accum >= 1, "grad_accum", "an integer >= 1", self.grad_accum)
        require(
            self.router_bias_update_speed >= 0,
            "router_bias_update_speed",
            "a number >= 0",
            self.router_bias_update_speed,
        )
        norm = self.max_grad_norm
        require(norm is None or norm > 0, "max_grad_norm", "a number > 0 or null", norm)
        require(self.aux_loss_coef >= 0, "aux_loss_coef", "a number >= 0", self.aux_loss_coef)

    def _validate_objective(self) -> None:
        if self.objective not in PREFERENCE_OBJECTIVES:
            if self.preference is not None:
                raise ConfigFieldError("{key} needs a preference objective (optim.objective: dpo ...)", ("preference",))
            return
        self.preference = self.preference or PreferenceSection()
        try:
            self.preference.check_for(self.objective)
        except ConfigFieldError as err:
            raise err.prefixed("preference") from None
        if not self.given("aux_loss_coef"):
            self.aux_loss_coef = PREFERENCE_AUX_LOSS_COEF
        if self.distill is not None:
            raise ConfigFieldError(f"{{key}} cannot be combined with objective: {self.objective}", ("distill",))


@dataclass(kw_only=True)
class TrainSection(ConfigSection):
    """How each step runs.

    Attributes:
        compile: compile each decoder block's forward with ``torch.compile(fullgraph=True)`` (per
            block, the torchtitan way; embedding, LM head and loss stay eager). The first steps
            trace and compile, and so does the first step at a second sequence length (after
            which lengths are symbolic). Not with mixture adapters (their routing is not traceable).
    """

    compile: bool = False


@dataclass(kw_only=True)
class CheckpointSection(ConfigSection):
    """Where and how often to save. ``save_every: 0`` saves only at the end.

    Attributes:
        save_on_interrupt: on SIGINT (Ctrl-C) or SIGTERM, finish the current step and write a
            checkpoint of it before exiting (exit status 130 / 143), so ``--resume`` continues the
            run exactly; false exits after the step without writing one.
    """

    output_dir: str = field(metadata=PATH_FIELD)
    save_every: int = 0
    keep_last: int = 2
    save_on_interrupt: bool = True

    def validate(self) -> None:
        require(bool(self.output_dir.strip()), "output_dir", "a folder", self.output_dir)
        require(self.save_every >= 0, "save_every", "an integer >= 0", self.save_every)
        require(self.keep_last >= 1, "keep_last", "an integer >= 1", self.keep_last)


@dataclass(kw_only=True)
class LoggingSection(ConfigSection):
    """Logging cadence. ``eval_every: 0`` turns periodic evaluation off."""

    log_every: int = 1
    eval_every: int = 0
    tensorboard: bool = False
    progress: bool = True

    def validate(self) -> None:
        require(self.log_every >= 1, "log_every", "an integer >= 1", self.log_every)
        require(self.eval_every >= 0, "eval_every", "an integer >= 0", self.eval_every)


@dataclass(kw_only=True)
class DistributedSection(ConfigSection):
    """Multi-process training under ``torchrun`` (ignored by a single process).

    Attributes:
        strategy: ``replicate`` keeps a full model on every rank and all-reduces the adapter
            gradients (small models); ``fsdp`` shards each decoder layer, frozen base and adapters,
            with FSDP2 ``fully_shard``; ``auto`` picks ``fsdp`` on CUDA with more than one rank,
            ``replicate`` otherwise.
        backend: process-group backend; ``auto`` is NCCL on CUDA and gloo on CPU.
        timeout_s: seconds a collective may wait for the other ranks before the run fails.
    """

    strategy: Literal["auto", "fsdp", "replicate"] = "auto"
    backend: Literal["auto", "nccl", "gloo"] = "auto"
    timeout_s: int = 1800

    def validate(self) -> None:
        require(self.timeout_s >= 1, "timeout_s", "an integer >= 1", self.timeout_s)
