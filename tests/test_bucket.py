"""comm=bucket in one process: objects, validation, windows, copies, the exchange around it."""

from __future__ import annotations

import re
import threading
import time
from pathlib import Path

import pytest
import torch

from diloco.comm.bucket import VALIDATOR_KEY, BucketComm
from diloco.comm.objects import (
    pack,
    pack_global,
    pack_state,
    read_global,
    read_payload,
    unpack,
    unpack_state,
)
from diloco.comm.stores import FileStore, ObjectInfo, StoreError
from diloco.config import ConfigError
from diloco.exchange.codecs import Encoded
from diloco.exchange.pipeline import ExchangePipeline, decode_rows
from diloco.exchange.sparse import TopK


def comm(tmp_path: Path, peer: int, k: int = 3, **kw: object) -> BucketComm:
    cfg = {"store": f"file://{tmp_path / 'store'}", "deadline_s": 0.5, **kw}
    c = BucketComm(BucketComm.Config(**cfg), num_workers=k, peer=peer)  # type: ignore[arg-type]
    c.first = False  # not the first window: deadline_s, not join_deadline_s
    return c


def post(tmp_path: Path, round_key: str, peer: int, tensors: dict, **meta: str) -> None:
    data = pack(tensors, {"peer": str(peer), "round": round_key, **meta})
    FileStore(tmp_path / "store").put(f"run/{round_key}/{peer}", data)


def test_an_object_round_trips_and_its_header_is_checked():
    row = {"part0": torch.randn(5)}
    data = pack(row, {"peer": "2", "round": "4"})
    tensors, meta = unpack(data)
    assert torch.equal(tensors["part0"], row["part0"]) and meta["peer"] == "2"
    got, digest = read_payload(data, 2, "4", row)
    assert torch.equal(got["part0"], row["part0"]) and len(digest) == 64
    bad = {
        b"garbage": "shorter than a safetensors header",
        b"\xff" * 8 + b"{}": "header of",
        data[:40]: r"header of \d+ bytes in an object of 40",
        data[:-4]: "not a safetensors object",
    }
    for blob, why in bad.items():
        with pytest.raises(ValueError, match=why):
            read_payload(blob, 2, "4", row)
    cases = [
        (pack(row, {"peer": "1", "round": "4"}), "claims peer '1'"),
        (pack(row, {"peer": "2", "round": "3"}), "stale: made for round '3'"),
        (
            pack({"part0": torch.randn(4)}, {"peer": "2", "round": "4"}),
            r"float32\[4\] != float32\[5\]",
        ),
        (pack({"part0": torch.randn(5).half()}, {"peer": "2", "round": "4"}), "float16"),
        (pack({"x": torch.randn(5)}, {"peer": "2", "round": "4"}), "tensors"),
        (
            pack({"part0": torch.full((5,), float("nan"))}, {"peer": "2", "round": "4"}),
            "non-finite",
        ),
    ]
    for blob, why in cases:
        with pytest.raises(ValueError, match=why):
            read_payload(blob, 2, "4", row)


def test_algorithm_state_survives_safetensors():
    p = torch.nn.Parameter(torch.randn(6))
    opt = torch.optim.SGD([p], lr=0.7, momentum=0.9, nesterov=True)
    p.grad = torch.randn(6)
    opt.step()
    state = {"outer": opt.state_dict()}
    tensors, skeleton = pack_state(state)
    back = unpack_state(unpack(pack(tensors, {}))[0], skeleton)
    assert list(back["outer"]["state"]) == [0]  # int keys stay ints
    assert torch.equal(
        back["outer"]["state"][0]["momentum_buffer"], opt.state[p]["momentum_buffer"]
    )
    opt2 = torch.optim.SGD([torch.nn.Parameter(torch.zeros(6))], lr=0.1, momentum=0.9)
    opt2.load_state_dict(back["outer"])
    for junk in ("[1]", '{"t": "t9"}', '{"q": 1}', "not json"):
        with pytest.raises(ValueError, match="state"):
            unpack_state(tensors, junk)


def test_window_closes_when_every_expected_peer_posted(tmp_path):
    mine = torch.randn(1, 4)
    others = {0: torch.randn(4), 2: torch.randn(4)}
    for p, t in others.items():
        post(tmp_path, "0", p, {"part0": t})
    c = comm(tmp_path, peer=1, deadline_s=30.0)
    started = time.monotonic()
    out = c.all_gather_parts([mine])[0]
    assert time.monotonic() - started < 5  # did not wait for the deadline
    assert torch.equal(out[0], others[0]) and torch.equal(out[2], others[2])
    assert torch.equal(out[1], mine[0])
    assert c.received is not None and c.received.all() and not c.rejected
    assert c.sent.item() == len(FileStore(tmp_path / "store").get("run/0/1", 10**6) or b"")
    assert c.recv.item() > 0


def test_absent_peer_costs_one_deadline_then_is_not_waited_for(tmp_path):
    c = comm(tmp_path, peer=0, k=2, deadline_s=0.6)
    started = time.monotonic()
    c.all_gather_parts([torch.randn(1, 3)])
    first = time.monotonic() - started
    assert c.received is not None and c.received.tolist() == [True, False]
    c.round_of = lambda: 1
    started = time.monotonic()
    c.all_gather_parts([torch.randn(1, 3)])
    assert first >= 0.6 and time.monotonic() - started < 0.5
    post(tmp_path, "2", 1, {"part0": torch.randn(3)})  # it is back: taken when present
    c.round_of = lambda: 2
    assert c.all_gather_parts([torch.randn(1, 3)])[0].abs().sum(1).gt(0).all()
    assert c.received is not None and c.received.all() and c.missed == set()


def test_a_peer_announcing_a_later_round_is_not_waited_for(tmp_path):
    c = comm(tmp_path, peer=0, k=2, deadline_s=30.0)
    FileStore(tmp_path / "store").put("run/join/1", b"3")
    started = time.monotonic()
    c.all_gather_parts([torch.randn(1, 3)])
    assert time.monotonic() - started < 5


def test_copies_malformed_oversized_and_stale_objects_are_excluded_with_reasons(tmp_path):
    k = 6
    honest = torch.randn(8)
    post(tmp_path, "0", 1, {"part0": honest})
    time.sleep(0.02)  # posted later: the copy
    post(tmp_path, "0", 2, {"part0": honest.clone()})
    FileStore(tmp_path / "store").put("run/0/3", b"\x00" * 64)
    FileStore(tmp_path / "store").put("run/0/4", b"\x00" * 10**6)
    c = comm(tmp_path, peer=0, k=k, deadline_s=5.0)
    mine = torch.randn(1, 8)
    post(tmp_path, "0", 5, {"part0": mine[0].clone()})  # a copy of this peer's own payload
    out = c.all_gather_parts([mine])[0]
    assert c.received is not None and c.received.tolist() == [
        True,
        True,
        False,
        False,
        False,
        False,
    ]
    assert torch.equal(out[1], honest)
    reasons = c.rejected
    assert "copy of peer 1's payload" in reasons[2]
    assert "not a safetensors" in reasons[3] or "header" in reasons[3]
    assert "oversized" in reasons[4]
    assert "copy of peer 0's payload" in reasons[5]
    # the next round: peer 1 posts the same tensors again (stale)
    c.round_of = lambda: 1
    post(tmp_path, "1", 1, {"part0": honest})
    for p in (2, 3, 4, 5):
        post(tmp_path, "1", p, {"part0": torch.randn(8)})
    c.all_gather_parts([torch.randn(1, 8)])
    assert "stale: the payload of round 0 of peer 1 again" in c.rejected[1]
    assert set(c.rejected) == {1}
    assert c.summary()["excluded"] == {"copy": 2, "malformed": 1, "oversized": 1, "stale": 1}


def test_of_tied_copies_exactly_one_is_aggregated(tmp_path, monkeypatch):
    t = torch.randn(4)
    post(tmp_path, "0", 1, {"part0": t})
    post(tmp_path, "0", 2, {"part0": t.clone()})
    real = FileStore.list

    def same_time(self, prefix):  # a store whose clock cannot tell them apart
        return [ObjectInfo(i.key, i.size, 1.0) for i in real(self, prefix)]

    monkeypatch.setattr(FileStore, "list", same_time)
    c = comm(tmp_path, peer=0)
    out = c.all_gather_parts([torch.randn(1, 4)])[0]
    assert c.rejected == {2: "peer 2: the same payload as peer 1's, at the same store time"}
    assert c.kinds == {2: "copy_tie"}
    assert torch.equal(out[1], t)  # the store cannot tell who copied: the row counts once


def test_a_slow_store_skips_the_window_instead_of_hanging(tmp_path, monkeypatch):
    def slow(self, prefix):
        time.sleep(0.4)
        return []

    monkeypatch.setattr(FileStore, "list", slow)
    c = comm(tmp_path, peer=0, k=3, deadline_s=0.5)
    started = time.monotonic()
    mine = torch.randn(1, 3)
    out = c.all_gather_parts([mine])[0]
    assert time.monotonic() - started < 2.0
    assert c.received is not None and c.received.tolist() == [True, False, False]
    assert torch.equal(out[0], mine[0])


def test_the_exchange_averages_what_arrived_and_logs_exclusions(tmp_path, caplog):
    post(tmp_path, "0", 1, {"part0": torch.ones(4)})
    FileStore(tmp_path / "store").put("run/0/2", b"junk" * 4)
    c = comm(tmp_path, peer=0)
    pipe = ExchangePipeline(c)
    mine = torch.full((1, 4), 3.0)
    with caplog.at_level("WARNING"):
        out = pipe(mine)
    assert torch.allclose(out, torch.full((4,), 2.0))
    assert pipe.stats.excluded == 1 and "peer 2" in caplog.text


def test_rows_that_do_not_decode_are_excluded_not_fatal():
    codec = TopK(TopK.Config(k=2))
    rows = torch.randn(3, 20)
    enc = codec.encode(rows)
    assert enc.indices is not None
    bad = enc.indices.clone()
    bad[1] = 255  # bit-packed indices past the payload
    enc = Encoded(enc.shape, enc.values, indices=bad, scales=enc.scales)
    out, why = decode_rows(codec, enc, torch.tensor([True, True, False]))
    assert out[0] is not None and out[2] is None and why[2] == ""
    assert out[1] is None and "worker 1: does not decode" in why[1]


def test_store_errors_are_one_line_config_errors(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(ConfigError, match="comm.store="):
        BucketComm(BucketComm.Config(store=f"file://{blocker}/sub"), num_workers=2, peer=0)  # type: ignore[call-arg]
    with pytest.raises(ConfigError, match="comm.store=ftp://x"):
        BucketComm(BucketComm.Config(store="ftp://x"), num_workers=2, peer=0)  # type: ignore[call-arg]
    with pytest.raises(ConfigError, match=r"worker.id=5: must be in \[0, 2\)"):
        BucketComm(BucketComm.Config(store=str(tmp_path)), num_workers=2, peer=5)  # type: ignore[call-arg]


def test_a_peer_follows_the_newest_validator_weights_and_ignores_broken_ones(
    tmp_path, caplog, monkeypatch
):
    monkeypatch.setenv(VALIDATOR_KEY, "secret")
    c = comm(tmp_path, peer=0)

    def window(r: int) -> None:  # round r: peers 1 and 2 post, peer 0 gathers
        c.round_of = lambda: r
        for p in (1, 2):
            post(tmp_path, str(r), p, {"part0": torch.randn(4)})
        c.all_gather_parts([torch.randn(1, 4)])

    c.post_weights(0, torch.tensor([1.0, 0.0, 1.0]))
    window(1)
    assert c.rejected == {1: "peer 1: flagged by the validator in round 0"}
    assert c.received is not None and c.received.tolist() == [True, False, True]
    FileStore(tmp_path / "store").put("run/weights/1", b"not weights")
    with caplog.at_level("WARNING"):
        window(2)
    assert c.rejected == {} and "validator weights of round 1 unreadable" in caplog.text
    c.post_weights(2, torch.ones(5))  # the wrong size: ignored too
    window(3)
    assert c.rejected == {}
    # anyone can write to the store: weights not signed with the validator's key are ignored
    forged = pack({"weights": torch.tensor([1.0, 0.0, 1.0])}, {"round": "3", "sig": "0" * 64})
    FileStore(tmp_path / "store").put("run/weights/3", forged)
    with caplog.at_level("WARNING"):
        window(4)
    assert c.rejected == {} and "not signed with DILOCO_VALIDATOR_KEY" in caplog.text
    monkeypatch.delenv(VALIDATOR_KEY)  # without the key, no weights are followed at all
    c.post_weights(4, torch.tensor([1.0, 0.0, 1.0]))
    window(5)
    assert c.rejected == {}


def test_odd_keys_in_the_store_never_crash_a_peer(tmp_path):
    store = FileStore(tmp_path / "store")
    for key in ("run/0/²", "run/0/01x", "run/0/99", "run/join/²", "run/join/1", "run/global/²/0"):
        store.put(key, b"junk")
    post(tmp_path, "0", 1, {"part0": torch.randn(3)})
    c = comm(tmp_path, peer=0, k=2)
    c.all_gather_parts([torch.randn(1, 3)])
    assert c.received is not None and c.received.tolist() == [True, True]
    assert list(c.global_models()) == []


def test_another_runs_objects_are_excluded(tmp_path):
    post(tmp_path, "0", 1, {"part0": torch.randn(3)}, run="other-config")
    c = comm(tmp_path, peer=0, k=2, deadline_s=0.2)
    c.fingerprint = "this-config"
    c.all_gather_parts([torch.randn(1, 3)])
    assert "another run's object" in c.rejected[1]


def test_forged_global_checkpoints_are_skipped(tmp_path):
    c = comm(tmp_path, peer=0, k=2)
    p = torch.nn.Parameter(torch.zeros(4))
    outer = torch.optim.SGD([p], lr=0.7, momentum=0.9, nesterov=True)
    own = {"outer": outer.state_dict()}
    shapes = {(4,)}
    good = torch.ones(4)
    p.grad = torch.ones(4)
    outer.step()  # a state after an outer step: a momentum buffer the joiner has not made
    stepped = {"outer": outer.state_dict()}
    store = FileStore(tmp_path / "store")
    for r in (2, 99):  # nobody reached round 98: forged
        store.put(f"run/global/{r}/0", pack_global(good, stepped, 4 * r, c._meta(str(r))))
    post(tmp_path, "1", 1, {"part0": torch.randn(3)})
    found = [(r, read_global(t, m, p.data, own, 8, shapes)) for r, t, m in c.global_models()]
    assert [r for r, _ in found] == [2] and torch.equal(found[0][1][0], good)
    group = own["outer"]["param_groups"][0]
    bad_lr = {"outer": {**own["outer"], "param_groups": [{**group, "lr": 50.0}]}}
    buffer = {"outer": {**own["outer"], "state": {0: {"momentum_buffer": torch.ones(1, 1)}}}}
    huge = {"outer": {**own["outer"], "state": {0: {"momentum_buffer": torch.full((4,), 1e30)}}}}
    cases = [
        (pack_global(torch.ones(5), own, 8, {}), "the model is not"),
        (pack_global(torch.full((4,), float("nan")), own, 8, {}), "not finite"),
        (pack_global(good, own, 99, {}), "step '99': its round starts at step 8"),
        (pack_global(good, bad_lr, 8, {}), "lr: 50.0 != 0.7"),
        (pack_global(good, {"other": 1}, 8, {}), "state.outer: missing"),
        (pack_global(good, buffer, 8, {}), "shape [1, 1] is no parameter's"),
        (pack_global(good, huge, 8, {}), "not finite, or above 1e+06"),
    ]
    for data, why in cases:
        tensors, meta = unpack(data)
        with pytest.raises(ValueError, match=re.escape(why)):
            read_global(tensors, meta, p.data, own, 8, shapes)
    # a joiner's fresh Streaming-DiLoCo-like state: counters and pending merges may differ
    mine = {"outers": [own["outer"]], "syncs": 0, "pending": []}
    theirs = {"outers": [stepped["outer"]], "syncs": 3, "pending": [[1, torch.zeros(4)]]}
    tensors, meta = unpack(pack_global(good, theirs, 8, {}))
    assert read_global(tensors, meta, p.data, mine, 8, shapes)[1]["syncs"] == 3


def test_a_peer_that_missed_a_window_but_posted_late_is_waited_for_again(tmp_path):
    c = comm(tmp_path, peer=0, k=2, deadline_s=0.3)
    c.all_gather_parts([torch.randn(1, 3)])  # round 0: peer 1 missed it
    assert c.missed == {1}
    post(tmp_path, "0", 1, {"part0": torch.randn(3)})  # ... and posted after the window closed
    c.round_of = lambda: 1
    c.cfg.deadline_s = 5.0  # type: ignore[attr-defined]
    timer = threading.Timer(0.5, post, (tmp_path, "1", 1, {"part0": torch.randn(3)}))
    timer.start()
    c.all_gather_parts([torch.randn(1, 3)])
    timer.join()
    assert c.received is not None and c.received.tolist() == [True, True]


def test_a_payload_that_could_not_be_posted_is_left_out_here_too(tmp_path, monkeypatch):
    post(tmp_path, "0", 1, {"part0": torch.ones(3)})
    real = FileStore.put

    def failing(self, key, data):
        if key.endswith("/0"):
            raise StoreError("disk full")
        real(self, key, data)

    monkeypatch.setattr(FileStore, "put", failing)
    c = comm(tmp_path, peer=0, k=2)
    out = ExchangePipeline(c)(torch.full((1, 3), 5.0))
    assert torch.equal(out, torch.ones(3))  # peer 1's alone: what everyone else averaged
    assert c.summary()["store_failures"] == 1
