"""Deterministic, resumable streaming of training batches from WebBody shards.

Design (why it resumes to the exact step):
- The data is split into *slots*: ``world_size * streams`` of them; slot ``rank * streams + s`` is read by stream
  ``s`` of rank ``rank``. Per epoch the shard list is shuffled with ``(seed, epoch)``; with at least as many shards
  as slots each slot takes every n-th shard, otherwise every slot reads all shards and keeps every n-th sample.
  A seeded shuffle buffer (``(seed, epoch, slot)``) mixes samples within a slot.
- Each stream is infinite (epochs chain without a barrier, so DDP ranks never wait for each other) and runs in its
  own single-worker DataLoader. The trainer takes batches round-robin over the streams, so the j-th batch of
  stream s is global step ``j * streams + s`` on every rank. The batch size and kept-token count of a step are a
  function of ``(seed, step)`` only: identical on all ranks, and the same after a resume.
- Each batch reports the stream position after it (epoch, samples consumed in that epoch). A checkpoint stores the
  positions; a resumed stream regenerates the epoch's order and skips the consumed samples *before* decoding them.
- Augmentation randomness is seeded per sample with ``(seed, epoch, slot, position)``, so it does not depend on
  where a run was interrupted.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset

from sapiensid.data.shards import DecodeError, SkipCounter, decode_sample, iter_raw
from sapiensid.data.transforms import (
    AugmentConfig,
    augment,
    foreground_mask_white,
    normalise_keypoints,
    resize_square,
)
from sapiensid.masking import variable_keep_count

log = logging.getLogger(__name__)


@dataclass
class BatchPlan:
    """Batch size and kept-token count per global step.

    Fixed masking: every step uses ``batch_size`` and ``keep_tokens`` (``None``: the model keeps every valid
    token, no MRM). Variable masking (``variable=(n_total, n_min, lam)``): the kept count is drawn per step by
    :func:`sapiensid.masking.variable_keep_count` (paper eq. 6) and the batch follows the model's memory rule
    ``keep^2 * batch = keep_tokens^2 * batch_size`` (:func:`sapiensid.masking.keep_count_for_batch` inverted),
    clipped to ``[min_batch_size, max_batch_size]``. The trainer scales the learning rate by ``batch / batch_size``.
    """

    batch_size: int
    keep_tokens: int | None = None
    variable: tuple[int, int, float] | None = None
    max_batch_size: int | None = None
    seed: int = 0
    min_batch_size: int = 2  # BatchNorm in the head needs two samples

    def for_step(self, step: int) -> tuple[int, int | None]:
        if self.variable is None or self.keep_tokens is None:
            return self.batch_size, self.keep_tokens
        n_total, n_min, lam = self.variable
        rng = np.random.default_rng((self.seed, 7919, step))
        keep = variable_keep_count(int(n_total), int(n_min), float(lam), rng)
        batch = max(self.min_batch_size, int(round(self.batch_size * (self.keep_tokens / keep) ** 2)))
        if self.max_batch_size is not None:
            batch = min(batch, self.max_batch_size)
        return batch, keep


@dataclass
class StreamPosition:
    epoch: int = 0
    offset: int = 0  # raw samples consumed in `epoch` by this stream
    batches: int = 0  # batches this stream has delivered in total


@dataclass
class StreamSpec:
    urls: list[str]
    image_size: int
    plan: BatchPlan
    augment: AugmentConfig | None = field(default_factory=AugmentConfig)
    shuffle_buffer: int = 1000
    seed: int = 0
    num_classes: int | None = None


def _slot_shards(urls: list[str], epoch: int, slot: int, n_slots: int, seed: int) -> tuple[list[str], bool]:
    """This slot's shards for `epoch`, and whether samples must be strided (fewer shards than slots)."""
    order = list(np.random.default_rng((seed, epoch)).permutation(len(urls)))
    shuffled = [urls[i] for i in order]
    if len(urls) >= n_slots:
        return shuffled[slot::n_slots], False
    return shuffled, True


def _shuffled(src: Iterator[dict], size: int, rng: np.random.Generator) -> Iterator[dict]:
    buf: list[dict] = []
    for item in src:
        if len(buf) < size:
            buf.append(item)
            continue
        i = int(rng.integers(len(buf)))
        yield buf[i]
        buf[i] = item
    for i in rng.permutation(len(buf)):
        yield buf[i]


class ShardStream(IterableDataset):
    """One infinite stream of training batches (see the module docstring)."""

    def __init__(self, spec: StreamSpec, stream: int, streams: int, rank: int, world: int, start: StreamPosition):
        super().__init__()
        self.spec = spec
        self.stream = stream
        self.streams = streams
        self.slot = rank * streams + stream
        self.n_slots = world * streams
        self.start = start

    def _epoch_samples(self, epoch: int) -> Iterator[dict]:
        spec = self.spec
        shards, strided = _slot_shards(spec.urls, epoch, self.slot, self.n_slots, spec.seed)
        raw: Iterator[dict] = iter_raw(shards)
        if strided:
            raw = (s for i, s in enumerate(raw) if i % self.n_slots == self.slot)
        rng = np.random.default_rng((spec.seed, epoch, self.slot, 1))
        return _shuffled(raw, spec.shuffle_buffer, rng) if spec.shuffle_buffer > 1 else raw

    def _make_item(self, raw: dict, epoch: int, offset: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
        spec = self.spec
        dec = decode_sample(raw)
        if spec.num_classes is not None and not 0 <= dec.class_id < spec.num_classes:
            raise DecodeError(f"{raw.get('__key__')}: class_id {dec.class_id} outside [0, {spec.num_classes})")
        rng = np.random.default_rng((spec.seed, epoch, self.slot, offset))
        if spec.augment is not None:
            img, pts = augment(dec.image, dec.points, spec.image_size, rng, spec.augment, dec.meta)
        else:
            img, pts = resize_square(dec.image, dec.points, spec.image_size)
        mask = foreground_mask_white(img)
        return img, mask, normalise_keypoints(pts, spec.image_size), dec.class_id

    def __iter__(self) -> Iterator[dict[str, Any]]:
        epoch, offset, j = self.start.epoch, self.start.offset, self.start.batches
        skips = SkipCounter()
        it = self._epoch_samples(epoch)
        for _ in range(offset):  # resume: replay the order, drop consumed samples undecoded
            if next(it, None) is None:
                break
        produced_in_epoch = offset > 0
        while True:
            step = j * self.streams + self.stream
            size, keep = self.spec.plan.for_step(step)
            items = []
            skipped_before = skips.total
            while len(items) < size:
                raw = next(it, None)
                if raw is None:
                    if not produced_in_epoch:
                        raise RuntimeError(
                            f"stream slot {self.slot} of {self.n_slots} got no samples in epoch {epoch}: "
                            "too few samples or shards for this many ranks x loader workers"
                        )
                    epoch, offset, produced_in_epoch = epoch + 1, 0, False
                    it = self._epoch_samples(epoch)
                    continue
                offset += 1
                produced_in_epoch = True
                try:
                    items.append(self._make_item(raw, epoch, offset - 1))
                except DecodeError as exc:
                    skips.skip("decode_error", str(exc))
            yield {
                "images": torch.from_numpy(np.stack([it_[0] for it_ in items])),  # (B, H, W, 3) uint8
                "masks": torch.from_numpy(np.stack([it_[1] for it_ in items])),
                "ldmks": torch.from_numpy(np.stack([it_[2] for it_ in items])),
                "labels": torch.tensor([it_[3] for it_ in items], dtype=torch.long),
                "n_keep": keep,
                "step": step,
                "stream": self.stream,
                "position": (epoch, offset, j + 1),
                "skipped": skips.total - skipped_before,
            }
            j += 1


def to_model_inputs(batch: dict[str, Any], device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """uint8 HWC images -> float (B, 3, H, W) in [-1, 1]; masks and keypoints moved to `device`."""
    images = batch["images"].to(device, non_blocking=True).permute(0, 3, 1, 2).float().div_(127.5).sub_(1.0)
    return images, batch["masks"].to(device), batch["ldmks"].to(device)


class StreamLoader:
    """Round-robin over `streams` ShardStreams, each in its own worker process (or in-process when
    `workers=0`). `state_dict()` / `load_state_dict()` give exact resume."""

    def __init__(self, spec: StreamSpec, workers: int = 0, rank: int = 0, world: int = 1, prefetch: int = 2):
        self.spec = spec
        self.workers = workers
        self.streams = max(1, workers)
        self.rank, self.world = rank, world
        self.prefetch = prefetch
        self.positions = [StreamPosition() for _ in range(self.streams)]
        self.next_stream = 0
        self.skipped = 0
        self._iters: list[Iterator] | None = None

    def _open(self) -> None:
        self._iters = []
        for s in range(self.streams):
            ds = ShardStream(self.spec, s, self.streams, self.rank, self.world, self.positions[s])
            if self.workers > 0:
                # forkserver, not fork: the trainer's process may already run native threads (Ray's gRPC,
                # fsspec's IO loop, OpenVINO/TBB pools), and forking such a process can abort it.
                dl = DataLoader(ds, batch_size=None, num_workers=1, prefetch_factor=self.prefetch,
                                persistent_workers=False, multiprocessing_context="forkserver")
                self._iters.append(iter(dl))
            else:
                self._iters.append(iter(ds))

    def __iter__(self) -> StreamLoader:
        return self

    def __next__(self) -> dict[str, Any]:
        if self._iters is None:
            self._open()
        assert self._iters is not None
        s = self.next_stream
        batch = next(self._iters[s])
        epoch, offset, batches = batch["position"]
        self.positions[s] = StreamPosition(epoch, offset, batches)
        self.next_stream = (s + 1) % self.streams
        self.skipped += batch["skipped"]
        return batch

    def state_dict(self) -> dict[str, Any]:
        return {
            "streams": self.streams,
            "world": self.world,
            "positions": [(p.epoch, p.offset, p.batches) for p in self.positions],
            "next_stream": self.next_stream,
            "skipped": self.skipped,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state["streams"] != self.streams or state["world"] != self.world:
            raise ValueError(
                f"checkpoint was written with {state['streams']} loader streams x {state['world']} ranks; "
                f"this run has {self.streams} x {self.world}. Resume with the same data.num_workers and world size."
            )
        self.positions = [StreamPosition(*p) for p in state["positions"]]
        self.next_stream = state["next_stream"]
        self.skipped = state.get("skipped", 0)
        self._iters = None  # reopen from the restored positions

    @property
    def epoch(self) -> float:
        return float(min(p.epoch for p in self.positions))

    def close(self) -> None:
        self._iters = None
