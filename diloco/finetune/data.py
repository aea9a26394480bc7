"""The user's data as a :class:`diloco.data.Corpus`, tokenized with the model's tokenizer.

Two forms (``data.path``: a file, folder or glob of ``.txt`` and ``.jsonl`` files):

* plain text: each ``.txt`` file is a document, each ``.jsonl`` line one (its
  ``data.text_field``); every document is followed by the tokenizer's eos and the stream
  is packed into sequences of ``data.seq_len + 1`` tokens, as :func:`diloco.data.load_corpus`
  packs a pretraining corpus;
* prompt/response examples (``data.prompt_field`` and ``data.response_field`` of each
  ``.jsonl`` line): one example per sequence, ``[bos] prompt response eos``, truncated to
  ``seq_len + 1`` tokens and right-padded; the corpus carries labels in which the prompt
  and the padding are -100, so the loss is taken on the response (and its eos) only. An
  example whose response is truncated away is dropped.

The eval set is a fixed fraction (``data.eval_fraction``) of the sequences or examples,
held out with a fixed seed (:func:`diloco.data.holdout`). Reading checks every line before
anything is tokenized: a missing field is one line naming its key and the line.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, cast

import torch

from diloco.config import DataConfig
from diloco.data import (
    IGNORE_INDEX,
    Corpus,
    DataError,
    DocTokenizer,
    holdout,
    local_files,
    pack_and_split,
    tokenize_docs,
)
from diloco.finetune.config import Fields

log = logging.getLogger(__name__)
_SUFFIXES = (".txt", ".jsonl")

Example = tuple[str, str]


def read(cfg: DataConfig, fields: Fields) -> list[str] | list[Example]:
    """The documents (plain text) or ``(prompt, response)`` pairs at ``data.path``.

    Raises:
        DataError: one line naming the key: a missing path, another file type, a line that
            is not a JSON object or lacks a field, no data at all.
    """
    assert cfg.path is not None
    files = local_files(cfg.path)
    if files is None:
        raise DataError(f"data.path={cfg.path}: does not exist; point it at .txt or .jsonl files")
    for f in files:
        if not f.endswith(_SUFFIXES) or (fields.examples and not f.endswith(".jsonl")):
            kinds = ".jsonl (prompt/response)" if fields.examples else ".txt or .jsonl"
            raise DataError(f"data.path={cfg.path}: cannot fine-tune on {_name(f)}; use {kinds}")
    out: list[Any] = []
    for f in files:
        if f.endswith(".txt"):
            text = Path(f).read_text(encoding="utf-8", errors="replace")
            out += [text] if text else []
        elif fields.examples:
            assert fields.prompt_field is not None and fields.response_field is not None
            out += [
                (
                    _field(row, "data.prompt_field", fields.prompt_field, n, f),
                    _field(row, "data.response_field", fields.response_field, n, f),
                )
                for n, row in _rows(cfg.path, f)
            ]
        else:
            texts = (
                _field(row, "data.text_field", cfg.text_field, n, f)
                for n, row in _rows(cfg.path, f)
            )
            out += [t for t in texts if t]
    if not out:
        raise DataError(f"data.path={cfg.path}: holds no text")
    return out


def _name(file: str) -> str:
    return os.path.basename(file)


def _rows(path: str, file: str) -> Iterator[tuple[int, dict[str, Any]]]:
    """``(line number, object)`` of each non-blank line of a jsonl file."""
    with open(file, encoding="utf-8") as fh:
        for n, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise DataError(
                    f"data.path={path}: line {n} of {_name(file)} is not JSON ({err.msg})"
                ) from None
            if not isinstance(row, dict):
                raise DataError(f"data.path={path}: line {n} of {_name(file)} is not a JSON object")
            yield n, row


def _field(row: dict[str, Any], key: str, name: str, n: int, file: str) -> str:
    """``row[name]``, a string; else one line naming ``key``, the line and the file."""
    where = f"line {n} of {_name(file)}"
    if name not in row:
        has = ", ".join(map(str, row)) or "none"
        raise DataError(f"{key}={name}: {where} has no field {name!r} (fields: {has})")
    value = row[name]
    if not isinstance(value, str):
        raise DataError(f"{key}={name}: {where}: {name!r} is {type(value).__name__}, not text")
    return value


def build_corpus(
    data: list[str] | list[Example],
    cfg: DataConfig,
    tok: DocTokenizer,
    vocab_size: int,
    prefix: Sequence[int] = (),
    pad: int = 0,
) -> Corpus:
    """Tokenize ``data`` (from :func:`read`) into a corpus for a model of ``vocab_size``.

    ``prefix``: ids put before each prompt (a bos the tokenizer adds); ``pad``: the input id
    of padding (its targets are -100). Documents are packed; examples are one per sequence.
    """
    if data and isinstance(data[0], tuple):
        corpus = _examples(cast(list[Example], data), cfg, tok, vocab_size, prefix, pad)
    else:
        tokens, starts = tokenize_docs(tok, cast(list[str], data))
        train, eval_, docs = pack_and_split(tokens, starts, cfg.seq_len, cfg.eval_fraction)
        corpus = Corpus(train, eval_, vocab_size, docs, tok)
    top = int(max(corpus.train.max(), corpus.eval.max()))
    if top >= vocab_size:
        raise DataError(
            f"data.path={cfg.path}: the tokenizer gives id {top}, the model has {vocab_size} "
            "embeddings (a tokenizer of another model?)"
        )
    return corpus


def _examples(
    pairs: list[Example],
    cfg: DataConfig,
    tok: DocTokenizer,
    vocab_size: int,
    prefix: Sequence[int],
    pad: int,
) -> Corpus:
    """One right-padded sequence per example; labels -100 on the prompt and the padding."""
    width = cfg.seq_len + 1
    prompts = tok.encode_docs([p for p, _ in pairs])
    responses = tok.encode_docs([r for _, r in pairs])
    seqs, labels = [], []
    for p, r in zip(prompts, responses, strict=True):
        head = [*prefix, *p.tolist()]
        tail = [*r.tolist(), *tok.separator]
        ids = (head + tail)[:width]
        target = ([IGNORE_INDEX] * len(head) + tail)[:width]
        if all(t == IGNORE_INDEX for t in target[1:]):
            continue  # the response is truncated away: nothing to learn from it
        fill = width - len(ids)
        seqs.append(ids + [pad] * fill)
        labels.append(target + [IGNORE_INDEX] * fill)
    dropped = len(pairs) - len(seqs)
    if dropped:
        log.warning(
            "%d of %d examples dropped: data.seq_len=%d cuts off their responses",
            dropped,
            len(pairs),
            cfg.seq_len,
        )
    if len(seqs) < 2:
        raise DataError(
            f"data.path={cfg.path}: {len(seqs)} usable examples of {len(pairs)}; need at least 2 "
            "(one is held out; a prompt longer than data.seq_len leaves no response)"
        )
    ids_t, labels_t = torch.tensor(seqs, dtype=torch.int64), torch.tensor(labels, dtype=torch.int64)
    train, eval_ = holdout(len(seqs), cfg.eval_fraction)
    return Corpus(
        ids_t[train], ids_t[eval_], vocab_size, train.clone(), tok,
        train_labels=labels_t[train], eval_labels=labels_t[eval_],
    )  # fmt: skip
