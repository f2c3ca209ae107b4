"""Evaluate a SapiensID checkpoint: ReID (CMC top-1/5/10/20, mAP; general / same-clothes / clothes-changing),
face verification (10-fold accuracy on insightface `.bin` sets) and the WebBody-test split of our shards.

Embeddings use horizontal-flip TTA: ``normalize(f(x) + f(flip x))``. Each image is embedded independently of its
batch neighbours (the model masks padding tokens). Results are written as JSON and as a markdown table.

Memory: WebBody shards are embedded while they stream (decode -> prepare -> embed one batch at a time); only the
features and a few metadata fields per sample stay, never the decoded images, so memory does not grow with the
test set beyond N x D floats (``benchmarks/eval_memory.py``). Folder sets are read lazily by path, the same way.

Keypoints: shard samples carry theirs. Folder datasets have none unless a ``keypoint_fn(image) -> (22, 2)``
pixel-keypoint function is given (the flows pass the pipeline's pose + face detectors when available); without
keypoints the model sees only whole-image tokens.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch
from torch import nn

from sapiensid.data import expand_urls, foreground_mask_white, normalise_keypoints, square_pad_resize
from sapiensid.data.shards import SkipCounter, iter_decoded
from sapiensid.metrics import ReIDSet, evaluate_reid
from sapiensid.model import embed_with_flip
from sapiensid.reid_datasets import LOADERS, EvalItem, ReIDSplit, webbody_query_gallery
from sapiensid.verification import face_to_body_input, load_bin, pair_distances, ten_fold_accuracy

log = logging.getLogger(__name__)

KeypointFn = Callable[[np.ndarray], np.ndarray]


@dataclass
class DatasetSpec:
    """One evaluation set. kind: market1501 | ltcc | prcc | webbody_shards | verification_bin."""

    name: str
    kind: str
    path: str | list[str]
    split: str = "test"  # for webbody_shards directories

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> DatasetSpec:
        return cls(**d)


def _read_item(item: EvalItem) -> tuple[np.ndarray, np.ndarray | None]:
    if item.image is not None:
        return item.image, item.points
    bgr = cv2.imread(str(item.path), cv2.IMREAD_COLOR)
    if bgr is None:
        raise ValueError(f"{item.path}: image does not decode")
    return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB), None


def prepare_input(
    image: np.ndarray, points: np.ndarray | None, size: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """White square pad + resize; returns (image uint8 S x S x 3, mask S x S, keypoints (22, 2) in [0, 1])."""
    pts = points if points is not None else np.full((22, 2), -1.0, np.float32)
    img, px = square_pad_resize(image, pts, size)
    return img, foreground_mask_white(img), normalise_keypoints(px, size)


@torch.no_grad()
def embed_arrays(
    model: nn.Module,
    batches: Iterable[tuple[np.ndarray, np.ndarray, np.ndarray]],
    device: torch.device,
    flip: bool = True,
) -> np.ndarray:
    """Embeddings (N, D), L2-normalised, of batches of (images uint8 BxSxSx3, masks BxSxS, ldmks Bx22x2)."""
    model.eval()
    out = []
    for imgs, masks, ldmks in batches:
        x = torch.from_numpy(imgs).to(device).permute(0, 3, 1, 2).float().div_(127.5).sub_(1.0)
        m = torch.from_numpy(masks).to(device)
        k = torch.from_numpy(ldmks).to(device)
        if flip:
            e = embed_with_flip(model, x, m, k)
        else:
            e = torch.nn.functional.normalize(model(x, m, k), dim=1)
        out.append(e.float().cpu().numpy())
    dim = getattr(model, "output_dim", 0)
    return np.concatenate(out) if out else np.zeros((0, dim), np.float32)


def _batched(items: Sequence[EvalItem], size: int, batch_size: int, keypoint_fn: KeypointFn | None):
    for start in range(0, len(items), batch_size):
        chunk = [_read_item(it) for it in items[start : start + batch_size]]
        prepared = []
        for img, pts in chunk:
            if pts is None and keypoint_fn is not None:
                pts = keypoint_fn(img)
            prepared.append(prepare_input(img, pts, size))
        yield tuple(np.stack(a) for a in zip(*prepared))


def embed_items(model: nn.Module, items: Sequence[EvalItem], device: torch.device, batch_size: int = 32,
                flip: bool = True, keypoint_fn: KeypointFn | None = None) -> np.ndarray:
    size = model.config.input_size  # type: ignore[union-attr]
    return embed_arrays(model, _batched(items, size, batch_size, keypoint_fn), device, flip)


def _reid_set(items: list[EvalItem], feats: np.ndarray) -> ReIDSet:
    clothes = None if any(it.clothes is None for it in items) else np.array([it.clothes for it in items])
    return ReIDSet(feats, np.array([it.pid for it in items]), np.array([it.camid for it in items]), clothes,
                   np.array([it.item_id for it in items]))


def _block(n_gallery: int) -> int:
    """Queries per similarity block, so one block (and its argsort) stays ~64 MB whatever the gallery size."""
    return max(1, min(1024, (16 << 20) // max(1, n_gallery)))


def evaluate_split(model: nn.Module, split: ReIDSplit, device: torch.device, batch_size: int = 32,
                   flip: bool = True, keypoint_fn: KeypointFn | None = None) -> dict[str, Any]:
    t0 = time.time()
    qf = embed_items(model, split.query, device, batch_size, flip, keypoint_fn)
    gf = embed_items(model, split.gallery, device, batch_size, flip, keypoint_fn)
    q, g = _reid_set(split.query, qf), _reid_set(split.gallery, gf)
    res: dict[str, Any] = {p: evaluate_reid(q, g, p, block=_block(len(g.features))) for p in split.protocols}
    res["num_query_images"], res["num_gallery_images"] = len(split.query), len(split.gallery)
    res["seconds"] = round(time.time() - t0, 2)
    res.update(split.notes)
    return res


def evaluate_verification(model: nn.Module, path: str | Path, device: torch.device, batch_size: int = 32,
                          flip: bool = True) -> dict[str, Any]:
    images, issame = load_bin(path)
    size = model.config.input_size  # type: ignore[union-attr]

    def batches():
        for start in range(0, len(images), batch_size):
            prepared = []
            for face in images[start : start + batch_size]:
                img, ldmks = face_to_body_input(face, size)
                prepared.append((img, np.ones((size, size), bool), ldmks))
            yield tuple(np.stack(a) for a in zip(*prepared))

    emb = embed_arrays(model, batches(), device, flip)
    return {"verification": ten_fold_accuracy(pair_distances(emb), issame)}


def embed_shard_stream(model: nn.Module, urls: list[str], device: torch.device, batch_size: int = 32,
                       flip: bool = True) -> tuple[np.ndarray, dict[str, list], SkipCounter]:
    """Embed every decodable sample of `urls` (any URL `sapiensid.data` opens: local, s3://, pipe:, ...) as it
    streams. Returns (features (N, D), per-sample labels / keys / roles, skips); no image outlives its batch."""
    size = model.config.input_size  # type: ignore[union-attr]
    skips = SkipCounter()
    meta: dict[str, list] = {"labels": [], "keys": [], "roles": []}

    def batches():
        chunk: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
        for s in iter_decoded(urls, skips):
            chunk.append(prepare_input(s.image, s.points, size))  # the decoded image is dropped here
            meta["labels"].append(s.class_id)
            meta["keys"].append(s.meta["key"])
            meta["roles"].append(s.meta.get("role"))
            if len(chunk) == batch_size:
                yield tuple(np.stack(a) for a in zip(*chunk))
                chunk = []
        if chunk:
            yield tuple(np.stack(a) for a in zip(*chunk))

    return embed_arrays(model, batches(), device, flip), meta, skips


def evaluate_webbody_shards(model: nn.Module, urls: list[str], device: torch.device, batch_size: int = 32,
                            flip: bool = True) -> dict[str, Any]:
    """ReID on WebBody-test shards, streamed (see the module docstring): features only, then query/gallery."""
    t0 = time.time()
    feats, meta, skips = embed_shard_stream(model, urls, device, batch_size, flip)
    roles = webbody_query_gallery(meta["labels"], meta["keys"], meta["roles"])
    labels, keys = np.array(meta["labels"], np.int64), np.array(meta["keys"], dtype=object)

    def subset(idx: list[int]) -> ReIDSet:
        ix = np.array(idx, np.int64)
        return ReIDSet(feats[ix], labels[ix], np.full(len(ix), -1), None, keys[ix])

    q, g = subset(roles.query), subset(roles.gallery)
    res: dict[str, Any] = {"general": evaluate_reid(q, g, "general", block=_block(len(roles.gallery)))}
    res["num_query_images"], res["num_gallery_images"] = len(roles.query), len(roles.gallery)
    res["seconds"] = round(time.time() - t0, 2)
    res.update({"skipped_samples": skips.total, **roles.notes})
    return res


def load_dataset(spec: DatasetSpec) -> list[ReIDSplit]:
    """Folder datasets as query/gallery item lists (images read lazily by path). WebBody shards are not loaded
    as a list: `evaluate_model` streams them (`evaluate_webbody_shards`)."""
    if spec.kind == "webbody_shards":
        raise ValueError("webbody_shards are streamed, not loaded: use evaluate_model / evaluate_webbody_shards")
    if spec.kind in LOADERS:
        splits = LOADERS[spec.kind](spec.path)  # type: ignore[arg-type]
        if len(splits) == 1:
            splits[0].name = spec.name
        return splits
    raise ValueError(f"unknown dataset kind {spec.kind!r}; use webbody_shards, verification_bin or {sorted(LOADERS)}")


def evaluate_model(model: nn.Module, datasets: Sequence[DatasetSpec], device: torch.device | str = "cpu",
                   batch_size: int = 32, flip: bool = True, keypoint_fn: KeypointFn | None = None) -> dict[str, Any]:
    device = torch.device(device)
    model = model.to(device).eval()
    results: dict[str, Any] = {}
    for spec in datasets:
        if spec.kind == "verification_bin":
            results[spec.name] = evaluate_verification(model, spec.path, device, batch_size, flip)  # type: ignore[arg-type]
            continue
        if spec.kind == "webbody_shards":
            urls = expand_urls(spec.path, split=spec.split)
            results[spec.name] = evaluate_webbody_shards(model, urls, device, batch_size, flip)
            continue
        for split in load_dataset(spec):
            results[split.name] = evaluate_split(model, split, device, batch_size, flip, keypoint_fn)
    return results


def markdown_table(results: dict[str, Any]) -> str:
    """One row per dataset x protocol: top-1/5/10/20 and mAP for ReID, accuracy +- std for verification."""
    lines = ["| dataset | protocol | top-1 | top-5 | top-10 | top-20 | mAP | queries |",
             "|---|---|---|---|---|---|---|---|"]
    ver = ["", "| verification set | accuracy (%) | std | pairs |", "|---|---|---|---|"]
    n_ver = 0
    for name, res in results.items():
        if "verification" in res:
            v = res["verification"]
            ver.append(f"| {name} | {v['accuracy']:.2f} | {v['std']:.2f} | {v['num_pairs']} |")
            n_ver += 1
            continue
        for proto, m in res.items():
            if isinstance(m, dict) and "mAP" in m:
                lines.append(
                    f"| {name} | {proto} | {m['top1']:.2f} | {m['top5']:.2f} | {m['top10']:.2f} | {m['top20']:.2f} "
                    f"| {m['mAP']:.2f} | {m['num_valid_query']} |"
                )
    return "\n".join(lines + (ver if n_ver else [])) + "\n"


@dataclass
class EvalReport:
    results: dict[str, Any]
    json_path: Path
    markdown_path: Path
    extra: dict[str, Any] = field(default_factory=dict)


def write_report(results: dict[str, Any], out_dir: str | Path, meta: dict[str, Any] | None = None) -> EvalReport:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    payload = {"meta": meta or {}, "results": results}
    jp, mp = out / "evaluation.json", out / "evaluation.md"
    jp.write_text(json.dumps(payload, indent=2, default=float))
    mp.write_text("# SapiensID evaluation\n\n" + markdown_table(results))
    return EvalReport(results, jp, mp)


def evaluate_checkpoint(checkpoint: str | Path, datasets: Sequence[DatasetSpec], out_dir: str | Path,
                        device: str = "auto", batch_size: int = 32, flip: bool = True,
                        keypoint_fn: KeypointFn | None = None) -> EvalReport:
    """Load a training checkpoint (run dir, step dir or model.pt), evaluate every dataset, write the report."""
    from sapiensid.train import load_trained_model

    dev = torch.device("cuda" if device == "auto" and torch.cuda.is_available() else
                       ("cpu" if device == "auto" else device))
    model = load_trained_model(checkpoint, dev)
    results = evaluate_model(model, datasets, dev, batch_size, flip, keypoint_fn)
    meta = {"checkpoint": str(checkpoint), "flip_tta": flip, "device": str(dev)}
    return write_report(results, out_dir, meta)
