"""Cross-domain evaluation: for every protocol ``query domain -> gallery domain``,

* per-image ReID: each query-domain image against every gallery-domain image (CMC top-1/5/10/20, mAP), through
  :func:`sapiensid.metrics.evaluate_reid` (cameras ignored: the two sides are different domains already);
* template 1:N identification: all images of a subject in the query domain averaged into one probe template,
  all its gallery-domain images into one gallery template (mean of the L2-normalised features), cosine
  ranking; rank-1/5 over the probes whose subject has a gallery template.

Protocols are written ``"vis->ir"``; a domain the dataset does not have is an error that lists the known ones.
Results: a dict (``write_report`` puts it in ``finetune_eval.json`` and a markdown table).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from sapiensid.finetune.data import DomainDataset, InputCache, KeypointFn
from sapiensid.finetune.features import embed
from sapiensid.metrics import ReIDSet, evaluate_reid


def parse_protocol(text: str, domains: Sequence[str]) -> tuple[str, str]:
    if "->" not in text:
        raise ValueError(f"protocol {text!r} must read 'QUERY_DOMAIN->GALLERY_DOMAIN'")
    q, g = (s.strip() for s in text.split("->", 1))
    for d in (q, g):
        if d not in domains:
            raise ValueError(f"protocol {text!r}: unknown domain {d!r}; the evaluation set has {list(domains)}")
    if q == g:
        raise ValueError(f"protocol {text!r}: query and gallery domain are the same")
    return q, g


def all_cross_protocols(domains: Sequence[str]) -> list[str]:
    return [f"{q}->{g}" for q in domains for g in domains if q != g]


@torch.no_grad()
def dataset_features(model: nn.Module, dataset: DomainDataset, device: torch.device | str = "cpu",
                     kind: str = "global", batch_size: int = 64, keypoint_fn: KeypointFn | None = None,
                     flip: bool = True) -> np.ndarray:
    device = torch.device(device)
    model.eval()
    size = _input_size(model)
    cache = InputCache(dataset, size, keypoint_fn, cache=False)
    out = []
    for start in range(0, len(dataset), batch_size):
        imgs, masks, kps = cache.batch(range(start, min(len(dataset), start + batch_size)))
        x = torch.from_numpy(imgs).to(device).permute(0, 3, 1, 2).float().div_(127.5).sub_(1.0)
        out.append(embed(model, x, torch.from_numpy(masks).to(device), torch.from_numpy(kps).to(device), kind,
                         flip).cpu().numpy())
    return np.concatenate(out)


def _input_size(model: nn.Module) -> int:
    for m in model.modules():
        cfg = getattr(m, "config", None)
        if cfg is not None and hasattr(cfg, "input_size"):
            return int(cfg.input_size)
    raise ValueError("cannot find the model's input size")


def _templates(feats: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    ids = np.unique(labels)
    t = np.stack([feats[labels == i].mean(axis=0) for i in ids])
    return t / np.maximum(np.linalg.norm(t, axis=1, keepdims=True), 1e-12), ids


def template_identification(qf: np.ndarray, ql: np.ndarray, gf: np.ndarray, gl: np.ndarray,
                            ranks: Sequence[int] = (1, 5)) -> dict[str, float]:
    pt, pid = _templates(qf, ql)
    gt, gid = _templates(gf, gl)
    keep = np.isin(pid, gid)
    out: dict[str, float] = {"num_probes": int(keep.sum()), "num_gallery_templates": int(len(gid))}
    if not keep.any():
        return {**out, **{f"rank{r}": float("nan") for r in ranks}}
    sim = pt[keep] @ gt.T
    order = np.argsort(-sim, axis=1, kind="stable")
    hit_pos = np.argmax(gid[order] == pid[keep][:, None], axis=1)
    for r in ranks:
        out[f"rank{r}"] = float(100.0 * np.mean(hit_pos < r))
    return out


def evaluate_features(feats: np.ndarray, dataset: DomainDataset, protocols: Sequence[str]) -> dict[str, Any]:
    results: dict[str, Any] = {}
    for text in protocols:
        q, g = parse_protocol(text, dataset.domains)
        qm = dataset.domain_ids == dataset.domain_index(q)
        gm = dataset.domain_ids == dataset.domain_index(g)
        minus = np.full(int(qm.sum()), -1)
        qs = ReIDSet(feats[qm], dataset.labels[qm], minus, item_ids=np.flatnonzero(qm))
        gs = ReIDSet(feats[gm], dataset.labels[gm], np.full(int(gm.sum()), -1), item_ids=np.flatnonzero(gm))
        results[text] = {
            "image": evaluate_reid(qs, gs, "general"),
            "template": template_identification(feats[qm], dataset.labels[qm], feats[gm], dataset.labels[gm]),
        }
    return results


def evaluate_cross_domain(model: nn.Module, dataset: DomainDataset, protocols: Sequence[str] | None = None,
                          kinds: Sequence[str] = ("global",), device: torch.device | str = "cpu",
                          batch_size: int = 64, keypoint_fn: KeypointFn | None = None) -> dict[str, Any]:
    """``{feature kind: {protocol: {"image": CMC/mAP, "template": rank-1/5}}}``; protocols default: all pairs."""
    protocols = list(protocols) if protocols else all_cross_protocols(dataset.domains)
    for text in protocols:  # fail on a bad protocol before any embedding work
        parse_protocol(text, dataset.domains)
    return {kind: evaluate_features(dataset_features(model, dataset, device, kind, batch_size, keypoint_fn),
                                    dataset, protocols) for kind in kinds}


def markdown_table(results: dict[str, Any]) -> str:
    lines = ["| features | protocol | top-1 | top-5 | top-10 | mAP | template rank-1 | template rank-5 | queries |",
             "|---|---|---|---|---|---|---|---|---|"]
    for kind, per in results.items():
        for proto, r in per.items():
            i, t = r["image"], r["template"]
            lines.append(f"| {kind} | {proto} | {i['top1']:.2f} | {i['top5']:.2f} | {i['top10']:.2f} | "
                         f"{i['mAP']:.2f} | {t['rank1']:.2f} | {t['rank5']:.2f} | {i['num_valid_query']} |")
    return "\n".join(lines) + "\n"


def write_report(results: dict[str, Any], out_dir: str | Path, meta: dict[str, Any] | None = None) -> tuple[Path, Path]:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    jp, mp = out / "finetune_eval.json", out / "finetune_eval.md"
    jp.write_text(json.dumps({"meta": meta or {}, "results": results}, indent=2, default=float))
    mp.write_text("# Cross-domain evaluation\n\n" + markdown_table(results))
    return jp, mp
