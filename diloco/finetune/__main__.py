"""``python -m diloco.finetune [overrides]``: compose ``conf/finetune.yaml``, fine-tune, save.

A bad config value, a model folder that is missing or not a causal LM, or data that is
missing or lacks the named fields exits with status 2 and one line naming the key.
"""

from __future__ import annotations

from pathlib import Path

import hydra
from omegaconf import DictConfig

from diloco.comm.torchdist import CommError
from diloco.compose import CONF_DIR, one_line, run_cli
from diloco.config import ConfigError
from diloco.data import DataError

CONFIG_NAME = "finetune"


@hydra.main(config_path=str(CONF_DIR), config_name=CONFIG_NAME, version_base="1.3")
def _hydra_main(node: DictConfig) -> float:
    from hydra.core.hydra_config import HydraConfig

    from diloco.finetune.run import run

    hydra_cfg = HydraConfig.get()
    run_dir = Path(hydra_cfg.runtime.output_dir)
    errors = {ConfigError: 2, DataError: 2, CommError: 1}
    out = one_line(lambda: run(node, run_dir, list(hydra_cfg.overrides.task)), errors)
    return float(out["final_eval_loss"])


def main() -> None:
    """Console entry point."""
    run_cli(_hydra_main, CONFIG_NAME)


if __name__ == "__main__":
    main()
