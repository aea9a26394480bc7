"""The model being fine-tuned: found, checked, loaded, wrapped for the trainer, saved.

Two sources (:func:`open_source`):

* a Hugging Face causal LM folder (``config.json``, weights, a tokenizer), loaded with
  ``AutoModelForCausalLM.from_pretrained`` in fp32, local files only, and saved back with
  ``save_pretrained`` (``model/``, safetensors, plus the tokenizer);
* a ``python -m diloco.train`` run dir (``.hydra/config.yaml`` and ``checkpoint.pt``): the
  run's model class with the global model of its checkpoint, its data tokenizer, saved as
  ``model/model.safetensors`` plus ``model/config.json`` (:func:`load_saved` reads it).

The trainer calls ``model(idx, targets)`` for ``(logits, loss)`` and flattens
``model.parameters()`` into one fp32 matrix, training every parameter it finds.
:class:`CausalLM` gives a Hugging Face model that call; under LoRA (``finetune.lora=true``)
``peft.get_peft_model`` adds the adapters and :func:`freeze_to_buffers` turns the frozen base
weights into buffers, so that the adapters are the only parameters: the workers train and
exchange them alone, and ``adapter/`` is what is saved (``peft.PeftModel.from_pretrained``
loads it onto the base). Tied weights (GPT-2's ``wte`` and ``lm_head``) are one parameter.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import json
import warnings
from collections.abc import Iterator
from dataclasses import asdict
from pathlib import Path
from typing import Any, cast

import torch
from omegaconf import OmegaConf
from torch import nn

from diloco import checkpoint
from diloco.config import Config, ConfigError, build, parse
from diloco.data import DataError, DocTokenizer, load_corpus
from diloco.finetune.config import LoraOptions
from diloco.models.gpt import GPT, lm_loss

_WEIGHTS = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)
_POSITIONS = ("max_position_embeddings", "n_positions", "n_ctx")
_INSTALL = "needs transformers and peft: pip install -e '.[finetune]'"


class CausalLM(nn.Module):
    """A causal LM as the trainer calls it: ``forward(idx, targets) -> (logits, loss)``.

    Args:
        model: a Hugging Face causal LM (``hf``: called as ``model(input_ids=idx).logits``)
            or a model of ours under peft (called as ``model(idx)[0]``).
        hf: which of the two.
        freeze: turn the parameters that need no gradient (a LoRA base) into buffers
            (:func:`freeze_to_buffers`), which every copy of this module then shares: the
            trainer's K worker replicas hold one base model, not K + 1.

    The loss is the mean cross-entropy over the targets that are not -100 (prompt tokens
    and padding of prompt/response examples).
    """

    def __init__(self, model: nn.Module, hf: bool = True, freeze: bool = False) -> None:
        super().__init__()
        self.model: Any = model
        self.hf = hf
        self.shared = {f"model.{n}" for n in freeze_to_buffers(model)} if freeze else set()

    def __deepcopy__(self, memo: dict[int, Any]) -> CausalLM:
        """A deep copy whose frozen buffers are this module's own tensors (never written)."""
        for name, buf in self.named_buffers(remove_duplicate=False):
            if name in self.shared:
                memo[id(buf)] = buf
        new = type(self).__new__(type(self))
        memo[id(self)] = new
        new.__dict__.update(copy.deepcopy(self.__dict__, memo))
        return new

    def forward(
        self, idx: torch.Tensor, targets: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Logits ``[B, T, V]`` of ``idx [B, T]`` and the mean loss on ``targets`` (or None)."""
        if self.hf:
            logits = self.model(input_ids=idx, use_cache=False).logits
        else:
            logits = self.model(idx)[0]
        return logits, lm_loss(logits, idx, targets)


def freeze_to_buffers(model: nn.Module) -> list[str]:
    """Turn every parameter that needs no gradient into a buffer of its module.

    The worker matrix then holds (and the exchange sends) only the trainable parameters.
    A tied frozen weight becomes one tensor under both names. Returns the buffers' names.
    """
    tensors: dict[int, torch.Tensor] = {}
    names = []
    for prefix, module in model.named_modules(remove_duplicate=False):
        for name, param in list(module._parameters.items()):
            if param is not None and not param.requires_grad:
                del module._parameters[name]
                module.register_buffer(name, tensors.setdefault(id(param), param.detach()))
                names.append(f"{prefix}.{name}" if prefix else name)
    return names


def detach(model: nn.Module) -> nn.Module:
    """Give every parameter its own storage (the trainer left them views of one matrix)."""
    for param in model.parameters():
        param.data = param.data.clone()
    return model


@contextlib.contextmanager
def quiet_transformers() -> Iterator[Any]:
    """Import transformers with its warnings and progress bars off, restored after."""
    try:
        import transformers
    except ImportError:
        raise ConfigError("finetune", _INSTALL) from None
    logging = transformers.utils.logging
    verbosity, bars = logging.get_verbosity(), logging.is_progress_bar_enabled()
    logging.set_verbosity_error()
    logging.disable_progress_bar()
    try:
        yield transformers
    finally:
        logging.set_verbosity(verbosity)
        if bars:
            logging.enable_progress_bar()


def apply_lora(model: nn.Module, opts: LoraOptions, seed: int, default: list[str] | None) -> Any:
    """``peft.get_peft_model`` with ``opts`` (``default`` target modules when unset)."""
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError:
        raise ConfigError("finetune.lora=true", _INSTALL) from None
    targets = opts.target_modules or default
    config = LoraConfig(
        r=opts.r, lora_alpha=opts.alpha, lora_dropout=opts.dropout, target_modules=targets
    )
    torch.manual_seed(seed)  # the adapters' init
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # fan_in_fan_out set for GPT-2's Conv1D, ...
        try:
            peft_model = get_peft_model(model, config)
        except ValueError as err:
            key = "lora.target_modules" + (f"={targets}" if targets else "")
            raise ConfigError(key, str(err).splitlines()[0]) from None
    return peft_model


def open_source(path: str) -> HFSource | RunSource:
    """The model at ``model.path``, checked without loading its weights.

    Raises:
        ConfigError: ``model.path=...: ...`` when the folder is missing, is neither kind, or
            is not a causal LM that this can train.
    """
    key = f"model.path={path}"
    folder = Path(path).expanduser()
    hint = "point it at a Hugging Face causal LM folder or a python -m diloco.train run dir"
    if not folder.exists():
        raise ConfigError(key, f"does not exist; {hint}")
    if not folder.is_dir():
        raise ConfigError(key, f"not a folder; {hint}")
    if (folder / "config.json").is_file():
        ours = _json(folder / "config.json").get("model", {})
        if (folder / "model.safetensors").is_file() and "_target_" in ours:
            raise ConfigError(
                key,
                "a model that diloco.finetune saved from a diloco.train run: load it with "
                "diloco.finetune.models.load_saved; to fine-tune further, pass that run's dir",
            )
        return HFSource(folder, key)
    if (folder / ".hydra" / "config.yaml").is_file():
        return RunSource(folder, key)
    raise ConfigError(
        key,
        "no config.json (not a Hugging Face model folder) and no .hydra/config.yaml "
        "(not a python -m diloco.train run dir)",
    )


class HFSource:
    """A Hugging Face causal LM folder: its config, tokenizer and weight files are checked."""

    kind = "huggingface"

    def __init__(self, folder: Path, key: str) -> None:
        self.folder, self.key = folder, key
        with quiet_transformers() as tf:
            from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

            try:
                config = tf.AutoConfig.from_pretrained(folder, local_files_only=True)
            except Exception as err:  # any reason it is not a model config
                raise ConfigError(
                    key, f"config.json is not a model config: {_first(err)}"
                ) from None
            kind = config.model_type
            if kind not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
                raise ConfigError(
                    key, f"model_type {kind!r} is not a causal LM (AutoModelForCausalLM has none)"
                )
            causal = set(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values())
            archs = list(config.architectures or [])
            if archs and not any(a in causal or a.endswith(_CAUSAL) for a in archs):
                raise ConfigError(
                    key,
                    f"architectures {archs} are not causal LMs (...ForCausalLM, ...LMHeadModel)",
                )
            if not any((folder / name).is_file() for name in _WEIGHTS):
                raise ConfigError(key, f"no weights ({', '.join(_WEIGHTS[::2])})")
            try:
                self.hf_tokenizer = tf.AutoTokenizer.from_pretrained(folder, local_files_only=True)
            except Exception as err:  # no or a broken tokenizer
                raise ConfigError(key, f"no tokenizer loads from it: {_first(err)}") from None
        tok = self.hf_tokenizer
        if tok.eos_token_id is None:
            raise ConfigError(key, "its tokenizer has no eos token (appended to every text)")
        self.vocab_size = int(getattr(config, "vocab_size", None) or len(tok))
        if len(tok) > self.vocab_size:
            raise ConfigError(
                key, f"its tokenizer has {len(tok)} tokens, the model's embedding {self.vocab_size}"
            )
        self.positions: int | None = next(
            (int(v) for v in (getattr(config, a, None) for a in _POSITIONS) if isinstance(v, int)),
            None,
        )
        self.tokenizer = HFTokenizer(tok, self.vocab_size)
        bos = tok.bos_token_id
        self.prefix = [bos] if bos is not None and getattr(tok, "add_bos_token", False) else []
        self.pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id

    def load(self, lora: LoraOptions | None, seed: int, device: torch.device) -> nn.Module:
        """The model in fp32 on ``device``, as :class:`CausalLM` (LoRA adapters when asked)."""
        with quiet_transformers() as tf:
            try:
                model = tf.AutoModelForCausalLM.from_pretrained(
                    self.folder, local_files_only=True, dtype=torch.float32
                )
            except Exception as err:  # weights that do not load
                raise ConfigError(self.key, f"cannot load the model: {_first(err)}") from None
        model.to(device)  # before LoRA: the frozen weights stay one tensor where tied
        if lora is None:
            return CausalLM(model)
        return CausalLM(apply_lora(model, lora, seed, None), freeze=True)

    def save(self, model: nn.Module, run_dir: Path, lora: bool) -> Path:
        """``model/`` (``save_pretrained``, safetensors) or ``adapter/`` (peft), + tokenizer."""
        assert isinstance(model, CausalLM)
        out = run_dir / ("adapter" if lora else "model")
        with quiet_transformers():
            detach(model)
            model.model.save_pretrained(out)
            self.hf_tokenizer.save_pretrained(out)
        return out


class RunSource:
    """A ``python -m diloco.train`` run dir: its config and the checkpoint of its global model."""

    kind = "diloco"

    def __init__(self, folder: Path, key: str) -> None:
        self.folder, self.key = folder, key
        node = OmegaConf.to_container(
            OmegaConf.load(folder / ".hydra" / "config.yaml"), resolve=True
        )
        try:
            self.cfg: Config = parse(node)  # type: ignore[arg-type]
        except ConfigError as err:
            raise ConfigError(key, f".hydra/config.yaml: {err}") from None
        found = [folder / checkpoint.FILENAME, checkpoint.path_for(folder, 0, 2)]
        self.checkpoint = next((p for p in found if p.is_file()), None)
        if self.cfg.workers.ranks_per_worker > 1:
            raise ConfigError(key, "a run whose workers span ranks (islands) is not supported")
        if self.checkpoint is None:
            raise ConfigError(
                key, f"a diloco.train run dir without {checkpoint.FILENAME} (checkpoint.every>0)"
            )
        self.positions: int | None = self.cfg.data.seq_len
        self.prefix: list[int] = []

    @functools.cached_property
    def _tokens(self) -> tuple[DocTokenizer, int]:
        """The run's tokenizer and vocabulary, from its own corpus (loaded once, not kept)."""
        try:
            corpus = load_corpus(self.cfg.data)
        except DataError as err:
            raise DataError(f"{self.key}: its run's data (for the tokenizer): {err}") from None
        return cast(DocTokenizer, corpus.tokenizer), corpus.vocab_size

    @property
    def tokenizer(self) -> DocTokenizer:
        """The run's data tokenizer (bytes or its BPE)."""
        return self._tokens[0]

    @property
    def vocab_size(self) -> int:
        """The model's vocabulary (the run's)."""
        return self._tokens[1]

    @property
    def pad(self) -> int:
        """The id padding examples (never a target): the run's document separator."""
        return self.tokenizer.separator[0]

    def model_node(self) -> dict[str, Any]:
        """The run's model config with its vocabulary and sequence length filled in."""
        return {
            **self.cfg.model,
            "vocab_size": self.vocab_size,
            "block_size": self.cfg.data.seq_len,
        }

    def load(self, lora: LoraOptions | None, seed: int, device: torch.device) -> nn.Module:
        """The run's model with its checkpoint's global weights (LoRA adapters when asked)."""
        model = build(self.model_node(), "model")
        assert self.checkpoint is not None
        flat = checkpoint.load(self.checkpoint)["group"]["global"]
        params = list(model.parameters())
        if flat.numel() != sum(p.numel() for p in params):
            raise ConfigError(
                self.key,
                f"{self.checkpoint.name} holds {flat.numel()} parameters, the run's model has "
                f"{sum(p.numel() for p in params)}",
            )
        torch.nn.utils.vector_to_parameters(flat.float(), params)
        model.to(device)
        if lora is None:
            return model
        default = ["qkv"] if isinstance(model, GPT) else None
        return CausalLM(apply_lora(model, lora, seed, default), hf=False, freeze=True)

    def save(self, model: nn.Module, run_dir: Path, lora: bool) -> Path:
        """``model/model.safetensors`` and ``model/config.json``, or the peft ``adapter/``."""
        from safetensors.torch import save_model

        detach(model)
        if lora:
            assert isinstance(model, CausalLM)
            out = run_dir / "adapter"
            model.model.save_pretrained(out)
            return out
        out = run_dir / "model"
        out.mkdir(parents=True, exist_ok=True)
        save_model(model, str(out / "model.safetensors"))  # a tied weight once
        meta = {"model": self.model_node(), "data": asdict(self.cfg.data), "base": str(self.folder)}
        (out / "config.json").write_text(json.dumps(meta, indent=2) + "\n")
        return out


def load_saved(folder: str | Path) -> nn.Module:
    """A model that fine-tuning saved from a diloco.train run (``model/``), ready to use."""
    from safetensors.torch import load_model

    folder = Path(folder)
    meta = json.loads((folder / "config.json").read_text())
    model = build(meta["model"], "model")
    load_model(model, str(folder / "model.safetensors"))
    return model


class HFTokenizer:
    """A Hugging Face tokenizer as :func:`diloco.data.tokenize_docs` uses one (eos after a text)."""

    def __init__(self, tok: Any, vocab_size: int) -> None:
        self._tok: Any = tok
        self.vocab_size = vocab_size
        self.separator: list[int] = [tok.eos_token_id]

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text``, no special tokens."""
        return list(self._tok(text, add_special_tokens=False)["input_ids"])

    def decode(self, ids: Any) -> str:
        """Text of token ids."""
        return str(self._tok.decode([int(i) for i in ids]))

    def encode_docs(self, docs: Any) -> Iterator[Any]:
        """Token ids of each document (no special tokens), as int64 arrays."""
        import numpy as np

        if not docs:
            return iter(())
        ids = self._tok(list(docs), add_special_tokens=False)["input_ids"]
        return (np.asarray(i, dtype=np.int64) for i in ids)


_CAUSAL = ("ForCausalLM", "LMHeadModel")


def _json(path: Path) -> dict[str, Any]:
    """A JSON object from ``path`` ({} when it is not one)."""
    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return value if isinstance(value, dict) else {}


def _first(err: BaseException) -> str:
    lines = [line for line in str(err).splitlines() if line.strip()]
    return f"{type(err).__name__}: {lines[0] if lines else ''}".rstrip(": ")
