"""A resumable streaming loader of padded audio batches from WebDataset shards.

    loader = make_loader(DataConfig(shards=["data/train"]), train=True)
    for waveforms, lengths, metadata in loader:      # (B, S) float32, (B,) int64, dict
        ...
    state = loader.state_dict()                      # save with the checkpoint
    loader.load_state_dict(state)                    # resumes with exactly the next batch

Batches are planned from the shard index (see :mod:`speechssl.data.plan`): every rank yields the
same number of batches per epoch, evaluation yields every sample exactly once over all ranks and
workers, and the same seed gives the same batches. Tar files are read with webdataset and audio is
decoded with soundfile; a corrupt sample is skipped, counted and reported in the batch metadata.
"""

from __future__ import annotations

import copy
import json
import logging
import multiprocessing
import sys
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import NamedTuple, Optional

import numpy as np
import soundfile as sf
import torch
import webdataset as wds
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from speechssl.config import check
from speechssl.data.audio import decode_audio, normalize_audio, pad_waveforms
from speechssl.data.augment import AugmentConfig, Augmenter, change_speed, draw_speeds, speed_length
from speechssl.data.plan import EpochPlan, Item, plan_epoch, round_robin
from speechssl.data.shardset import ShardSet

log = logging.getLogger(__name__)


@dataclass
class DataConfig:
    """shards: shard directories or brace patterns; weights: mixing weight per source.
    max_tokens: padded samples per batch (B x S), fairseq ``max_tokens``. max_sample_size: longer
    utterances are randomly cropped to it in training (fairseq ``max_sample_size``).
    min_sample_size: shorter ones are dropped in training (fairseq ``min_sample_size``).
    crop_to_shortest: crop every utterance of a batch to the shortest one (fairseq's pretraining
    collater: no padding). crop: false for labelled data (fine-tuning): nothing is cropped, and
    training utterances longer than max_sample_size are dropped and counted.
    normalize: zero mean, unit variance per utterance (fairseq ``normalize``).
    shuffle_buffer: samples per shuffling and length-bucketing window. max_batch_size: 0 = no cap.
    num_workers: DataLoader worker processes. worker_start: how they start, ``default`` (the
    platform's start method: on Linux before Python 3.14, a fork of this process) or
    ``forkserver`` (forked from a small server process started once: an epoch's start no longer
    copies the page tables of a large training process; the main module is imported again there,
    so a script needs ``if __name__ == "__main__":``, as with ``spawn``). seed: shuffling, cropping,
    augmentation. augment: speed perturbation, gain and additive noise of training batches
    (:mod:`speechssl.data.augment`); validation and evaluation never augment."""

    shards: list[str] = field(default_factory=list)
    weights: Optional[list[float]] = None  # noqa: UP045  (OmegaConf needs typing.Optional)
    max_tokens: int = 1_400_000
    max_sample_size: int = 250_000
    min_sample_size: int = 32_000
    crop_to_shortest: bool = True
    crop: bool = True
    normalize: bool = False
    shuffle_buffer: int = 1000
    max_batch_size: int = 0
    num_workers: int = 2
    worker_start: str = "default"
    seed: int = 1
    augment: AugmentConfig = field(default_factory=AugmentConfig)

    def __post_init__(self) -> None:
        check(self.max_tokens > 0, "data.max_tokens", "must be > 0")
        check(self.max_sample_size > 0, "data.max_sample_size", "must be > 0")
        check(self.max_tokens >= self.max_sample_size, "data.max_tokens",
              f"must be >= max_sample_size ({self.max_sample_size}) so one cropped utterance fits")
        check(0 <= self.min_sample_size <= self.max_sample_size, "data.min_sample_size",
              "must be in [0, max_sample_size]")
        check(self.shuffle_buffer >= 1, "data.shuffle_buffer", "must be >= 1")
        check(self.crop or not self.crop_to_shortest, "data.crop_to_shortest",
              "crops; with crop: false (labelled data) set it to false")
        check(self.num_workers >= 0, "data.num_workers", "must be >= 0")
        check(self.seed >= 0, "data.seed", f"must be >= 0, got {self.seed}")
        check(self.worker_start in ("default", "forkserver"), "data.worker_start",
              f"must be default or forkserver, got {self.worker_start!r}")
        check(self.worker_start == "default" or "forkserver" in multiprocessing.get_all_start_methods(),
              "data.worker_start", "forkserver is not available on this platform (use default)")
        check(self.max_batch_size >= 0, "data.max_batch_size", "must be >= 0")


class IndexMismatch(ValueError):
    """A sample in a tar differs from what the shard index says of it."""


class AudioBatch(NamedTuple):
    """waveforms: ``(B, S)`` float32, zero-padded; lengths: ``(B,)`` int64; metadata: ``samples``
    (each sample's json plus ``__key__`` and ``__shard__``), ``skipped`` (``[key, reason]`` of
    samples of this batch that could not be decoded or are missing from their tar) and, from the
    loader, ``unlisted`` (``{shard path: count}`` of tar members the index does not list, read
    since the previous batch). B may be 0 when every sample was corrupt."""

    waveforms: torch.Tensor
    lengths: torch.Tensor
    metadata: dict


def worker_context(start: str) -> multiprocessing.context.BaseContext | None:
    """How loader workers start (``DataConfig.worker_start``): None for the platform's default
    (on Linux before Python 3.14, a fork of this process), or a fork server. Forking the training
    process copies its page tables while the training loop waits, once per epoch: about half a
    second for 4 workers of a process that holds 8 GiB, against 70 ms for a small one, and the GPU
    idles meanwhile. The fork server is started once, with the main module and this one imported,
    and forks small workers, each sent only the dataset."""
    if start == "default":
        return None
    context = multiprocessing.get_context("forkserver")
    spec = getattr(sys.modules.get("__main__"), "__spec__", None)
    # "__main__" preloads a script run by path; a module run with -m is preloaded by its name.
    context.set_forkserver_preload(["__main__", __name__] + ([spec.name] if spec is not None else []))
    return context


def _distributed() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


class ShardStream(IterableDataset):
    """The per-worker side: reads its slot's shards and yields the planned batches."""

    def __init__(self, shardset: ShardSet, config: DataConfig, train: bool, rank: int, world_size: int,
                 min_input_samples: int = 0):
        self.shardset, self.config, self.train = shardset, config, train
        self.rank, self.world_size = rank, world_size
        self.min_input_samples = min_input_samples  # the model's receptive field: shorter samples are dropped
        self.epoch = 0
        self.skip = 0  # global batches of this epoch already consumed (resume)
        # validation and evaluation are never augmented
        self.augmenter = (Augmenter(config.augment, config.seed, shardset.sample_rate)
                          if train and config.augment.active else None)

    @property
    def workers(self) -> int:
        return max(1, self.config.num_workers)

    def plan(self) -> EpochPlan:
        c = self.config
        speeds_of = None
        if self.augmenter is not None and c.augment.speed:
            def speeds_of(shard: int, count: int, epoch: int = self.epoch) -> list[float]:
                return draw_speeds(c.augment.speed, c.seed, epoch, shard, count)
        return plan_epoch(self.shardset, self.epoch, seed=c.seed, train=self.train, world_size=self.world_size,
                          workers=self.workers, max_tokens=c.max_tokens, max_sample_size=c.max_sample_size,
                          min_sample_size=c.min_sample_size, min_input_samples=self.min_input_samples,
                          shuffle_buffer=c.shuffle_buffer,
                          crop_to_shortest=c.crop_to_shortest, max_batch_size=c.max_batch_size, crop=c.crop,
                          speeds_of=speeds_of)

    def __iter__(self) -> Iterator[AudioBatch]:
        info = get_worker_info()
        plan = self.plan()
        first = self.rank * self.workers
        quotas = plan.quotas[first: first + self.workers]
        taken, next_worker = round_robin(quotas, self.skip)
        # The DataLoader asks its workers in turn from worker 0; after a resume the cycle must go on
        # where it stopped, so DataLoader worker j plays the slot next_worker + j.
        worker = (next_worker + (info.id if info is not None else 0)) % self.workers
        done = taken[worker]
        slot = plan.slots[first + worker]
        end = quotas[worker]
        yield from self._read(plan, slot.shards, slot.batches[done:end], slot.window_ends[done:end])

    def _read(self, plan: EpochPlan, shard_ids: list[int], batches: list[list[Item]],
              window_ends: list[tuple[int, int]]) -> Iterator[AudioBatch]:
        if not batches:
            return
        wanted = {(it.shard, it.position) for batch in batches for it in batch}
        order = {sid: i for i, sid in enumerate(shard_ids)}
        buffer: dict[tuple[int, int], tuple[bytes, bytes, str]] = {}
        corrupt: dict[tuple[int, int], str] = {}
        unlisted: Counter[str] = Counter()  # tar members the index does not know (an index that does not fit)
        next_batch = 0

        def ready(done: tuple[int, int]) -> Iterator[AudioBatch]:
            nonlocal next_batch
            while next_batch < len(batches) and (
                    order[window_ends[next_batch][0]], window_ends[next_batch][1]) <= done:
                batch = self._collate(plan, batches[next_batch], buffer, corrupt)
                batch.metadata["unlisted"] = dict(unlisted)
                unlisted.clear()
                yield batch
                next_batch += 1

        for sid in shard_ids:
            shard = plan.shards[sid]
            if not any((sid, p) in wanted for p in range(len(shard.keys))):
                continue
            positions = {k: p for p, k in enumerate(shard.keys)}
            for sample in self._tar_samples(shard.path):
                pos = positions.get(sample["__key__"])
                if pos is None:
                    unlisted[shard.path] += 1
                    continue
                if (sid, pos) not in wanted:
                    continue
                if "flac" not in sample or "json" not in sample:
                    corrupt[(sid, pos)] = "incomplete sample (flac or json missing)"
                else:
                    buffer[(sid, pos)] = (sample["flac"], sample["json"], shard.path)
                yield from ready((order[sid], pos))
            for pos in range(len(shard.keys)):  # whatever the tar did not hold is missing
                if (sid, pos) in wanted and (sid, pos) not in buffer and (sid, pos) not in corrupt:
                    corrupt[(sid, pos)] = "missing from the shard"
            yield from ready((order[sid], len(shard.keys)))
        yield from ready((len(shard_ids), 0))

    @staticmethod
    def _tar_samples(path: str) -> Iterator[dict]:
        """The samples of one tar file; a damaged tar is read as far as it goes (what it no longer
        holds is reported as missing by the caller)."""

        def handler(exn: Exception) -> bool:
            log.warning("shard %s: %s", path, exn)
            return True  # skip and go on

        pipeline = wds.DataPipeline(wds.SimpleShardList([path]), wds.tarfile_to_samples(handler=handler))
        yield from pipeline

    def _collate(self, plan: EpochPlan, items: list[Item], buffer: dict, corrupt: dict) -> AudioBatch:
        waves, metas, skipped = [], [], []
        for it in items:
            key = plan.shards[it.shard].keys[it.position]
            entry = buffer.pop((it.shard, it.position), None)
            if entry is None:
                skipped.append([key, corrupt.pop((it.shard, it.position), "missing from the shard")])
                continue
            flac, meta, path = entry
            try:
                audio = self._decode(flac, it, plan.epoch, plan)
            except IndexMismatch as e:
                log.warning("skipping sample %s in %s: %s", key, path, e)
                skipped.append([key, f"index mismatch: {e}"])
                continue
            except (sf.LibsndfileError, RuntimeError, ValueError) as e:
                log.warning("skipping corrupt sample %s in %s: %s", key, path, e)
                skipped.append([key, f"undecodable: {e}"])
                continue
            waves.append(audio)
            metas.append({**json.loads(meta), "__key__": key, "__shard__": path})
        batch, lengths = pad_waveforms(waves)
        return AudioBatch(batch, lengths, {"samples": metas, "skipped": skipped})

    def _decode(self, flac: bytes, item: Item, epoch: int, plan: EpochPlan) -> np.ndarray:
        audio, rate = decode_audio(flac)
        if rate != self.shardset.sample_rate:
            raise ValueError(f"sample rate {rate}, the index says {self.shardset.sample_rate}")
        listed = plan.shards[item.shard].lengths[item.position]
        if len(audio) != listed:  # the batch plan (crops, buckets) was made from the index's lengths
            raise IndexMismatch(f"{len(audio)} samples, the index says {listed} (rebuild the index with make-shards)")
        if not np.isfinite(audio).all():
            raise ValueError("NaN or Inf samples")
        audio = change_speed(audio, item.speed, rate)
        if item.start + item.length > len(audio):
            raise ValueError(f"{len(audio)} samples, the index says at least {item.start + item.length}")
        audio = audio[item.start: item.start + item.length]
        if self.augmenter is not None:
            audio = self.augmenter(audio, epoch, item.shard, item.position)
        if self.config.normalize:
            audio = normalize_audio(audio)
        return audio


class AudioLoader:
    """One epoch per ``iter()``; tracks what was consumed so ``state_dict`` can resume exactly.

    ``stats`` counts, for the current epoch (from the resume point, after a resume), the batches
    and samples this rank yielded, the corrupt or missing samples it skipped (``skip_reasons``
    says why), the tar members no index lists, and, over all ranks, the samples the plan dropped
    as too short (or, without cropping, too long) and the batches dropped to keep the ranks even.

    In training, the workers of the next epoch start while the last ``8 x num_workers`` batches of
    the current one are consumed, so an epoch boundary does not stall the step on worker start-up
    and the first tar reads and decoding (on a small corpus, an epoch lasts seconds).
    """

    def __init__(self, stream: ShardStream):
        self.stream = stream
        self.epoch = 0
        self.consumed = 0
        self.stats: dict[str, int] = {}
        self._next: tuple[tuple[int, int], Iterator[AudioBatch]] | None = None  # (epoch, skip), started
        self._warned_crop = False
        self._warned_unlisted: set[str] = set()
        self.skip_reasons: Counter[str] = Counter()  # the current epoch's skipped samples by reason

    @property
    def shardset(self) -> ShardSet:
        return self.stream.shardset

    @property
    def sample_rate(self) -> int:
        """The sample rate of every shard it reads."""
        return self.stream.shardset.sample_rate

    @property
    def seconds_per_batch(self) -> float:
        """The most audio one batch holds, padding included (``data.max_tokens`` in seconds)."""
        return self.stream.config.max_tokens / self.sample_rate

    def __len__(self) -> int:
        """Batches this rank yields in the current epoch."""
        return self._count(self.stream.plan())

    def _count(self, plan: EpochPlan) -> int:
        first = self.stream.rank * self.stream.workers
        return sum(plan.quotas[first: first + self.stream.workers])

    def set_epoch(self, epoch: int) -> None:
        """Start epoch ``epoch`` from its first batch."""
        self.epoch, self.consumed = epoch, 0

    def _start(self, epoch: int, skip: int) -> Iterator[AudioBatch]:
        """The batches of ``epoch`` from its ``skip``-th on; with workers, they start reading now."""
        stream = copy.copy(self.stream)
        stream.epoch, stream.skip = epoch, skip
        workers = stream.config.num_workers
        # Its own generator: starting the workers must not draw from the global RNG, or a resumed
        # run (which starts them at another point) would mask and drop out differently.
        generator = torch.Generator().manual_seed(stream.config.seed * 1000 + epoch)
        # Pinned batches (in the DataLoader's own thread) reach the GPU without the training loop
        # copying them into pinned memory first.
        return iter(DataLoader(stream, batch_size=None, num_workers=workers, generator=generator,
                               prefetch_factor=2 if workers else None, persistent_workers=False,
                               multiprocessing_context=worker_context(stream.config.worker_start) if workers
                               else None,
                               pin_memory=torch.cuda.is_available()))

    def _check_crop(self, plan: EpochPlan) -> None:
        """Warn once when cropping every batch to its shortest utterance discards much audio: the
        batches of each worker are packed from its own shards only, so with few samples per worker
        they mix lengths widely."""
        if self._warned_crop or not (self.stream.train and self.stream.config.crop_to_shortest):
            return
        self._warned_crop = True
        items = [it for slot in plan.slots for batch in slot.batches for it in batch]
        whole = sum(min(speed_length(plan.shards[it.shard].lengths[it.position], it.speed),
                        self.stream.config.max_sample_size) for it in items)
        kept = sum(it.length for it in items) / max(whole, 1)
        if kept < 0.8:
            log.warning("crop_to_shortest keeps %.0f%% of the audio of epoch %d: each of the %d loader slots "
                        "(ranks x workers) packs batches from its own %.1f shards on average; fewer "
                        "data.num_workers, smaller shards (make-shards --max-count) or data.crop_to_shortest=false "
                        "keep more", 100 * kept, self.epoch, len(plan.slots), len(plan.shards) / len(plan.slots))

    def __iter__(self) -> Iterator[AudioBatch]:
        self.stream.epoch, self.stream.skip = self.epoch, self.consumed
        plan = self.stream.plan()
        self._check_crop(plan)
        self.stats = {"batches": self.consumed, "dropped_short": plan.dropped_short, "dropped_long": plan.dropped_long,
                      "dropped_for_balance": plan.dropped_for_balance, "corrupt": 0, "samples": 0, "unlisted": 0}
        self.skip_reasons = Counter()
        started, self._next = self._next, None
        batches = started[1] if started and started[0] == (self.epoch, self.consumed) else self._start(
            self.epoch, self.consumed)
        del started  # a stale prefetch (after set_epoch or a resume) shuts its workers down
        workers, total = self.stream.config.num_workers, self._count(plan)
        for batch in batches:
            self.consumed += 1
            self.stats["batches"] += 1
            self.stats["corrupt"] += len(batch.metadata["skipped"])
            self.stats["samples"] += len(batch.lengths)
            self.skip_reasons.update(reason.split(":")[0] for _, reason in batch.metadata["skipped"])
            for path, count in batch.metadata.get("unlisted", {}).items():
                self.stats["unlisted"] += count
                if path not in self._warned_unlisted:
                    self._warned_unlisted.add(path)
                    log.warning("shard %s holds samples its index.json does not list: they are not read "
                                "(rebuild the shard set with make-shards)", path)
            if self.stream.train and workers and total - self.consumed == min(8 * workers, total - 1):
                self._next = ((self.epoch + 1, 0), self._start(self.epoch + 1, 0))
            yield batch
        self.epoch, self.consumed = self.epoch + 1, 0

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "consumed": self.consumed, "seed": self.stream.config.seed,
                "fingerprint": self.stream.shardset.fingerprint()}

    def load_state_dict(self, state: dict) -> None:
        same = (state.get("fingerprint") == self.stream.shardset.fingerprint()
                and state.get("seed") == self.stream.config.seed)
        if not same:
            raise ValueError("the saved loader state belongs to another shard set or seed")
        self.epoch, self.consumed = int(state["epoch"]), int(state["consumed"])


def make_loader(config: DataConfig, train: bool, rank: int | None = None,
                world_size: int | None = None, min_input_samples: int = 0) -> AudioLoader:
    """A loader for this process's rank (from torch.distributed unless given). Samples shorter
    than ``min_input_samples`` (the model's receptive field) are dropped and counted."""
    if rank is None or world_size is None:
        rank, world_size = _distributed()
    if not config.shards:
        raise ValueError("data.shards: no shard directory or pattern given")
    return AudioLoader(ShardStream(ShardSet(config.shards, config.weights), config, train, rank, world_size,
                                   min_input_samples))
