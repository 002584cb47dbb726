"""The whole run: :class:`TrainConfig`, its adapters (:class:`AdapterSection`) and each adapter's
own data and optim overrides.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar, Literal

from .adapter import AdaLoraOptions, LoraConfig, MixtureConfig
from .schema import PATH_FIELD, ConfigFieldError, ConfigSection, Key, T, require
from .sections import (
    CheckpointSection,
    DataSection,
    DistributedSection,
    LoggingSection,
    ModelSection,
    OptimSection,
    TrainSection,
)

_ADAPTER_NAME = re.compile(r"[A-Za-z0-9_-]+")


METHOD_KINDS = {"mixlora": "mixlora", "mixdora": "mixlora", "loramoe": "loramoe", "mola": "mola"}


@dataclass(kw_only=True)
class AdapterSection(LoraConfig):
    """One adapter in a run file: a name, a method, the LoRA options (flattened) and, when several
    adapters train at once, what this one does differently from the run's defaults.

    Attributes:
        name: adapter name (letters, digits, ``_``, ``-``); also its folder name when saved.
        method: ``lora``; ``dora`` (same as ``use_dora: true``); ``mixlora`` / ``mixdora``
            (MixLoRA with LoRA / DoRA experts), ``loramoe``, ``mola`` (mixtures of LoRA experts,
            options in ``mixture``); ``adalora`` (adaptive-rank SVD form, options in ``adalora``).
        path: start from the adapter folder here (PEFT layout) instead of a new adapter; its
            rank, alpha and targets come from the folder, not from this mapping.
        frozen: with ``path``: keep that adapter active in every forward but never train or save
            it, so the run trains the other adapters on top of it (progressive training).
        data: this adapter's own data (keys not given come from the run's ``data``).
        optim: this adapter's own learning rate, schedule, steps and batch size.
        output_dir: where its adapter folder goes (default ``<checkpoint.output_dir>/adapter``
            for one adapter, ``.../adapter-<name>`` for several).
    """

    name: str = "default"
    method: Literal["lora", "dora", "mixlora", "mixdora", "loramoe", "mola", "adalora"] = "lora"
    path: str | None = field(default=None, metadata=PATH_FIELD)
    frozen: bool = False
    data: DataOverride | None = None
    optim: OptimOverride | None = None
    output_dir: str | None = field(default=None, metadata=PATH_FIELD)
    dump_first: ClassVar[tuple[str, ...]] = ("name", "method")

    def validate(self) -> None:
        kind = METHOD_KINDS.get(self.method)
        if kind is not None:
            self.mixture = self.mixture or MixtureConfig()
            if self.mixture.kind not in (None, kind):
                raise ConfigFieldError(
                    f"{{key}}: {self.mixture.kind} contradicts method: {self.method}", ("mixture", "kind")
                )
            self.mixture.kind = kind
        elif self.mixture is not None:
            raise ConfigFieldError(
                "{key} needs method mixlora, mixdora, loramoe or mola, got method: " + self.method, ("mixture",)
            )
        dora = self.method in ("dora", "mixdora")
        if self.use_dora and not dora:
            better = "dora" if kind is None else "mixdora (MixLoRA with DoRA experts)"
            raise ConfigFieldError(
                f"{{key}}: true contradicts method: {self.method} (write method: {better})", ("use_dora",)
            )
        self.use_dora = dora
        if self.method == "adalora":
            self.adalora = self.adalora or AdaLoraOptions()
        elif self.adalora is not None:
            raise ConfigFieldError("{key} needs method: adalora, got method: " + self.method, ("adalora",))
        super().validate()
        require(bool(_ADAPTER_NAME.fullmatch(self.name)), "name", "letters, digits, '_' or '-'", self.name)
        require(
            not self.frozen or self.path is not None,
            "frozen",
            "false unless path names the adapter folder to keep",
            self.frozen,
        )

    def to_lora_config(self) -> LoraConfig:
        """The LoRA options alone, as the peft layer takes them."""
        names = [f.name for f in dataclasses.fields(LoraConfig)]
        return LoraConfig(**{name: getattr(self, name) for name in names})


@dataclass(kw_only=True)
class DataOverride(ConfigSection):
    """One adapter's own ``data`` keys; a key left out (null) comes from the run's ``data``."""

    train: str | None = field(default=None, metadata=PATH_FIELD)
    eval: str | None = field(default=None, metadata=PATH_FIELD)
    format: Literal["auto", "instruction", "chat", "text", "preference", "kto"] | None = None
    max_length: int | None = None
    packing: bool | None = None
    train_on_prompt: bool | None = None
    val_fraction: float | None = None
    skip_bad_rows: bool | None = None
    seed: int | None = None


@dataclass(kw_only=True)
class OptimOverride(ConfigSection):
    """One adapter's own ``optim`` keys; a key left out (null) comes from the run's ``optim``."""

    lr: float | None = None
    weight_decay: float | None = None
    lr_schedule: Literal["cosine", "linear", "constant"] | None = None
    warmup_steps: int | None = None
    max_steps: int | None = None
    batch_size: int | None = None


def _merged(base: T, override: ConfigSection | None, key: Key) -> T:
    """``base`` with the non-null keys of ``override``, validated; errors name ``key``."""
    if override is None:
        return base
    given = {
        f.name: getattr(override, f.name) for f in dataclasses.fields(override) if getattr(override, f.name) is not None
    }
    if isinstance(base, DataSection) and "train" in given and "eval" not in given:
        given["eval"] = None  # another train file does not inherit the run's eval file
    try:
        return dataclasses.replace(base, **given)
    except ConfigFieldError as err:
        err.path = (*key, *err.path)
        raise


@dataclass(kw_only=True)
class TrainConfig(ConfigSection):
    """A whole training run, as read from a run file by :func:`load_train_config`."""

    model: ModelSection
    adapters: list[AdapterSection] = field(default_factory=lambda: [AdapterSection()])
    data: DataSection
    optim: OptimSection
    train: TrainSection = field(default_factory=TrainSection)
    checkpoint: CheckpointSection
    logging: LoggingSection = field(default_factory=LoggingSection)
    distributed: DistributedSection = field(default_factory=DistributedSection)
    seed: int = 0

    def validate(self) -> None:
        names = [adapter.name for adapter in self.adapters]
        require(len(names) > 0, "adapters", "a non-empty list", names)
        require(len(set(names)) == len(names), "adapters", "uniquely named", names)
        for i in range(len(self.adapters)):  # overrides must give valid sections (errors name the adapter)
            self.adapter_data(i), self.adapter_optim(i)
        self._validate_adalora()
        self._validate_preference()
        mixtures = [f"adapters[{i}]" for i, a in enumerate(self.adapters) if a.mixture is not None]
        if self.train.compile and mixtures:
            raise ConfigFieldError(
                f"{{key}}: true cannot compile mixture adapters ({', '.join(mixtures)}): their routing reads "
                "the adapter context and row counts that a compiled block cannot trace; set it to false",
                ("train", "compile"),
            )
        trained = [a.name for a in self.adapters if not a.frozen]
        require(len(trained) > 0, "adapters", "at least one adapter that is not frozen", names)
        # AdaLoRA's allocation and distillation run in the single-adapter trainer (frozen adapters beside it)
        special = [
            f"adapters[{i}].adalora" for i, a in enumerate(self.adapters) if a.adalora is not None and not a.frozen
        ]
        special += ["optim.distill"] if self.optim.distill is not None else []
        if special and len(trained) > 1:
            raise ConfigFieldError(
                f"{{key}}: {', '.join(special)} train one adapter at a time (other adapters may be frozen), "
                f"but this run trains {len(trained)}: {', '.join(trained)}",
                ("adapters",),
            )
        frozen = [a.name for a in self.adapters if a.frozen]
        if frozen and len(trained) > 1:
            raise ConfigFieldError(
                f"{{key}}: frozen adapters ({', '.join(frozen)}) stack under one trained adapter, but several "
                f"adapters trained at once ({', '.join(trained)}) each run on their own samples; train one "
                "adapter on top of them per run",
                ("adapters",),
            )
        distill = self.optim.distill
        if distill is not None and distill.kind == "adapter":
            frozen = [a.name for a in self.adapters if a.frozen]
            if distill.target not in frozen:
                raise ConfigFieldError(
                    f"{{key}}: adapter '{distill.target}' is not a frozen adapter of this run "
                    f"(frozen adapters: {', '.join(frozen) or 'none'}; add it with path: and frozen: true)",
                    ("optim", "distill", "teacher"),
                )

    def _validate_preference(self) -> None:
        """A preference objective trains one adapter against the base alone, on unpacked prompt/completion rows."""
        objective = self.optim.objective
        if objective == "sft":
            return
        reasons = {
            ("adapters",): len(self.adapters) > 1
            and "one adapter, scored against the base with every adapter off (frozen or other adapters "
            "would be in the policy but not in the reference: merge them into the base first)",
            ("data", "packing"): self.data.packing and "false: each row is one prompt and completion",
            ("data", "train_on_prompt"): self.data.train_on_prompt and "false: only completion tokens are scored",
            ("optim", "preference", "reference"): self.optim.preference.reference == "initial"
            and self.adapters[0].path is None
            and "an adapter to start from (adapter.path) for reference: initial",
            ("optim", "batch_size"): objective == "kto"
            and self.optim.batch_size < 2
            and "at least 2: KTO's KL estimate pairs each prompt with another row's completion",
        }
        for key, reason in reasons.items():
            if reason:
                raise ConfigFieldError(f"{{key}}: objective {objective} needs {reason}", key)

    @property
    def reference_adapter(self) -> str | None:
        """The name of the frozen copy of the starting adapter that a preference objective scores
        against (``optim.preference.reference: initial``), or None (the base)."""
        pref = self.optim.preference
        return f"{self.adapters[0].name}-reference" if pref is not None and pref.reference == "initial" else None

    def _validate_adalora(self) -> None:
        """AdaLoRA's ``total_step`` defaults to the adapter's ``max_steps``; its schedule must fit."""
        for i, adapter in enumerate(self.adapters):
            if adapter.adalora is None:
                continue
            ada = adapter.adalora
            ada.total_step = ada.total_step or self.adapter_optim(i).max_steps
            try:
                ada.check_schedule(ada.total_step)
            except ConfigFieldError as err:
                err.path = ("adapters", i, "adalora", *err.path)
                raise

    def adapter_data(self, index: int) -> DataSection:
        """The ``data`` section adapter ``index`` trains on (its own keys over the run's)."""
        return _merged(self.data, self.adapters[index].data, ("adapters", index, "data"))

    def adapter_optim(self, index: int) -> OptimSection:
        """The ``optim`` section of adapter ``index`` (its own keys over the run's)."""
        return _merged(self.optim, self.adapters[index].optim, ("adapters", index, "optim"))

    def adapter_dir(self, index: int) -> Path:
        """Where adapter ``index``'s folder is written at the end of training."""
        adapter = self.adapters[index]
        if adapter.output_dir:
            return Path(adapter.output_dir)
        leaf = "adapter" if len(self.adapters) == 1 else f"adapter-{adapter.name}"
        return Path(self.checkpoint.output_dir) / leaf

    def single_adapter_view(self) -> TrainConfig:
        """For a one-adapter run: the run with that adapter's data/optim overrides applied."""
        if len(self.adapters) != 1 or (self.adapters[0].data is None and self.adapters[0].optim is None):
            return self
        return dataclasses.replace(self, data=self.adapter_data(0), optim=self.adapter_optim(0))
