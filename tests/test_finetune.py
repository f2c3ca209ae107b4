"""Fine-tuning (sapiensid/finetune): data layouts, samplers, losses, LoRA, resume, evaluation, bad input."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from sapiensid.checkpoint import CheckpointMismatchError
from sapiensid.config import SapiensIDConfig
from sapiensid.finetune import FinetuneConfig, finetune, load_datasets
from sapiensid.finetune.adapt import apply_lora, base_of, load_base, merge_lora
from sapiensid.finetune.data import read_folder
from sapiensid.finetune.evaluate import (
    evaluate_cross_domain,
    evaluate_features,
    parse_protocol,
    template_identification,
)
from sapiensid.finetune.features import embed
from sapiensid.finetune.llcm import read_llcm
from sapiensid.finetune.losses import batch_hard_triplet
from sapiensid.finetune.samplers import PKSampler
from sapiensid.finetune.synthetic import write_multidomain
from sapiensid.model import SapiensID

REPO = Path(__file__).resolve().parent.parent
TINY = {"input_size": 32}  # 4x4 grid, 48 candidates: fast on a loaded CPU


@pytest.fixture(scope="module")
def small_set(tmp_path_factory):
    root = tmp_path_factory.mktemp("ft_small")
    write_multidomain(root / "train", range(10, 16), 3, ("vis", "ir", "lwir"), size=48)
    write_multidomain(root / "test", range(40, 44), 2, ("vis", "ir", "lwir"), size=48, image_seed=1)
    return root


def _cfg(root, out, **kw) -> FinetuneConfig:
    base = dict(base_model="tiny", model_overrides=TINY, train_root=str(root / "train"), eval_root=str(root / "test"),
                output_dir=str(out), adaptation="lora", lora_rank=4, p=3, k=1, lr=5e-3, warmup_steps=1, max_steps=4,
                ckpt_every=100, threads=1, seed=3)
    base.update(kw)
    return FinetuneConfig(**base)


def test_folder_layout_and_domain_aware_sampler(small_set):
    ds = read_folder(small_set / "train")
    assert ds.domains == ["ir", "lwir", "vis"] and ds.num_classes == 6 and len(ds) == 6 * 3 * 3
    assert all(im.keypoints is not None for im in ds.images)  # from the keypoints.json sidecar
    aware = PKSampler(ds, p=4, k=2, kind="domain_aware", seed=1)
    for step in range(20):
        idx = aware.batch(step)
        assert len(idx) == aware.batch_size == 4 * 2 * 3
        labels, domains = ds.labels[idx], ds.domain_ids[idx]
        for lab in np.unique(labels):
            assert set(domains[labels == lab]) == {0, 1, 2}, (step, lab)  # every domain of every identity
        assert len(np.unique(labels)) == 4
    assert np.array_equal(aware.batch(7), PKSampler(ds, 4, 2, "domain_aware", seed=1).batch(7))  # deterministic
    assert not np.array_equal(aware.batch(7), aware.batch(8))
    rand = PKSampler(ds, p=4, k=2, kind="random", seed=1)
    assert len(rand.batch(0)) == 8
    # random P x K ignores domains: over many batches some identity shows up in a single domain only
    single = 0
    for step in range(20):
        idx = rand.batch(step)
        for lab in np.unique(ds.labels[idx]):
            single += len(set(ds.domain_ids[idx][ds.labels[idx] == lab])) == 1
    assert single > 0


def test_bad_input_is_counted_or_refused(small_set, tmp_path):
    root = tmp_path / "bad"
    shutil.copytree(small_set / "train", root)
    (root / "nir").mkdir()  # an empty domain folder
    with pytest.raises(ValueError, match="'nir' has no images"):
        read_folder(root)
    shutil.rmtree(root / "nir")
    for f in sorted((root / "vis" / "id00010").iterdir()):  # id 10: one image in all
        f.unlink()
    for d in ("ir", "lwir"):
        shutil.rmtree(root / d / "id00010")
    (root / "vis" / "id00010" / "only.jpg").write_bytes((small_set / "train/vis/id00011/000.jpg").read_bytes())
    shutil.rmtree(root / "lwir" / "id00011")  # id 11 lacks a domain
    dropped = read_folder(root)
    assert dropped.report["too_few_images"] == 1 and dropped.report["missing_domain"] == 1
    assert dropped.num_classes == 4
    kept = read_folder(root, missing_domain="keep")
    assert kept.num_classes == 5 and kept.report["missing_domain"] == 1
    # a kept identity without some domain brings the domains it has
    s = PKSampler(kept, p=5, k=1, kind="domain_aware")
    assert len(s.batch(0)) == 4 * 3 + 2
    with pytest.raises(ValueError, match="unknown domain 'swir'"):
        parse_protocol("vis->swir", kept.domains)
    with pytest.raises(ValueError, match="unknown domain 'mwir'"):
        evaluate_cross_domain(SapiensID(SapiensIDConfig.preset("tiny", **TINY)), kept, ["mwir->vis"])
    with pytest.raises(ValueError, match="QUERY_DOMAIN->GALLERY_DOMAIN"):
        parse_protocol("vis", kept.domains)
    with pytest.raises(ValueError, match="missing_domain"):
        read_folder(root, missing_domain="maybe")


def test_checkpoint_of_another_architecture(tmp_path):
    small = SapiensID(SapiensIDConfig.preset("tiny", **TINY))
    torch.save(small.state_dict(), tmp_path / "release.pth")
    with pytest.raises(CheckpointMismatchError, match="shape mismatch"):
        load_base(tmp_path / "release.pth", "small")
    torch.save({"model": small.state_dict(), "model_config": small.config.to_dict()}, tmp_path / "model.pt")
    assert isinstance(load_base(tmp_path / "model.pt", None), SapiensID)
    with pytest.raises(ValueError, match="another architecture"):
        load_base(tmp_path / "model.pt", "small")
    with pytest.raises(ValueError, match="set base_model"):
        load_base(tmp_path / "release.pth", None)
    with pytest.raises(ValueError, match="matches no Linear"):
        apply_lora(small, targets=["attn.nope"])


def test_llcm_adapter_reads_miniature_layout(tmp_path):
    root = tmp_path / "LLCM"
    img = np.full((32, 16, 3), 90, np.uint8)
    lists: dict[str, list[str]] = {"train_vis": [], "train_nir": [], "test_vis": [], "test_nir": []}
    for split, pids in (("train", [1, 2, 3]), ("test", [7, 8])):
        for pid in pids:
            for dom in ("vis", "nir"):
                if split == "train" and pid == 3 and dom == "nir":
                    continue  # a training identity without infrared images
                for cam, frame in ((2, 10), (5, 20)):
                    rel = f"{dom}/{pid:04d}/{pid:04d}_c{cam:02d}_s123456_f{frame}_{dom}.jpg"
                    (root / rel).parent.mkdir(parents=True, exist_ok=True)
                    cv2.imwrite(str(root / rel), img)
                    lists[f"{split}_{dom}"].append(f"{rel} {pid - 1}")
    (root / "idx").mkdir()
    for name, lines in lists.items():
        (root / "idx" / f"{name}.txt").write_text("\n".join(lines) + "\n")
    train = read_llcm(root, "train")
    assert train.domains == ["vis", "nir"] and train.identities == ["0001", "0002"]
    assert train.report["missing_domain_dropped"] == 1 and len(train) == 8
    assert sorted({im.camera for im in train.images}) == [2, 5]
    test = read_llcm(root, "test")
    assert test.identities == ["0007", "0008"] and len(test) == 8
    for mode in ("vis->nir", "nir->vis"):
        parse_protocol(mode, test.domains)
    cfg = FinetuneConfig(data="llcm", train_root=str(root))
    tr, te = load_datasets(cfg)
    assert tr.num_classes == 2 and te is not None and te.num_classes == 2
    (root / "idx" / "test_nir.txt").write_text("nir/0007/x.jpg\n")
    with pytest.raises(ValueError, match="relative/path label"):
        read_llcm(root, "test")


def test_batch_hard_mining_statistics():
    # two identities, two domains; cross-domain positives are far, within-domain negatives close
    emb = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.9, 0.1], [0.1, 0.9]])
    labels = torch.tensor([0, 0, 1, 1])
    domains = torch.tensor([0, 1, 0, 1])
    loss, stats = batch_hard_triplet(emb, labels, domains, margin=0.0)
    assert loss.item() > 0
    assert stats["hard_pos_cross_domain"] == 1.0 and stats["hard_neg_same_domain"] == 1.0
    aligned = torch.tensor([[1.0, 0.0], [0.99, 0.01], [0.0, 1.0], [0.01, 0.99]])
    loss2, stats2 = batch_hard_triplet(aligned, labels, domains, margin=0.0)
    assert loss2.item() == 0.0 and stats2["triplet_active"] == 0.0
    with pytest.raises(ValueError, match="another image of its identity"):
        batch_hard_triplet(emb[:2], torch.tensor([0, 1]), domains[:2])


def test_template_identification_and_per_image_metrics():
    q = np.array([[1.0, 0], [0.8, 0.2], [0, 1.0], [0.2, 0.8]], np.float32)
    g = np.array([[0.9, 0.1], [0.1, 0.9]], np.float32)
    res = template_identification(q, np.array([0, 0, 1, 1]), g, np.array([0, 1]))
    assert res["rank1"] == 100.0 and res["num_probes"] == 2
    swapped = template_identification(q, np.array([1, 1, 0, 0]), g, np.array([0, 1]))
    assert swapped["rank1"] == 0.0 and swapped["rank5"] == 100.0


def test_lora_base_bit_identical_merge_and_resume(small_set, tmp_path):
    cfg = _cfg(small_set, tmp_path / "full_run")
    torch.manual_seed(cfg.seed)
    ref_model = load_base(None, "tiny", TINY)  # what finetune builds from the same seed
    before = {k: v.clone() for k, v in ref_model.state_dict().items()}

    summary = finetune(cfg)
    model = summary["model"]
    assert summary["step"] == 4 and summary["trainable"] < summary["total"] / 50
    base_now = base_of(model).state_dict()
    lora_keys = [k for k in base_now if "lora_" in k]
    assert lora_keys and all("attn.qkv" in k or "attn.proj" in k for k in lora_keys)
    plain = {k.replace(".base_layer", ""): v for k, v in base_now.items() if "lora_" not in k}
    assert set(plain) == set(before)
    assert all(torch.equal(plain[k], before[k]) for k in before), "LoRA changed base weights or statistics"
    assert any(v.abs().sum() > 0 for k, v in base_now.items() if "lora_B" in k)  # adapters did train

    # adapters saved apart; the merged plain checkpoint gives the features of base + adapter
    final = tmp_path / "full_run" / "final"
    assert (final / "adapter" / "adapter_model.safetensors").is_file()
    merged = load_base(final / "model.pt", None)
    test = read_folder(small_set / "test", missing_domain="keep", min_images=1)
    from sapiensid.finetune.data import InputCache

    imgs, masks, kps = InputCache(test, 32).batch(range(len(test)))
    x = torch.from_numpy(imgs).permute(0, 3, 1, 2).float() / 127.5 - 1
    m, k = torch.from_numpy(masks), torch.from_numpy(kps)
    for kind in ("global", "global_parts"):
        a = embed(model, x, m, k, kind)
        b = embed(merged, x, m, k, kind)
        assert a.shape == b.shape and torch.allclose(a, b, atol=1e-5), kind
    assert embed(merged, x, m, k, "global_parts").shape[1] == merged.output_dim + merged.config.dim
    assert torch.allclose(embed(merge_lora(model), x, m, k), embed(merged, x, m, k), atol=1e-6)

    # resume: stop after 2 steps, continue, same trajectory bit for bit
    history = torch.load(sorted((tmp_path / "full_run" / "checkpoints").glob("step_*"))[-1] / "state.pt",
                         weights_only=True)["history"]
    first = finetune(_cfg(small_set, tmp_path / "split", stop_after=2, ckpt_every=1))
    assert first["step"] == 2 and first["final"] is None
    second = finetune(_cfg(small_set, tmp_path / "split"))
    got = torch.load(sorted((tmp_path / "split" / "checkpoints").glob("step_*"))[-1] / "state.pt",
                     weights_only=True)["history"]
    assert second["step"] == 4
    assert [h["loss"] for h in got] == [h["loss"] for h in history]
    with pytest.raises(ValueError, match="another fine-tuning setup"):
        finetune(_cfg(small_set, tmp_path / "split", adaptation="full", max_steps=6))


def test_full_finetune_and_evaluation_report(small_set, tmp_path):
    cfg = _cfg(small_set, tmp_path / "full", adaptation="full", classifier="adaface", sampler="random", k=2,
               max_steps=2)
    summary = finetune(cfg)
    assert summary["trainable"] > 0.9 * summary["total"] and summary["mining"]
    train, test = load_datasets(cfg)
    assert test is not None
    res = evaluate_cross_domain(summary["model"], test, ["vis->ir", "ir->vis"], ("global", "global_parts"))
    for kind in ("global", "global_parts"):
        for proto in ("vis->ir", "ir->vis"):
            r = res[kind][proto]
            assert r["image"]["num_query"] == 8 and r["template"]["num_probes"] == 4
            assert 0 <= r["template"]["rank1"] <= 100
    perfect = np.eye(test.num_classes, dtype=np.float32)[test.labels]  # one direction per identity
    r = evaluate_features(perfect, test, ["vis->lwir"])["vis->lwir"]
    assert r["image"]["top1"] == 100.0 and r["image"]["mAP"] == 100.0 and r["template"]["rank1"] == 100.0


def synthetic_config_args(train: Path, test: Path, out: Path) -> list[str]:
    """`webbody finetune` arguments that run the shipped configs/finetune_synthetic.yaml at a tiny size."""
    sets = {"train_root": train, "eval_root": test, "output_dir": out, "model_overrides": "{input_size: 32}",
            "p": 3, "k": 1, "max_steps": 2, "warmup_steps": 1, "ckpt_every": 1, "features": "[global]"}
    return ["finetune", str(REPO / "configs" / "finetune_synthetic.yaml"),
            *[a for k, v in sets.items() for a in ("--set", f"{k}={v}")]]


def test_cli_finetune_no_prefect(small_set, tmp_path):
    from flows.cli import main

    assert main([*synthetic_config_args(small_set / "train", small_set / "test", tmp_path / "run"), "--no-prefect"]) == 0
    rep = json.loads((tmp_path / "run" / "eval" / "finetuned" / "finetune_eval.json").read_text())
    assert set(rep["results"]["global"]) == {"vis->ir", "ir->vis"}  # the config's protocols
    assert (tmp_path / "run" / "eval" / "base" / "finetune_eval.md").read_text().count("| global | vis->ir |") == 1
    assert (tmp_path / "run" / "final" / "model.pt").is_file() and (tmp_path / "run" / "final" / "adapter").is_dir()
    with pytest.raises(ValueError, match="unknown finetune config"):
        FinetuneConfig.from_dict({"learning_rate": 1})


@pytest.mark.slow
@pytest.mark.realmodel
def test_flow_computes_missing_keypoints_then_finetunes(small_set, tmp_path):
    """The flow's steps: images without keypoints get the persons stage's pose keypoints, written once, then
    fine-tuning and evaluation. Run as `webbody finetune --no-prefect` (the same steps without the Prefect
    engine: on a loaded machine the ephemeral Prefect API server's start-up timed out)."""
    from flows.finetune import compute_keypoints, run_finetune

    for name in ("train", "test"):
        shutil.copytree(small_set / name, tmp_path / name)
        (tmp_path / name / "keypoints.json").unlink()
    cfg = tmp_path / "ft.yaml"
    cfg.write_text(
        "finetune:\n  base_model: tiny\n  model_overrides: {input_size: 32}\n  pose_model: asset:yolo11n-pose.pt\n"
        f"  train_root: {tmp_path / 'train'}\n  eval_root: {tmp_path / 'test'}\n  output_dir: {tmp_path / 'run'}\n"
        "  p: 3\n  k: 1\n  max_steps: 1\n  threads: 1\n  features: [global]\n  evaluate_base: false\n"
    )
    counts = compute_keypoints.fn(str(cfg), None)
    assert counts == {str(tmp_path / 'train'): 54, str(tmp_path / 'test'): 24}
    result = run_finetune(str(cfg))
    written = json.loads((tmp_path / "train" / "keypoints.json").read_text())
    assert len(written) == 6 * 3 * 3 and all(np.asarray(v).shape == (22, 2) for v in written.values())
    assert len(json.loads((tmp_path / "test" / "keypoints.json").read_text())) == 4 * 3 * 2
    assert result["summary"]["no_keypoints"] == 0 and "finetuned" in result["reports"]
