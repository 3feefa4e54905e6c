"""The streaming loader on real shards: balance across ranks and workers, exactness, resume."""

from __future__ import annotations

import dataclasses
import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

from data_tools.shards import ShardOptions, make_shards
from speechssl.config import ConfigError
from speechssl.data import DataConfig, make_loader
from speechssl.data.loader import AudioLoader
from speechssl.data.manifest import Entry

RATE = 16000


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """60 utterances of 0.3-2.5 s over 7 shards of unequal size (written as real WAV files first)."""
    root = tmp_path_factory.mktemp("corpus")
    rng = np.random.default_rng(0)
    entries = []
    for i in range(60):
        seconds = float(rng.uniform(0.3, 2.5))
        path = root / "wav" / f"u{i:03d}.wav"
        path.parent.mkdir(exist_ok=True)
        # Sample value i/1000 at the start identifies the utterance after decoding.
        audio = 0.05 * rng.standard_normal(int(seconds * RATE))
        audio[:4] = i / 1000
        sf.write(path, audio, RATE, subtype="PCM_16")
        entries.append(Entry(id=f"u{i:03d}", path=str(path), speaker=f"s{i % 5}", text="HI"))
    make_shards(entries, root / "shards", ShardOptions(max_count=9, workers=1), progress=False)
    return root / "shards"


def _config(corpus: Path, **kw) -> DataConfig:
    base = dict(shards=[str(corpus)], max_tokens=80_000, max_sample_size=24_000, min_sample_size=8_000,
                shuffle_buffer=16, num_workers=2, seed=3)
    base.update(kw)
    return DataConfig(**base)


def _keys(batch) -> list[str]:
    return [m["__key__"] for m in batch.metadata["samples"]]


def test_batches_are_padded_audio_with_metadata(corpus: Path) -> None:
    loader = make_loader(_config(corpus, crop_to_shortest=False), train=True)
    batches = list(loader)
    assert batches and len(batches) == len(loader)
    for waves, lengths, meta in batches:
        assert waves.dtype == torch.float32 and lengths.dtype == torch.long
        assert waves.shape == (len(lengths), int(lengths.max())) and len(meta["samples"]) == len(lengths)
        assert (waves.shape[0] * waves.shape[1]) <= 80_000  # max_tokens
        assert int(lengths.max()) <= 24_000 and int(lengths.min()) >= 8_000 * 0 + 1
        for row, n in zip(waves, lengths, strict=True):
            assert row[n:].abs().sum() == 0  # zero padding
    assert loader.stats["dropped_short"] > 0  # 0.3-0.5 s utterances are below min_sample_size


def test_crop_to_shortest_has_no_padding(corpus: Path) -> None:
    for waves, lengths, _ in make_loader(_config(corpus), train=True):
        assert (lengths == lengths[0]).all() and waves.shape[0] * waves.shape[1] <= 80_000


def test_without_cropping_long_utterances_are_dropped_and_counted(corpus: Path) -> None:
    """Labelled data: an utterance is never cut; one longer than max_sample_size is left out, with
    a count. Every other utterance arrives whole, with its transcript."""
    from speechssl.data.shardset import ShardSet

    cfg = _config(corpus, crop=False, crop_to_shortest=False)
    shards = ShardSet([str(corpus)]).shards[0]
    lengths = {k: n for shard in shards for k, n in zip(shard.keys, shard.lengths, strict=True)}
    loader = make_loader(cfg, train=True)
    seen = {}
    for _, batch_lengths, meta in loader:
        for sample, n in zip(meta["samples"], batch_lengths.tolist(), strict=True):
            seen[sample["__key__"]] = n
            assert "text" in sample
    assert all(lengths[k] == n for k, n in seen.items())  # whole
    too_long = [k for k, n in lengths.items() if n > 24_000]
    too_short = [k for k, n in lengths.items() if n < 8_000]
    assert too_long and loader.stats["dropped_long"] == len(too_long)
    assert loader.stats["dropped_short"] == len(too_short)
    assert len(seen) + len(too_long) + len(too_short) == len(lengths)  # nothing else lost
    with pytest.raises(ConfigError, match=r"data\.crop_to_shortest"):
        _config(corpus, crop=False)


def test_two_ranks_two_workers_equal_counts_disjoint_samples(corpus: Path) -> None:
    cfg = _config(corpus)
    per_rank = [[_keys(b) for b in make_loader(cfg, train=True, rank=r, world_size=2)] for r in range(2)]
    assert len(per_rank[0]) == len(per_rank[1]) > 0
    flat = [[k for batch in rank for k in batch] for rank in per_rank]
    assert not set(flat[0]) & set(flat[1])
    assert all(len(f) == len(set(f)) for f in flat)  # no sample twice in an epoch


def test_evaluation_yields_every_sample_exactly_once(corpus: Path) -> None:
    cfg = _config(corpus, max_sample_size=80_000)
    seen = []
    for rank in range(2):
        for waves, lengths, meta in make_loader(cfg, train=False, rank=rank, world_size=2):
            seen += _keys(type("B", (), {"metadata": meta})())
            for row, n, m in zip(waves, lengths, meta["samples"], strict=True):
                assert int(n) == m["num_samples"]  # no crop in evaluation
                assert round(float(row[0]) * 1000) == int(m["__key__"][1:])
    assert sorted(seen) == [f"u{i:03d}" for i in range(60)]


def test_same_seed_same_batches_other_seed_other_batches(corpus: Path) -> None:
    a = [_keys(b) for b in make_loader(_config(corpus), train=True)]
    b = [_keys(b) for b in make_loader(_config(corpus), train=True)]
    c = [_keys(b) for b in make_loader(_config(corpus, seed=4), train=True)]
    assert a == b and a != c


def test_epochs_differ(corpus: Path) -> None:
    loader = make_loader(_config(corpus), train=True)
    first = [_keys(b) for b in loader]
    second = [_keys(b) for b in loader]
    assert loader.epoch == 2 and first != second


def test_next_epoch_started_early_gives_the_same_batches(corpus: Path) -> None:
    """The workers of epoch e+1 start during epoch e; what they yield is what epoch e+1 read on
    its own yields, and a restart of an epoch (set_epoch) does not use the early start."""
    cfg = _config(corpus, num_workers=2)
    loader = make_loader(cfg, train=True)
    chained = [[_keys(b) for b in loader] for _ in range(3)]
    assert loader._next is not None and loader._next[0] == (3, 0)  # started during the third

    def alone(epoch: int) -> list[list[str]]:
        fresh = make_loader(cfg, train=True)
        fresh.set_epoch(epoch)
        return [_keys(b) for b in fresh]

    assert chained == [alone(e) for e in range(3)] and chained[0] != chained[1]
    restarted = make_loader(cfg, train=True)
    for i, _ in enumerate(restarted):
        if i == len(chained[0]) - 2:  # epoch 1 has been started early by now
            break
    assert restarted._next is not None and restarted._next[0] == (1, 0)
    restarted.set_epoch(0)
    assert [_keys(b) for b in restarted] == chained[0]


def test_workers_from_a_fork_server_yield_what_forked_workers_yield(corpus: Path) -> None:
    """``worker_start: forkserver``: the workers come from one fork server, not from this process
    (whose page tables a fork would copy while training waits), and yield the same batches."""
    import os

    import psutil

    def started(start: str) -> tuple[set[int], list[list[str]]]:
        batches = make_loader(_config(corpus, num_workers=2, worker_start=start), train=True)._start(0, 0)
        first = _keys(next(batches))
        parents = {psutil.Process(w.pid).ppid() for w in batches._workers}
        return parents, [first] + [_keys(b) for b in batches]

    served_by, served = started("forkserver")
    forked_by, forked = started("default")
    assert forked_by == {os.getpid()}  # Linux before Python 3.14: a fork of this process
    assert os.getpid() not in served_by and len(served_by) == 1
    assert served == forked and len(served) > 1
    with pytest.raises(ConfigError, match=r"data\.worker_start"):
        _config(corpus, worker_start="spawn-please")


def test_cropping_that_discards_most_audio_is_reported(corpus: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Each loader slot packs batches from its own shards: with one shard per slot, batches mix
    lengths and cropping to the shortest throws most of the audio away."""
    with caplog.at_level("WARNING", logger="speechssl.data.loader"):
        list(make_loader(_config(corpus, num_workers=2, shuffle_buffer=1000), train=True))
    assert not [r for r in caplog.records if "crop_to_shortest keeps" in r.getMessage()]
    with caplog.at_level("WARNING", logger="speechssl.data.loader"):
        loader = make_loader(_config(corpus, num_workers=0, max_tokens=200_000), train=True, rank=0, world_size=7)
        list(loader)
        list(loader)
    warnings = [r.getMessage() for r in caplog.records if "crop_to_shortest keeps" in r.getMessage()]
    assert len(warnings) == 1 and "7 loader slots" in warnings[0]


@pytest.mark.parametrize("workers", [0, 2])
def test_resume_gives_the_batches_an_uninterrupted_run_gives(corpus: Path, workers: int) -> None:
    cfg = _config(corpus, num_workers=workers)
    reference = make_loader(cfg, train=True, rank=1, world_size=2)
    expected = [(_keys(b), b.waveforms) for _ in range(2) for b in reference]  # two epochs
    assert len(expected) > 6
    for stop in (3, len(expected) // 2 + 1):
        loader = make_loader(cfg, train=True, rank=1, world_size=2)
        got = []
        for _ in range(2):
            for b in loader:
                got.append((_keys(b), b.waveforms))
                if len(got) == stop:
                    break
            if len(got) == stop:
                break
        state = json.loads(json.dumps(loader.state_dict()))  # as saved in a checkpoint
        restored = make_loader(cfg, train=True, rank=1, world_size=2)
        restored.load_state_dict(state)
        while len(got) < len(expected):
            got += [(_keys(b), b.waveforms) for b in restored]
        assert [k for k, _ in got] == [k for k, _ in expected]
        assert all(torch.equal(g, e) for (_, g), (_, e) in zip(got, expected, strict=True))  # same crops


def test_state_of_another_shard_set_is_refused(corpus: Path, tmp_path: Path) -> None:
    loader = make_loader(_config(corpus), train=True)
    state = loader.state_dict()
    other = make_loader(_config(corpus, seed=9), train=True)
    with pytest.raises(ValueError, match="another shard set or seed"):
        other.load_state_dict(state)


def test_mixing_weights_and_brace_patterns(corpus: Path) -> None:
    index = json.loads((corpus / "index.json").read_text())
    total = index["totals"]["num_samples"]
    cfg = _config(corpus, min_sample_size=0, num_workers=0)
    twice = make_loader(dataclasses.replace(cfg, shards=[str(corpus), str(corpus)], weights=[1.0, 1.0]), train=True)
    once = make_loader(cfg, train=True)
    assert sum(len(_keys(b)) for b in once) == total
    assert sum(len(_keys(b)) for b in twice) == 2 * total
    pattern = str(corpus / "shard-{000000..000002}.tar")
    part = make_loader(dataclasses.replace(cfg, shards=[pattern]), train=False)
    assert sum(len(_keys(b)) for b in part) == sum(s["num_samples"] for s in index["shards"][:3])
    half = make_loader(dataclasses.replace(cfg, weights=[0.5]), train=False)
    assert 0 < sum(len(_keys(b)) for b in half) < total


def test_missing_or_foreign_directories_are_clear_errors(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="does not exist"):
        make_loader(DataConfig(shards=[str(tmp_path / "nope")]), train=True)
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match=r"no index\.json"):
        make_loader(DataConfig(shards=[str(tmp_path / "empty")]), train=True)


def _corrupt_copy(corpus: Path, target: Path) -> str:
    """A copy of the shards where one sample's FLAC bytes are garbage; returns its key."""
    target.mkdir()
    for path in corpus.iterdir():
        target.joinpath(path.name).write_bytes(path.read_bytes())
    shard = target / "shard-000001.tar"
    with tarfile.open(shard) as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar.getmembers()]
    victim = members[0][0].name.split(".")[0]
    with tarfile.open(shard, "w") as tar:
        for member, data in members:
            if member.name == f"{victim}.flac":
                data = b"fLaC" + b"\x00garbage" * 50
                member.size = len(data)
            tar.addfile(member, io.BytesIO(data))
    return victim


def test_corrupt_sample_is_skipped_and_counted(corpus: Path, tmp_path: Path) -> None:
    victim = _corrupt_copy(corpus, tmp_path / "bad")
    loader = make_loader(_config(tmp_path / "bad", min_sample_size=0, max_sample_size=80_000), train=False)
    keys, skipped = [], []
    for batch in loader:
        keys += _keys(batch)
        skipped += batch.metadata["skipped"]
    assert victim not in keys and len(keys) == 59
    assert [k for k, _ in skipped] == [victim] and "undecodable" in skipped[0][1]
    assert loader.stats["corrupt"] == 1


def test_loader_len_matches_and_is_an_audio_loader(corpus: Path) -> None:
    loader = make_loader(_config(corpus), train=True, rank=0, world_size=3)
    assert isinstance(loader, AudioLoader) and len(loader) == len(list(loader))


def test_every_rank_gets_shards_before_any_rank_gets_two_workers_busy(corpus: Path) -> None:
    from speechssl.data.plan import deal
    from speechssl.data.shardset import ShardSet

    shards = ShardSet([str(corpus)]).shards[0][:2]
    slots = deal(shards, world_size=2, workers=4)
    assert [len(s) for s in slots] == [1, 0, 0, 0, 1, 0, 0, 0]  # one shard per rank, not two on rank 0


def test_a_rank_without_data_is_a_clear_error(corpus: Path) -> None:
    pattern = str(corpus / "shard-000000.tar")
    loader = make_loader(_config(corpus, shards=[pattern], num_workers=0), train=True, rank=0, world_size=2)
    with pytest.raises(ValueError, match="gets no training batch"):
        list(loader)
