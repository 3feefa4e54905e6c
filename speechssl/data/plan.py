"""Epoch plans: which samples form which batch, on which rank and worker, from metadata alone.

Everything here reads only the shard index (keys and lengths), so every rank computes the plans
of all ranks identically, without communication: each rank then yields exactly the same number of
batches (the smallest rank's count; the excess is dropped and counted) and a restored loader can
skip exactly the batches already consumed.

Training: a seeded shuffle of the shards each epoch, shards dealt to ``ranks x workers`` slots by
sample count, samples shorter than ``min_sample_size`` dropped (and, without cropping, those
longer than ``max_sample_size``), the stream cut into windows of
``shuffle_buffer`` samples that are shuffled, sorted by (cropped) length and packed into batches
under ``max_tokens`` padded samples, batch order shuffled within the window. Evaluation: no
shuffle, no crop, no drop.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from speechssl.data.augment import speed_length
from speechssl.data.shardset import Shard, ShardSet


@dataclass(frozen=True)
class Item:
    """Sample ``position`` of epoch shard ``shard``, played ``speed`` times as fast (speed
    perturbation), then read from ``start`` for ``length`` samples of the perturbed audio."""

    shard: int
    position: int
    start: int
    length: int
    speed: float = 1.0


@dataclass
class SlotPlan:
    """The shards one (rank, worker) reads, in order, and its batches; ``window[i]`` is the window
    of batch ``i`` (all its samples have been read once the window's last shard position is)."""

    shards: list[int]
    batches: list[list[Item]] = field(default_factory=list)
    window_ends: list[tuple[int, int]] = field(default_factory=list)  # per batch: (shard, position) read last
    dropped_short: int = 0
    dropped_long: int = 0


def epoch_shards(shardset: ShardSet, epoch: int, seed: int, shuffle: bool) -> list[Shard]:
    """The shards of one epoch: weights applied (2 = twice, 0.5 = a seeded half), then shuffled."""
    rng = np.random.default_rng([seed, epoch, 0])
    shards: list[Shard] = []
    for weight, source in zip(shardset.weights, shardset.shards, strict=True):
        whole = int(weight)
        shards.extend(source * whole)
        part = round((weight - whole) * len(source))
        if part:
            picked = np.sort(rng.choice(len(source), size=part, replace=False))
            shards.extend(source[i] for i in picked)
    if shuffle:
        shards = [shards[i] for i in rng.permutation(len(shards))]
    return shards


def _least_loaded(items: list[int], weights: list[int], bins: int) -> list[list[int]]:
    load = [0] * bins
    out: list[list[int]] = [[] for _ in range(bins)]
    for i in items:
        b = min(range(bins), key=lambda k: (load[k], k))
        out[b].append(i)
        load[b] += weights[i]
    return out


def deal(shards: list[Shard], world_size: int, workers: int) -> list[list[int]]:
    """Deal shards to ranks, then each rank's to its workers, each to the one with the fewest samples
    so far (ties: the lowest). Returns the shard ids of slot ``rank * workers + worker``."""
    sizes = [len(s.keys) for s in shards]
    slots = []
    for rank_shards in _least_loaded(list(range(len(shards))), sizes, world_size):
        slots.extend(_least_loaded(rank_shards, sizes, workers))
    return slots


def plan_slot(shards: list[Shard], shard_ids: list[int], *, train: bool, max_tokens: int, max_sample_size: int,
              min_sample_size: int, shuffle_buffer: int, crop_to_shortest: bool, max_batch_size: int,
              min_input_samples: int = 0, rng: np.random.Generator, crop: bool = True,
              speeds_of: Callable[[int, int], list[float]] | None = None) -> SlotPlan:
    """``crop``: training samples longer than ``max_sample_size`` are randomly cropped to it;
    without (labelled data), they are dropped and counted. ``speeds_of(shard, count)``: the speed
    perturbation of each training sample of a shard (lengths, limits and crops are those after it)."""
    plan = SlotPlan(list(shard_ids))
    stream = []
    speeds: dict[tuple[int, int], float] = {}
    for sid in shard_ids:
        factors = speeds_of(sid, len(shards[sid].lengths)) if train and speeds_of is not None else None
        for pos, length in enumerate(shards[sid].lengths):
            if factors is not None:
                speeds[sid, pos] = factors[pos]
                length = speed_length(length, factors[pos])
            if length < min_input_samples or (train and length < min_sample_size):
                plan.dropped_short += 1
                continue
            if train and not crop and length > max_sample_size:
                plan.dropped_long += 1
                continue
            stream.append((sid, pos, length))
    for begin in range(0, len(stream), max(1, shuffle_buffer)):
        window = stream[begin: begin + max(1, shuffle_buffer)]
        last = (window[-1][0], window[-1][1])
        if train:
            window = [window[i] for i in rng.permutation(len(window))]
        sizes = [min(length, max_sample_size) if train else length for _, _, length in window]
        order = sorted(range(len(window)), key=lambda i: sizes[i])  # stable: deterministic
        batches: list[list[int]] = []
        current: list[int] = []
        for i in order:
            candidate = [*current, i]
            width = sizes[candidate[0]] if (train and crop_to_shortest) else sizes[i]
            too_many = max_batch_size and len(candidate) > max_batch_size
            if current and (len(candidate) * width > max_tokens or too_many):
                batches.append(current)
                candidate = [i]
            current = candidate
        if current:
            batches.append(current)
        if train:
            batches = [batches[i] for i in rng.permutation(len(batches))]
        for batch in batches:
            width = min(sizes[i] for i in batch) if (train and crop_to_shortest) else None
            items = []
            for i in batch:
                sid, pos, length = window[i]
                size = width if width is not None else sizes[i]
                start = int(rng.integers(0, length - size + 1)) if train and size < length else 0
                items.append(Item(sid, pos, start, size, speeds.get((sid, pos), 1.0)))
            plan.batches.append(items)
            plan.window_ends.append(last)
    return plan


def round_robin(capacities: list[int], total: int) -> tuple[list[int], int]:
    """A DataLoader takes batches from its workers in turn, skipping exhausted ones. After it has
    taken ``total``, how many came from each worker, and which worker is next in the cycle."""
    taken = [0] * len(capacities)
    remaining = min(total, sum(capacities))
    next_worker = 0
    while remaining:
        w = next_worker
        next_worker = (w + 1) % len(capacities)
        if taken[w] < capacities[w]:
            taken[w] += 1
            remaining -= 1
    return taken, next_worker


@dataclass
class EpochPlan:
    epoch: int
    shards: list[Shard]
    slots: list[SlotPlan]             # index rank * workers + worker
    quotas: list[int]                 # batches each slot yields
    batches_per_rank: int
    dropped_short: int
    dropped_long: int
    dropped_for_balance: int          # batches (all ranks) cut so every rank yields the same count


def plan_epoch(shardset: ShardSet, epoch: int, *, seed: int, train: bool, world_size: int, workers: int,
               max_tokens: int, max_sample_size: int, min_sample_size: int, shuffle_buffer: int,
               crop_to_shortest: bool, max_batch_size: int, crop: bool = True, min_input_samples: int = 0,
               speeds_of: Callable[[int, int], list[float]] | None = None) -> EpochPlan:
    """``speeds_of(shard, count)``: the speed perturbation of the training samples of an epoch shard.
    ``min_input_samples``: shorter samples (after speed perturbation) are dropped in training and
    validation alike, and counted in ``dropped_short``: the model gives them no frame."""
    shards = epoch_shards(shardset, epoch, seed, shuffle=train)
    slots = []
    for slot, ids in enumerate(deal(shards, world_size, workers)):
        rng = np.random.default_rng([seed, epoch, 1, slot])
        slots.append(plan_slot(shards, ids, train=train, max_tokens=max_tokens, max_sample_size=max_sample_size,
                               min_sample_size=min_sample_size, min_input_samples=min_input_samples,
                               shuffle_buffer=shuffle_buffer,
                               crop_to_shortest=crop_to_shortest, max_batch_size=max_batch_size, rng=rng,
                               crop=crop, speeds_of=speeds_of))
    counts = [[len(slots[r * workers + w].batches) for w in range(workers)] for r in range(world_size)]
    totals = [sum(c) for c in counts]
    if train and min(totals) == 0:
        raise ValueError(f"rank {totals.index(0)} of {world_size} gets no training batch this epoch: "
                         f"{len(shards)} shard(s) for {world_size} rank(s); write more, smaller shards "
                         "(make-shards --max-count) or lower min_sample_size")
    per_rank = min(totals) if train else None
    quotas = []
    for r in range(world_size):
        quotas.extend(round_robin(counts[r], per_rank)[0] if train else counts[r])
    return EpochPlan(
        epoch=epoch, shards=shards, slots=slots, quotas=quotas,
        batches_per_rank=per_rank if per_rank is not None else max(totals),
        dropped_short=sum(s.dropped_short for s in slots),
        dropped_long=sum(s.dropped_long for s in slots),
        dropped_for_balance=sum(totals) - sum(quotas),
    )
