"""Shared test fixtures: compose configs from conf/ and build small corpora."""

from __future__ import annotations

from pathlib import Path

import torch
from omegaconf import OmegaConf

from diloco.compose import compose
from diloco.config import Config, parse
from diloco.data import ByteTokenizer, Corpus

REPO = Path(__file__).resolve().parent.parent
CONF_DIR = REPO / "conf"


def make_config(*overrides: str) -> Config:
    """Compose conf/ with overrides (as the CLI would) and validate it."""
    node = compose(list(overrides))
    return parse(OmegaConf.to_container(node, resolve=True))  # type: ignore[arg-type]


def synthetic_corpus(seq_len: int = 16, n_train: int = 256, n_eval: int = 16) -> Corpus:
    """A learnable byte corpus: sequences of a repeating pattern with random offsets."""
    g = torch.Generator().manual_seed(1234)
    period = 7
    offsets = torch.randint(0, period, (n_train + n_eval, 1), generator=g)
    pos = torch.arange(seq_len + 1)[None]
    data = (97 + (pos + offsets) % period).long()
    noise = torch.rand(data.shape, generator=g) < 0.1
    data = torch.where(noise, torch.randint(97, 123, data.shape, generator=g), data)
    return Corpus(
        train=data[:n_train],
        eval=data[n_train:],
        vocab_size=256,
        train_docs=torch.arange(n_train) // 32,
        tokenizer=ByteTokenizer(),
    )


# what every run a test starts gets: no W&B, no HF hub
OFFLINE = {"WANDB_MODE": "disabled", "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"}


def text_run(corpus: Path, run_dir: Path, *extra: str) -> list[str]:
    """CLI overrides for a 1-layer GPT on a text-file corpus, quiet, in ``run_dir``.

    ``extra`` sets the sizes (``data.seq_len``, ``model.n_embd``, ``train.batch_size``, ...).
    """
    return [
        f"data.path={corpus}",
        f"data.cache_dir={corpus.parent / 'cache'}",
        "model.n_layer=1",
        "model.n_head=2",
        "train.eval_sequences=8",
        "logger.mode=disabled",
        "logger.progress=false",
        f"hydra.run.dir={run_dir}",
        *extra,
    ]


TINY = (
    "model=mlp",
    "data.seq_len=16",
    "train.batch_size=4",
    "train.eval_sequences=8",
    "train.warmup_steps=2",
    "logger.mode=disabled",
    "logger.progress=false",
)


def free_port() -> int:
    """A TCP port that was free a moment ago (bind to port 0, read it, close)."""
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def node(group: str, name: str, **kwargs: object) -> dict:
    """The ``_target_`` of ``conf/<group>/<name>.yaml`` with ``kwargs``: a plug-in config node."""
    import yaml

    path = CONF_DIR / group / f"{name}.yaml"
    target = yaml.safe_load(path.read_text())["_target_"]
    return {"_target_": target, **kwargs}


def plugin(group: str, name: str, **kwargs: object):
    """Build option ``name`` of config group ``group`` (as conf/ names it) with ``kwargs``."""
    from diloco.config import build

    return build(node(group, name, **kwargs), group)


def count_rounds(trainer) -> list[int]:
    """Spy on ``trainer``'s rounds: the list grows by the round number of each one it runs."""
    seen: list[int] = []
    round_ = trainer._round

    def spy(plan, logger):
        seen.append(trainer.round)
        return round_(plan, logger)

    trainer._round = spy
    return seen
