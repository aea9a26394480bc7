"""Structured configs and validation.

Hydra composes ``conf/`` into a plain ``DictConfig``; :func:`parse` turns it into typed
dataclasses and checks every value. A bad value raises :class:`ConfigError` whose message is
one line naming the key and what is allowed, e.g.
``workers.count=-2: must be >= 1``. Range checks are declared next to each field as
``metadata={"ge": 1}`` so the schema reads as one screen per part.

Parts that are plug-ins (model, inner optimizer, algorithm) keep a ``_target_`` naming the class
to build; their own arguments are validated by the class (a ``Config`` dataclass on algorithms,
the constructor for models and ``torch.optim`` optimizers).
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import inspect
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal, TypeVar, Union, get_args, get_origin

import torch

T = TypeVar("T")


class ConfigError(ValueError):
    """A config value is wrong; ``str(err)`` is one line naming the key."""

    def __init__(self, key: str, message: str) -> None:
        self.key, self.message = key, message
        super().__init__(f"{key}: {message}")

    def __reduce__(self) -> tuple[Any, tuple[str, str]]:
        return type(self), (self.key, self.message)  # crosses a process pool intact


def _ge(v: float) -> dict[str, float]:
    return {"ge": v}


@dataclass
class TrainConfig:
    """The run's length, batch and schedule. ``steps`` counts inner steps per worker."""

    steps: int = field(default=600, metadata=_ge(1))
    batch_size: int = field(default=8, metadata=_ge(1))
    eval_every: int = field(default=100, metadata=_ge(1))
    eval_sequences: int = field(default=128, metadata=_ge(1))
    log_every: int = field(default=10, metadata=_ge(1))
    warmup_steps: int = field(default=50, metadata=_ge(0))
    lr_schedule: Literal["constant", "cosine"] = "cosine"
    min_lr_ratio: float = field(default=0.1, metadata={"ge": 0.0, "le": 1.0})
    grad_clip: float = field(default=1.0, metadata=_ge(0.0))


@dataclass
class WorkersConfig:
    """How many workers train and how fast each one is (see :mod:`diloco.profiles`)."""

    count: int = field(default=4, metadata=_ge(1))
    step_time_s: float | None = field(default=None, metadata={"gt": 0.0})
    profile: Literal["homogeneous", "straggler", "longtail"] = "homogeneous"
    straggler_slowdown: float = field(default=4.0, metadata={"ge": 1.0})
    sigma: float = field(default=0.5, metadata=_ge(0.0))
    speeds: list[float] | None = field(default=None, metadata={"gt": 0.0})
    bandwidth_factors: list[float] | None = field(default=None, metadata={"gt": 0.0})
    execution: Literal["auto", "loop", "batched"] = "auto"
    precision: Literal["fp32", "bf16"] = "fp32"
    compile: bool = False
    threads: int | None = field(default=None, metadata=_ge(1))
    ranks_per_worker: int = field(default=1, metadata=_ge(1))  # R > 1: islands (torchdist)


@dataclass
class IslandConfig:
    """Inside a worker that spans ``workers.ranks_per_worker`` ranks (:mod:`diloco.islands`).

    ``engine`` runs the island's inner steps: torch DDP, FSDP2 (``fully_shard``), or DeepSpeed
    ZeRO from the JSON file ``deepspeed_config`` (a path, or a name under ``conf/island/``).
    """

    engine: Literal["ddp", "fsdp", "deepspeed"] = "ddp"
    deepspeed_config: str | None = None


@dataclass
class FaultEvent:
    """One scheduled fault (see :mod:`diloco.faults`)."""

    worker: int = field(default=0, metadata=_ge(0))
    round: int = field(default=0, metadata=_ge(0))
    kind: Literal["crash", "leave", "rejoin", "delay"] = "crash"


@dataclass
class FaultsConfig:
    """Scheduled fault events and a random departure rate (see :mod:`diloco.faults`)."""

    events: list[FaultEvent] = field(default_factory=list)
    rate: float = field(default=0.0, metadata={"ge": 0.0, "le": 1.0})
    rejoin_after: int = field(default=2, metadata=_ge(1))
    delay_factor: float = field(default=4.0, metadata={"ge": 1.0})


@dataclass
class DataConfig:
    """Where text comes from, how it is tokenized, packed, held out and sharded."""

    path: str | None = None
    name: str | None = None
    split: str = "train"
    text_field: str = "text"
    tokenizer: Literal["byte", "bpe"] = "byte"
    vocab_size: int = field(default=2048, metadata=_ge(257))
    seq_len: int = field(default=128, metadata=_ge(2))
    eval_fraction: float = field(default=0.02, metadata={"gt": 0.0, "lt": 1.0})
    shard: Literal["iid", "contiguous", "dirichlet"] = "iid"
    dirichlet_alpha: float = field(default=0.5, metadata={"gt": 0.0})
    cache_dir: str = "~/.cache/diloco"


@dataclass
class CheckpointConfig:
    """Checkpoint cadence in rounds (0 turns periodic checkpoints off)."""

    every: int = field(default=0, metadata=_ge(0))


@dataclass
class LoggerConfig:
    """W&B and console settings: ``mode`` null follows ``$WANDB_MODE``, else offline."""

    mode: Literal["offline", "online", "disabled"] | None = None  # None: $WANDB_MODE
    project: str = "diloco"
    entity: str | None = None
    group: str | None = None
    name: str | None = None
    tags: list[str] = field(default_factory=list)
    progress: bool = True


@dataclass
class Config:
    """A whole run. Plug-in nodes stay dicts with ``_target_`` (see :data:`PLUGINS`)."""

    seed: int = field(default=0, metadata=_ge(0))
    resume: bool = False
    device: str = "cpu"
    train: TrainConfig = field(default_factory=TrainConfig)
    workers: WorkersConfig = field(default_factory=WorkersConfig)
    island: IslandConfig = field(default_factory=IslandConfig)
    faults: FaultsConfig = field(default_factory=FaultsConfig)
    data: DataConfig = field(default_factory=DataConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    # plug-ins: ``_target_`` nodes, validated against the target's ``Config`` by :func:`parse`
    # (defaults live in conf/, one file per option)
    model: dict[str, Any] = field(default_factory=dict)
    optimizer: dict[str, Any] = field(default_factory=dict)
    algorithm: dict[str, Any] = field(default_factory=dict)
    codec: dict[str, Any] = field(default_factory=dict)
    aggregator: dict[str, Any] = field(default_factory=dict)
    attack: dict[str, Any] = field(default_factory=dict)
    validator: dict[str, Any] | None = None
    sync: dict[str, Any] = field(default_factory=dict)
    comm: dict[str, Any] = field(default_factory=dict)
    experiment: str | None = None


def _type_name(tp: Any) -> str:
    if get_origin(tp) is Literal:
        return "one of " + ", ".join(repr(a) for a in get_args(tp))
    return getattr(tp, "__name__", str(tp))


def _convert(value: Any, tp: Any, key: str) -> Any:
    """Convert ``value`` to type ``tp`` or raise a one-line ConfigError naming ``key``."""
    origin = get_origin(tp)
    if origin in (Union, types.UnionType):
        args = get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _convert(value, arg, key)
            except ConfigError as err:
                errors.append(str(err))
        raise ConfigError(key, f"got {value!r}; expected {' or '.join(map(_type_name, args))}")
    if origin is Literal:
        if isinstance(value, float) and str(value) in get_args(tp):
            value = str(value)  # YAML and Hydra read the words nan and inf as floats
        if value not in get_args(tp):
            raise ConfigError(key, f"got {value!r}; allowed: {', '.join(map(str, get_args(tp)))}")
        return value
    if origin in (list, tuple):
        if not isinstance(value, list | tuple):
            raise ConfigError(key, f"got {value!r}; expected a list")
        (inner, *_) = get_args(tp) or (Any,)
        return origin(_convert(v, inner, f"{key}[{i}]") for i, v in enumerate(value))
    if origin is dict or tp is Any:
        return value
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(key, f"got {value!r}; expected a mapping")
        return from_dict(tp, value, key)  # type: ignore[arg-type]
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(key, f"got {value!r}; expected true or false")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(key, f"got {value!r}; expected an integer")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(key, f"got {value!r}; expected a number")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(key, f"got {value!r}; expected a string")
        return value
    return value


_BOUNDS = {
    "ge": (lambda v, b: v >= b, ">="),
    "gt": (lambda v, b: v > b, ">"),
    "le": (lambda v, b: v <= b, "<="),
    "lt": (lambda v, b: v < b, "<"),
}


def from_dict(cls: type[T], node: dict[str, Any], prefix: str = "") -> T:
    """Build dataclass ``cls`` from a plain dict, checking keys, types and declared bounds."""
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    dotted = (prefix + ".") if prefix else ""
    unknown = sorted(set(node) - set(fields) - {"_target_", "_partial_"})
    if unknown:
        raise ConfigError(f"{dotted}{unknown[0]}", f"unknown key; known: {', '.join(fields)}")
    kwargs = {}
    for name, f in fields.items():
        if name not in node:
            continue
        key = f"{dotted}{name}"
        value = _convert(node[name], hints[name], key)
        for bound, (ok, sym) in _BOUNDS.items():
            items = value if isinstance(value, list | tuple) else [value]
            for item in items:
                if bound in f.metadata and item is not None and not ok(item, f.metadata[bound]):
                    raise ConfigError(f"{key}={value}", f"must be {sym} {f.metadata[bound]}")
        kwargs[name] = value
    return cls(**kwargs)


def configure(cls: type[T], cfg: T | None, kwargs: dict[str, Any], key: str) -> T:
    """Validate ``cfg`` (or build it from keyword arguments) against ``cls``'s declared bounds.

    Lets a plug-in be built from its config (``Krum(cfg)``) or by hand (``Krum(f=2)``).
    """
    if cfg is not None and kwargs:
        raise TypeError(f"{key}: pass a Config or keyword arguments, not both")
    if cfg is not None:
        kwargs = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg)}  # type: ignore[arg-type]
    return from_dict(cls, kwargs, key)


def import_target(node: dict[str, Any], key: str) -> Any:
    """Import the object named by ``node['_target_']``."""
    target = node.get("_target_")
    if not isinstance(target, str) or "." not in target:
        raise ConfigError(f"{key}._target_", f"got {target!r}; expected a dotted import path")
    module, _, name = target.rpartition(".")
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError):
        raise ConfigError(f"{key}._target_", f"cannot import {target!r}") from None


PLUGINS = (
    "model",
    "optimizer",
    "algorithm",
    "codec",
    "aggregator",
    "attack",
    "validator",
    "sync",
    "comm",
)
"""Config groups that choose an implementation: each node names its class with ``_target_``
and the class validates the node's other keys (a nested ``Config`` dataclass, or for models
and ``torch.optim`` optimizers the constructor). ``validator`` may be null (none)."""


def parse(node: dict[str, Any]) -> Config:
    """Validate a resolved config (a plain dict) into :class:`Config`.

    The inner optimizer is built once on a dummy parameter (:func:`build_optimizer`), so that
    its bad values fail here, before any data loads.
    """
    node = {k: v for k, v in node.items() if k != "hydra"}
    cfg = from_dict(Config, node)
    for key in PLUGINS:
        plugin = getattr(cfg, key)
        if plugin is None and key == "validator":
            continue
        if not plugin or "_target_" not in plugin:
            raise ConfigError(key, "missing; pick one from conf/" + key)
        target = import_target(plugin, key)
        config_cls = getattr(target, "Config", None)
        if isinstance(config_cls, type) and dataclasses.is_dataclass(config_cls):
            from_dict(config_cls, plugin, key)
        elif key == "optimizer":  # its arguments, then its values on a dummy parameter
            build_optimizer(plugin, key)
        elif isinstance(target, type):
            check_arguments(target, plugin, key)
    return cfg


def _kwargs(node: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in node.items() if not (k.startswith("_") and k.endswith("_"))}


def build_partial(node: dict[str, Any], key: str) -> Callable[..., Any]:
    """``functools.partial`` of the ``_target_`` class with the node's arguments."""
    return functools.partial(import_target(node, key), **_kwargs(node))


def build(node: dict[str, Any], key: str, *args: Any, **extra: Any) -> Any:
    """Instantiate ``_target_`` with the node's arguments plus ``extra``.

    A class with a nested ``Config`` dataclass (the algorithms) gets its arguments validated
    into that dataclass and is called as ``cls(config, *args)``; any other class is called
    as ``cls(*args, **node_args, **extra)``. Errors raised by the constructor become a
    one-line :class:`ConfigError` naming ``key``.
    """
    cls = import_target(node, key)
    config_cls = getattr(cls, "Config", None)
    try:
        if isinstance(config_cls, type) and dataclasses.is_dataclass(config_cls):
            return cls(from_dict(config_cls, node, key), *args, **extra)
        return cls(*args, **_kwargs(node), **extra)
    except ConfigError:
        raise
    except (TypeError, ValueError) as err:
        raise ConfigError(key, str(err).splitlines()[0]) from None


def check_arguments(target: Any, node: dict[str, Any], key: str) -> None:
    """Check a plug-in's arguments against its constructor, naming the full key.

    An argument the constructor does not take (when it has no ``**kwargs``) is unknown; one
    whose default is a number, a bool, a string or a tuple must be of that kind
    (``optimizer.lr=abc: got 'abc'; expected a number``). Values and relations between them
    are left to the constructor.
    """
    try:
        params = inspect.signature(target).parameters
    except (TypeError, ValueError):  # a builtin without a signature
        return
    open_ended = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    for name, value in _kwargs(node).items():
        param = params.get(name)
        if param is None:
            if open_ended:
                continue
            known = ", ".join(n for n, p in params.items() if p.default is not p.empty)
            raise ConfigError(f"{key}.{name}", f"unknown argument; known: {known}")
        tp = _simple(_annotation(target, name, param))
        if value is not None and tp is not None:
            _convert(value, tp, f"{key}.{name}")


def _annotation(target: Any, name: str, param: inspect.Parameter) -> Any:
    """The resolved annotation of one parameter (None: nothing to check).

    Unannotated, the default's type stands in (an int default accepts any number); an
    annotation that does not resolve (a name imported only for type checkers) checks nothing.
    """
    if param.annotation is param.empty:
        if param.default in (param.empty, None):
            return None
        kind = type(param.default)
        return float if kind is int else kind
    fn = getattr(target, "__init__", target) if isinstance(target, type) else target
    shim = types.FunctionType((lambda: None).__code__, {})
    shim.__annotations__ = {name: param.annotation}  # resolved alone: others may not resolve
    try:
        return typing.get_type_hints(shim, vars(importlib.import_module(fn.__module__)))[name]
    except Exception:
        return None


_SCALARS = (bool, int, float, str)


def _simple(tp: Any) -> Any:
    """The part of annotation ``tp`` that :func:`_convert` checks (None: nothing to check).

    Scalars and Literals stay; a tuple or list becomes ``list[Any]``; a Union keeps its
    checkable members (``Union[float, Tensor]`` -> ``float``); anything else is not checked.
    """
    origin = get_origin(tp)
    if tp in _SCALARS or origin is Literal:
        return tp
    if tp in (list, tuple) or origin in (list, tuple):
        return list[Any]
    if origin in (Union, types.UnionType):
        args = [a for a in (_simple(a) for a in get_args(tp)) if a is not None]
        if type(None) in get_args(tp):
            args.append(type(None))
        return Union[tuple(args)] if len(args) > 1 else (args[0] if args else None)  # noqa: UP007
    return None


def build_optimizer(node: dict[str, Any], key: str) -> Callable[..., Any]:
    """A partial optimizer factory, checked once on a dummy parameter so bad values fail early.

    A value the optimizer rejects (``lr=-1``) is named: the argument whose default makes the
    optimizer build is the one blamed (``optimizer.lr=-1: Invalid learning rate: -1``).
    """
    target = import_target(node, key)
    check_arguments(target, node, key)
    factory = build_partial(node, key)

    def attempt(partial: Callable[..., Any]) -> Exception | None:
        try:
            partial([{"params": [torch.zeros(1, requires_grad=True)]}])
        except (TypeError, ValueError) as err:
            return err
        return None

    err = attempt(factory)
    if err is None:
        return factory
    message = str(err).splitlines()[0]
    try:
        params = inspect.signature(target).parameters
    except (TypeError, ValueError):
        raise ConfigError(key, message) from None
    for name, value in _kwargs(node).items():  # the argument whose default makes it build
        param = params.get(name)
        if param is not None and param.default is not param.empty:
            others = {k: v for k, v in _kwargs(node).items() if k != name}
            if attempt(functools.partial(target, **others)) is None:
                raise ConfigError(f"{key}.{name}={value}", message)
    raise ConfigError(key, message)
