"""Compose ``conf/`` as the command line does, checking the overrides first.

Hydra reports a misspelt key in six lines and exits with status 1; :func:`check_overrides`
turns it (and an unknown group option) into a one-line :class:`~diloco.config.ConfigError`
with the closest valid key, before anything is built::

    train.stepz=10: unknown key; did you mean train.steps?
    algoritm=ddp: unknown key; did you mean algorithm?
    algorithm=foo: unknown; allowed: ddp, demo, diloco, fedavg, ...

:func:`compose` is the in-process path (:mod:`diloco.api`, the claims suite): the same checks,
then Hydra's compose API, returning the config without its ``hydra`` node.
"""

from __future__ import annotations

import difflib
import sys
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from hydra import compose as hydra_compose
from hydra import initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import Glob, Override
from hydra.errors import HydraException
from hydra.types import RunMode
from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from diloco.config import ConfigError

CONF_DIR = Path(__file__).resolve().parent.parent / "conf"
_SAFE_FLAGS = ("-m", "--multirun")  # other Hydra flags (-cn, --cfg, --info...): Hydra checks


def group_options(group: str, conf_dir: Path = CONF_DIR) -> list[str]:
    """The options of config group ``group`` (``experiment`` -> ``debug``, ``claims/base``...)."""
    root = conf_dir / group
    return sorted(p.relative_to(root).with_suffix("").as_posix() for p in root.rglob("*.yaml"))


def _is_group(key: str, conf_dir: Path) -> bool:
    return bool(key) and (conf_dir / key.replace(".", "/")).is_dir()


def _is_hydra(key: str) -> bool:
    return key == "hydra" or key.startswith(("hydra.", "hydra/"))


def _choices(override: Override, options: list[str]) -> list[str] | None:
    """The options a group override picks (a sweep: each), None when Hydra must expand it."""
    value = override.value()
    if isinstance(value, Glob):
        return value.filter(options)
    if not override.is_sweep_override():
        return ["null" if value is None else str(value)]
    try:
        return [str(v) for v in override.sweep_string_iterator()]
    except HydraException:  # range(), interval()...: left to Hydra
        return None


def _parse(args: Sequence[str]) -> list[Override]:
    """Parse each argument alone, so that a syntax error names it."""
    parser, out = OverridesParser.create(), []
    for arg in args:
        try:
            out += parser.parse_overrides([arg])
        except HydraException as err:
            lines = [line for line in str(err).splitlines() if line.strip()]
            raise ConfigError(arg, lines[0] if lines else type(err).__name__) from None
    return out


def _keys(node: Any, prefix: str = "") -> Iterator[str]:
    """Every dotted key of ``node``: inner nodes and leaves (list items are not named)."""
    if isinstance(node, DictConfig):
        for key in node:
            dotted = f"{prefix}{key!s}"
            yield dotted
            yield from _keys(node._get_node(key), dotted + ".")
    elif isinstance(node, ListConfig):
        return


def _compose(overrides: Sequence[str], config_name: str, conf_dir: Path) -> DictConfig:
    """Hydra's compose (with the ``hydra`` node), the global state set and cleared here."""
    GlobalHydra.instance().clear()  # a notebook or a test may hold one
    try:
        with initialize_config_dir(str(conf_dir), version_base="1.3"):
            return hydra_compose(config_name, overrides=list(overrides), return_hydra_config=True)
    except (HydraException, OmegaConfBaseException, ValueError) as err:
        lines = [line for line in str(err).splitlines() if line.strip()]
        raise ConfigError("overrides", lines[0] if lines else type(err).__name__) from None


def check_overrides(
    args: Sequence[str], config_name: str = "config", conf_dir: Path = CONF_DIR
) -> None:
    """Raise a one-line ConfigError for an unknown group option or a misspelt key.

    ``args`` are command-line arguments; ``-m`` is allowed, and any other flag (``--cfg``,
    ``-cn``...) leaves the checks to Hydra. Keys are looked up in the config composed with
    the chosen group options; a swept group composes once per option, and a key must exist
    under each (``-m algorithm=ddp,diloco algorithm.inner_steps=3`` fails: DDP has no
    ``inner_steps``).
    """
    if any(a.startswith("-") and a not in _SAFE_FLAGS for a in args):
        return
    parsed = _parse([a for a in args if a not in _SAFE_FLAGS])
    groups: list[tuple[Override, list[str]]] = []
    for o in parsed:
        key = o.key_or_group
        if _is_hydra(key) or not _is_group(key, conf_dir) or o.is_delete():
            continue
        options = group_options(key.replace(".", "/"), conf_dir)
        choices = _choices(o, options)
        if choices is None:
            return
        for choice in choices:
            if choice == "null":
                raise ConfigError(f"{key}=null", f"a group takes an option; ~{key} drops it")
            if choice not in options:
                raise ConfigError(f"{key}={choice}", f"unknown; allowed: {', '.join(options)}")
        if not choices:
            raise ConfigError(o.input_line or key, f"matches no option of {', '.join(options)}")
        groups.append((o, choices))
    leaves = [
        o
        for o in parsed
        if not _is_hydra(o.key_or_group)
        and not _is_group(o.key_or_group, conf_dir)
        and not (o.is_add() or o.is_force_add())
        and not any(part.isdigit() for part in o.key_or_group.split("."))
    ]
    if not leaves:
        return
    first = [f"{o.get_key_element()}={c[0]}" for o, c in groups]
    swept = ", ".join(f"{o.key_or_group}={c[0]}" for o, c in groups if len(c) > 1)
    variants = [(first, swept)] + [
        (first[:i] + [f"{o.get_key_element()}={c}"] + first[i + 1 :], f"{o.key_or_group}={c}")
        for i, (o, choices) in enumerate(groups)
        for c in choices[1:]
    ]
    for variant, label in variants:  # each variant is one of the jobs that will run
        known = {"hydra", *_keys(_compose(variant, config_name, conf_dir))}
        for o in leaves:
            if o.key_or_group not in known:
                where = f" with {label}" if label else ""
                raise ConfigError(
                    o.input_line or o.key_or_group,
                    f"unknown key{where}; {_hint(o.key_or_group, known)}",
                )


def _hint(key: str, known: set[str]) -> str:
    """``did you mean train.steps?`` (closest sibling, the parent mended first), else the list."""
    parent, _, name = key.rpartition(".")
    if parent and parent not in known:
        mended = _hint(parent, known)
        if mended.startswith("did you mean "):
            parent = mended.removeprefix("did you mean ").rstrip("?")
            if f"{parent}.{name}" in known:
                return f"did you mean {parent}.{name}?"
        else:
            return mended
    depth = parent.count(".") + 1 if parent else 0
    siblings = sorted(
        k.rpartition(".")[2]
        for k in known
        if k.count(".") == depth and (k.startswith(parent + ".") or not parent)
    )
    close = difflib.get_close_matches(name, siblings, n=1, cutoff=0.6)
    if close:
        return f"did you mean {parent + '.' if parent else ''}{close[0]}?"
    if not siblings:
        return "no such key"
    where = f"under {parent}" if parent else "at the top"
    return f"known {where}: {', '.join(siblings)} (a new key is added with +{key}=...)"


def compose(
    overrides: Sequence[str] = (),
    config_name: str = "config",
    conf_dir: Path = CONF_DIR,
    single_run: bool = False,
) -> DictConfig:
    """The config the CLI would run with ``overrides``, without its ``hydra`` node.

    Hydra composes first; only when it fails does :func:`check_overrides` look for the
    one-line message (so a valid config costs one composition). ``single_run`` refuses an
    experiment that is a sweep (``hydra.mode: MULTIRUN``), whose sweeper would be ignored.
    """
    try:
        node = _compose(overrides, config_name, conf_dir)
    except ConfigError:
        check_overrides(overrides, config_name, conf_dir)  # raises the clearer message if any
        raise
    if single_run and OmegaConf.select(node, "hydra.mode") == RunMode.MULTIRUN:
        raise ConfigError(
            f"experiment={node.get('experiment')}",
            "is a sweep (hydra.mode=MULTIRUN): run it with python -m diloco.train, or pass "
            "its grid to api.sweep",
        )
    OmegaConf.set_struct(node, False)
    node.pop("hydra", None)
    return node


def one_line(call: Callable[[], Any], errors: dict[type[Exception], int]) -> Any:
    """``call()``; an error of a kind in ``errors``: one ``error:`` line, exit with its status."""
    try:
        return call()
    except tuple(errors) as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(next(code for kind, code in errors.items() if isinstance(err, kind)))


def run_cli(hydra_main: Callable[[], Any], config_name: str = "config") -> None:
    """Check the command line's overrides (one-line error, exit 2), then run the Hydra app."""
    one_line(lambda: check_overrides(sys.argv[1:], config_name), {ConfigError: 2})
    hydra_main()
