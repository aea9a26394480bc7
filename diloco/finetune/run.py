"""One fine-tuning run: check everything cheap, load, train with the usual Trainer, save.

The order keeps every one-line error (a bad key, a model folder that is missing or not a
causal LM, data that is missing or lacks a field) before the weights load. Training is
:func:`diloco.train.execute` around :func:`diloco.build.build_parts` with the loaded model,
so every algorithm, worker count, codec and logger of ``diloco.train`` applies; the held-out
loss is measured before the first step and after the last, and ``summary.json`` gets
``eval_loss_before`` and the saved paths next to the trainer's summary.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from diloco.build import build_parts
from diloco.comm.base import Communicator
from diloco.config import ConfigError
from diloco.finetune.config import FinetuneConfig, split
from diloco.finetune.data import build_corpus, read
from diloco.finetune.models import HFSource, RunSource, open_source
from diloco.train import execute
from diloco.trainer import Trainer

log = logging.getLogger("diloco")


def prepare(resolved: dict[str, Any]) -> tuple[FinetuneConfig, HFSource | RunSource, Any]:
    """The config, the model source and the corpus: every check, no weights loaded.

    Raises:
        ConfigError: a bad key, a model folder that is missing or not a causal LM, a
            ``data.seq_len`` beyond the model's positions.
        DataError: data that is missing or lacks the named fields.
    """
    ft = split(resolved)
    source = open_source(ft.model_path)
    seq_len = ft.run.data.seq_len
    if source.positions is not None and seq_len > source.positions:
        raise ConfigError(
            f"data.seq_len={seq_len}",
            f"longer than the {source.positions} positions of model.path={ft.model_path}",
        )
    data = read(ft.run.data, ft.fields)
    corpus = build_corpus(
        data, ft.run.data, source.tokenizer, source.vocab_size, source.prefix, source.pad
    )
    return ft, source, corpus


def run(node: DictConfig, run_dir: Path, overrides: list[str] | None = None) -> dict[str, Any]:
    """Fine-tune as ``node`` (a composed ``conf/finetune.yaml``) says, into ``run_dir``.

    Returns the summary also written to ``summary.json``: the trainer's, plus
    ``eval_loss_before``, ``final_eval_loss`` and ``saved`` (the model or adapter folder).
    """
    resolved: dict[str, Any] = OmegaConf.to_container(node, resolve=True)  # type: ignore[assignment]
    ft, source, corpus = prepare(resolved)
    held: dict[str, Any] = {}

    def start(comm: Communicator, device: torch.device, run_dir: Path) -> tuple[Trainer, bool]:
        model = source.load(ft.lora, ft.run.seed, device)
        trainer = Trainer(build_parts(ft.run, comm, device, corpus, model), run_dir)
        held.update(trainer=trainer, before=trainer.evaluate())
        return trainer, ft.run.resume and trainer.maybe_resume()

    summary = execute(resolved, ft.run, run_dir, list(overrides or []), start)
    trainer: Trainer = held["trainer"]
    if not trainer.is_main:
        return summary
    out = Path(summary["run_dir"])
    saved = source.save(trainer.group.global_model, out, ft.lora is not None)
    summary.update(
        eval_loss_before=held["before"],
        model_path=str(source.folder),
        model_kind=source.kind,
        data_path=ft.run.data.path,
        lora=ft.lora is not None,
        train_sequences=len(corpus.train),
        eval_sequences=min(len(corpus.eval), ft.run.train.eval_sequences),
        saved=str(saved),
    )
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    log.info(report(summary))
    return summary


def report(summary: dict[str, Any]) -> str:
    """The one-line before/after report of a finished fine-tuning run."""
    how = "LoRA" if summary["lora"] else "full"
    return (
        f"fine-tuned ({how}, {summary['algorithm']} x {summary['workers']}, "
        f"{summary['steps']} steps): held-out loss {summary['eval_loss_before']:.4f} -> "
        f"{summary['final_eval_loss']:.4f}; saved {summary['saved']}"
    )
