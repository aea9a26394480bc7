"""The fine-tuning config: ``conf/finetune.yaml``'s own keys, split from the run's config.

``model.path``, ``finetune.*``, ``lora.*`` and ``data.prompt_field``/``data.response_field``
are fine-tuning's; everything else is a training run's :class:`diloco.config.Config`,
validated by :func:`diloco.config.parse` as for ``python -m diloco.train`` (the model node
names :class:`diloco.finetune.models.CausalLM`, the wrapper the trainer receives).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from diloco.config import Config, ConfigError, from_dict, parse

MODEL_TARGET = "diloco.finetune.models.CausalLM"


@dataclass
class LoraOptions:
    """LoRA adapters (``peft.LoraConfig``): rank, scale ``alpha / r``, dropout, target layers.

    ``target_modules`` None: peft's default for the model type (GPT-2: ``c_attn``), or
    ``qkv`` for our own GPT.
    """

    r: int = field(default=8, metadata={"ge": 1})
    alpha: int = field(default=16, metadata={"ge": 1})
    dropout: float = field(default=0.0, metadata={"ge": 0.0, "lt": 1.0})
    target_modules: list[str] | None = None


@dataclass
class Options:
    """How to fine-tune: every weight, or LoRA adapters only (``lora.*``)."""

    lora: bool = False


@dataclass
class ModelSource:
    """The model to start from: a Hugging Face causal LM folder or a diloco.train run dir."""

    path: str | None = None


@dataclass
class Fields:
    """The jsonl fields of prompt/response examples (both None: plain text, packed)."""

    prompt_field: str | None = None
    response_field: str | None = None

    @property
    def examples(self) -> bool:
        """Whether the data is prompt/response examples."""
        return self.prompt_field is not None


@dataclass
class FinetuneConfig:
    """A fine-tuning run: the training run's config plus what to start from and how."""

    run: Config
    model_path: str
    fields: Fields
    lora: LoraOptions | None  # None: full fine-tuning


def split(resolved: dict[str, Any]) -> FinetuneConfig:
    """Validate a resolved ``conf/finetune.yaml`` into a :class:`FinetuneConfig`.

    Raises:
        ConfigError: one line naming the key (``model.path: missing; ...``).
    """
    node = {k: v for k, v in resolved.items() if k not in ("hydra", "model", "finetune", "lora")}
    data = dict(node.get("data") or {})
    fields = from_dict(Fields, {k: data.pop(k) for k in list(data) if k in _FIELDS}, "data")
    run = parse({**node, "data": data, "model": {"_target_": MODEL_TARGET}})
    source = from_dict(ModelSource, _node(resolved, "model"), "model")
    options = from_dict(Options, _node(resolved, "finetune"), "finetune")
    lora = from_dict(LoraOptions, _node(resolved, "lora"), "lora")
    if source.path is None:
        raise ConfigError(
            "model.path",
            "missing; point it at a Hugging Face causal LM folder or a diloco.train run dir",
        )
    if run.data.path is None:
        raise ConfigError("data.path", "missing; point it at your .txt or .jsonl data")
    if (fields.prompt_field is None) != (fields.response_field is None):
        given, other = (
            ("data.prompt_field", "data.response_field")
            if fields.prompt_field is not None
            else ("data.response_field", "data.prompt_field")
        )
        raise ConfigError(given, f"set {other} too (prompt/response examples need both)")
    if run.workers.ranks_per_worker > 1:
        raise ConfigError(
            f"workers.ranks_per_worker={run.workers.ranks_per_worker}",
            "fine-tuning runs one rank per worker",
        )
    return FinetuneConfig(run, source.path, fields, lora if options.lora else None)


_FIELDS = ("prompt_field", "response_field")


def _node(resolved: dict[str, Any], key: str) -> dict[str, Any]:
    value = resolved.get(key) or {}
    if not isinstance(value, dict):
        raise ConfigError(key, f"got {value!r}; expected a mapping")
    return value
