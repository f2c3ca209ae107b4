"""The faces stage on real photos with the real RetinaFace-mnet0.25 (from its registry package) and the tiny
random KP-RPE / a tiny exported ArcFace ONNX as embedders: rows, drop reasons, coordinate mapping, the size
rule, batch independence, weight errors, the registry entry point and the Ray actor pool."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from torch import nn

from pipeline.assets import asset_path
from pipeline.config import BuildConfig, FacesConfig
from pipeline.executors import LocalExecutor, RayExecutor
from pipeline.faces import FacesStage, decode_feature, stage_for
from pipeline.faces.align import similarity_to_template, transform_points, warp_face
from pipeline.faces.detectors import FaceDetector
from pipeline.faces.embedders import ArcFaceEmbedder, FaceCrop, KPRPEEmbedder
from pipeline.inference import installed_backends
from pipeline.registry import run_stage
from pipeline.shards import DatasetDir
from pipeline.stage import StageError
from schemas.faces import FACES
from schemas.persons import PERSONS
from tests.faces_support import iou, keypoints_from_face, load_rgb, person_row, write_persons

TINY = dict(detector_model="retinaface_mnet025.onnx", embedder="kprpe", embedder_model="random",
            kprpe_size="tiny", batch_size=4, num_threads=1)


@pytest.fixture(scope="module", params=installed_backends())
def stage(request) -> FacesStage:
    """The stage tests run once per installed inference backend (detector and KP-RPE embedder)."""
    s = FacesStage(FacesConfig(**TINY, backend=request.param))
    s.ensure_setup()
    return s


@pytest.fixture(scope="module")
def photos() -> dict[str, np.ndarray]:
    return {p: load_rgb(p, width=320) for p in ("obama.jpg", "biden.jpg", "astronaut.png", "grace_hopper.jpg")}


def table(rows: list[dict]):
    return PERSONS.from_rows(rows)


def test_rows_and_drop_reasons(stage, photos):
    white = np.full((300, 200, 3), 255, np.uint8)
    rows = [person_row(p.split(".")[0], img) for p, img in photos.items()]
    rows += [person_row("garbage", crop_bytes=b"\xff\xd8 not a jpeg"), person_row("empty", crop_bytes=b"")]
    rows += [person_row("white", white)]
    strict = FacesStage(FacesConfig(**{**TINY, "min_detector_score": 0.5}))
    strict.detector, strict.embedder = stage.detector, stage.embedder  # same models, stricter score rule
    result = strict.process(table(rows))
    assert dict(result.drops) == {"decode_error": 2, "no_face": 1}
    out = FACES.validate(result.table).to_pylist()
    assert [r["sample_id"] for r in out] == ["obama", "biden", "astronaut", "grace_hopper"]
    for r in out:
        img = photos[r["sample_id"] + (".png" if r["sample_id"] == "astronaut" else ".jpg")]
        h, w = img.shape[:2]
        x1, y1, x2, y2 = r["face_box"]
        assert 0 <= x1 < x2 <= w + 1 and 0 <= y1 < y2 <= h + 1
        lm = np.array(r["face_landmarks"]).reshape(5, 2)
        assert (lm[:, 0] > x1).all() and (lm[:, 0] < x2).all() and (lm[:, 1] > y1).all() and (lm[:, 1] < y2).all()
        assert lm[0, 0] < lm[1, 0] and lm[3, 0] < lm[4, 0]  # ArcFace order: image-left eye/mouth first
        assert r["face_score"] > 0.9
        assert np.isclose(r["face_size_px"], max(x2 - x1, y2 - y1), rtol=1e-5)
        feat = decode_feature(r["feature"], r["feature_dim"])
        assert r["feature_dim"] == 64 and r["embedder"] == "kprpe"
        assert np.isclose(np.linalg.norm(feat), r["feature_norm"], rtol=2e-3)


def test_official_score_rule_keeps_the_best_box_of_a_faceless_crop(stage):
    # min_detector_score 0 (official): the best box is kept with its (low) score; cleaning filters it.
    result = stage.process(table([person_row("white", np.full((300, 200, 3), 255, np.uint8))]))
    assert result.n_out == 1 and result.table.column("face_score")[0].as_py() < 0.5


def test_precrop_coordinates_map_back_to_the_body_crop(stage, photos):
    img = photos["obama.jpg"]
    native = stage.detector.detect_batch([img], max_faces=1, native=True)[0][0]
    kps = keypoints_from_face(native.landmarks, native.box)
    # With these keypoints the pre-crop is the head region only, not the whole crop.
    from pipeline.faces.align import upper_body_box

    assert upper_body_box(np.array(kps), img.shape[1], img.shape[0]) != (0, 0, img.shape[1], img.shape[0])
    out = stage.process(table([person_row("obama", img, keypoints=kps)])).table.to_pylist()[0]
    assert iou(np.array(out["face_box"]), native.box) > 0.8
    err = np.abs(np.array(out["face_landmarks"]).reshape(5, 2) - native.landmarks).max()
    assert err < 0.06 * (native.box[2] - native.box[0])


def test_min_face_size_rule_boundary(stage, photos):
    rows = [person_row("obama", photos["obama.jpg"])]
    size = stage.process(table(rows)).table.column("face_size_px")[0].as_py()
    need = int(2 * size)  # official: int(2 * max side) >= min_face_size
    for min_size, kept in ((need, 1), (need + 1, 0)):
        s = FacesStage(FacesConfig(**{**TINY, "min_face_size": min_size}))
        s.detector, s.embedder = stage.detector, stage.embedder
        res = s.process(table(rows))
        assert res.n_out == kept and res.drops.get("face_too_small", 0) == 1 - kept


def test_features_do_not_depend_on_batching(stage, photos):
    rows = [person_row(p.split(".")[0], img) for p, img in photos.items()]
    together = stage.process(table(rows)).table.to_pylist()
    alone = [stage.process(table([r])).table.to_pylist()[0] for r in rows]
    for a, b in zip(together, alone):
        fa, fb = decode_feature(a["feature"], 64), decode_feature(b["feature"], 64)
        assert np.allclose(fa, fb, rtol=2e-3, atol=2e-3)
        assert np.allclose(a["face_box"], b["face_box"], atol=1e-3)


def aligned_faces(photos: dict[str, np.ndarray], detector: FaceDetector) -> list[FaceCrop]:
    faces = []
    for img in photos.values():
        det = detector.detect_batch([img], max_faces=1, native=True)[0][0]
        m = similarity_to_template(det.landmarks)
        faces.append(FaceCrop(warp_face(img, m), transform_points(det.landmarks, m), img, det.box))
    return faces


def test_kprpe_embedder_batch_equals_one_by_one(stage, photos):
    emb = KPRPEEmbedder(None, size="tiny", device="cpu")
    # The released model's keypoint linear is trained; a zero one (the init) would ignore the landmarks.
    torch.manual_seed(1)
    emb.model.net.keypoint_linear.weight.data.normal_(0, 0.5)
    faces = aligned_faces(photos, stage.detector)
    batch = emb.embed(faces)
    single = np.concatenate([emb.embed([f]) for f in faces])
    assert batch.shape == (4, 64) and np.allclose(batch, single, atol=1e-4)
    # The wrapper's convention: RGB in [-1, 1], landmarks in [0, 1] of the 112 crop.
    x = torch.from_numpy(np.stack([f.aligned for f in faces]).astype(np.float32)).permute(0, 3, 1, 2) / 127.5 - 1
    kp = torch.from_numpy(np.stack([f.landmarks for f in faces]).astype(np.float32)) / 112
    with torch.no_grad():
        assert np.allclose(emb.model(x, kp).numpy(), batch, atol=1e-4)
    moved = FaceCrop(faces[0].aligned, faces[0].landmarks + 10, faces[0].image, faces[0].box)
    assert not np.allclose(emb.embed([moved]), batch[:1], atol=1e-3)


class TinyArcFace(nn.Module):
    """ArcFace-like I/O: (B, 3, 112, 112) RGB normalised (x - 127.5) / 127.5 -> (B, 32)."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 8, 3, 2, 1), nn.BatchNorm2d(8), nn.PReLU(8),
                                  nn.Conv2d(8, 16, 3, 2, 1), nn.BatchNorm2d(16), nn.PReLU(16), nn.AdaptiveAvgPool2d(4))
        self.fc = nn.Linear(256, 32)
        self.bn = nn.BatchNorm1d(32)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.fc(self.body(x).flatten(1)))


@pytest.fixture(scope="module")
def tiny_arcface(tmp_path_factory):
    torch.manual_seed(0)
    model = TinyArcFace().eval()
    path = tmp_path_factory.mktemp("arcface") / "tiny_arcface.onnx"
    torch.onnx.export(model, (torch.zeros(1, 3, 112, 112),), str(path), input_names=["data"], output_names=["fc1"],
                      dynamic_axes={"data": {0: "batch"}, "fc1": {0: "batch"}}, dynamo=False)
    return model, path


def test_arcface_onnx_through_insightface_matches_torch(tiny_arcface, stage, photos):
    model, path = tiny_arcface
    emb = ArcFaceEmbedder(path, device="cpu", num_threads=1)
    faces = aligned_faces(photos, stage.detector)
    got = emb.embed(faces)
    x = torch.from_numpy(np.stack([f.aligned for f in faces]).astype(np.float32)).permute(0, 3, 1, 2)
    with torch.no_grad():
        want = model((x - 127.5) / 127.5).numpy()
    assert got.shape == (4, 32) and np.allclose(got, want, atol=1e-4)
    assert np.allclose(np.concatenate([emb.embed([f]) for f in faces]), got, atol=1e-5)
    # Through the stage too.
    s = FacesStage(FacesConfig(**{**TINY, "embedder": "arcface", "embedder_model": str(path)}))
    out = s.process(table([person_row("obama", photos["obama.jpg"])])).table.to_pylist()[0]
    assert out["embedder"] == "arcface" and out["feature_dim"] == 32


def test_non_arcface_onnx_is_refused():
    with pytest.raises(StageError, match="not an ArcFace recognition model"):
        ArcFaceEmbedder(asset_path("retinaface_mnet025.onnx"), device="cpu")


def test_missing_weights_name_the_file_and_where(tmp_path, monkeypatch):
    monkeypatch.setenv("WEBBODY_CACHE", str(tmp_path / "cache"))
    with pytest.raises(StageError, match=r"retinaface_r50\.onnx.*cache/weights"):
        FacesStage(FacesConfig()).setup()
    cfg = FacesConfig(detector_model=str(asset_path("retinaface_mnet025.onnx")), embedder="kprpe")
    with pytest.raises(StageError, match="cvlface_adaface_vit_base_kprpe_webface12m"):
        FacesStage(cfg).setup()
    with pytest.raises(StageError, match="random.*not allowed for the dlib"):
        FacesStage(FacesConfig(detector_model="retinaface_mnet025.onnx", embedder="dlib",
                               embedder_model="random")).setup()


def test_scrfd_family_refuses_a_biubug6_model():
    with pytest.raises(StageError, match="insightface"):
        FacesStage(FacesConfig(**{**TINY, "detector": "scrfd"})).setup()


def test_run_through_the_registry(tmp_path, photos):
    rows = [person_row(p.split(".")[0], img) for p, img in photos.items()]
    write_persons(tmp_path / "persons", [rows[:3], rows[3:] + [person_row("bad", crop_bytes=b"xx")]])
    cfg = BuildConfig(run={"executor": "local"}, faces=TINY)
    stats = run_stage("faces", cfg, {"persons": tmp_path / "persons"}, tmp_path / "faces")
    assert stats["rows_in"] == 5 and stats["rows_out"] == 4 and stats["drops"] == {"decode_error": 1}
    out = DatasetDir(tmp_path / "faces")
    assert out.done_ids() == ["00000", "00001"]
    assert json.loads((tmp_path / "faces" / "stats.json").read_text())["rows_out"] == 4


@pytest.mark.integration
@pytest.mark.slow
def test_ray_actor_pool_matches_local(tmp_path, ray_local, photos):
    rows = [person_row(p.split(".")[0], img) for p, img in photos.items()]
    write_persons(tmp_path / "persons", [rows[:2], rows[2:] + [person_row("bad", crop_bytes=b"xx")]])
    LocalExecutor().run(FacesStage(FacesConfig(**TINY)), tmp_path / "persons", tmp_path / "local")
    RayExecutor(num_actors=1, actor_cpus=0.5).run(FacesStage(FacesConfig(**TINY)), tmp_path / "persons",
                                                  tmp_path / "ray")
    local, ray_out = DatasetDir(tmp_path / "local"), DatasetDir(tmp_path / "ray")
    assert local.done_ids() == ray_out.done_ids() == ["00000", "00001"]
    for sid in local.done_ids():
        assert local.parquet(sid).read_bytes() == ray_out.parquet(sid).read_bytes()
        assert local.shard_stats(sid)["drops"] == ray_out.shard_stats(sid)["drops"]


def test_runtime_threads_follow_a_cluster_sized_pool(monkeypatch):
    monkeypatch.setattr("os.cpu_count", lambda: 8)
    # Pool sized from the cluster (configs/webbody4m.yaml: num_actors null, 2 CPUs an actor): the actor's share.
    sized = BuildConfig.model_validate({"run": {"executor": "ray", "num_actors": None, "actor_cpus": 2}})
    assert stage_for(sized).config.num_threads == 2
    assert stage_for(sized).config_hash() == FacesStage(sized.faces).config_hash()  # execution only
    # Set by the user, a fixed pool or the local executor: left as configured (None = the library's default).
    assert stage_for(sized.model_copy(update={"faces": FacesConfig(num_threads=3)})).config.num_threads == 3
    assert stage_for(BuildConfig.model_validate({"run": {"executor": "ray", "num_actors": 2}})).config.num_threads \
        is None
    assert stage_for(BuildConfig.model_validate({"run": {"executor": "local", "num_actors": None}})).config \
        .num_threads is None
