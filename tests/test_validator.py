"""The Gauntlet-style validator ranks and excludes bad contributions."""

from __future__ import annotations

import pytest

from diloco.config import ConfigError
from diloco.trainer import Trainer
from tests.helpers import TINY, make_config, synthetic_corpus

COMMON = (*TINY, "workers.count=5", "algorithm.inner_steps=5", "train.steps=30",
          "validator=gauntlet", "attack.num_byzantine=1")  # fmt: skip


def run(tmp_path, *overrides):
    trainer = Trainer.from_config(make_config(*COMMON, *overrides), tmp_path, synthetic_corpus())
    return trainer, trainer.fit()


def test_sign_flipper_is_ranked_last_and_excluded(tmp_path):
    trainer, summary = run(tmp_path, "attack=sign_flip")
    scores = trainer.exchange.validator.scores
    assert int(scores.argmin()) == 4  # the Byzantine worker (the last one)
    assert summary["detect_recall"] == 1.0 and summary["detect_precision"] == 1.0


@pytest.mark.parametrize("attack", ["free_rider", "poison"])
def test_free_rider_and_poison_are_detected(tmp_path, attack):
    extra = ("attack.mode=random",) if attack == "poison" else ()
    trainer, summary = run(tmp_path, f"attack={attack}", *extra)
    assert summary["detect_recall"] == 1.0
    assert trainer.exchange.validator.last["byzantine_weight"] == 0.0


def test_validator_needs_full_pseudo_gradients(tmp_path):
    with pytest.raises(ConfigError, match="validator=gauntlet"):
        Trainer.from_config(make_config(*TINY, "algorithm=ddp", "validator=gauntlet"), tmp_path,
                synthetic_corpus())  # fmt: skip
