"""Real models on real photos, all from registry packages: RetinaFace-mnet0.25 (biubug6 layout), SCRFD-2.5g
(insightface layout, fixed 640 input), dlib's ResNet with its own 5-point predictor; and the chain
download -> persons (real YOLO11n-pose) -> faces (RetinaFace + dlib) on photos of Obama and others."""

from __future__ import annotations

import hashlib
import itertools

import cv2
import numpy as np
import pytest

from pipeline.assets import asset_path
from pipeline.config import FacesConfig, PersonsConfig
from pipeline.executors import LocalExecutor
from pipeline.faces import FacesStage, decode_feature
from pipeline.faces.detectors import FaceDetector
from pipeline.faces.embedders import DlibEmbedder, FaceCrop, embedder_entry
from pipeline.geometry import letterbox_image
from pipeline.shards import DatasetDir
from schemas.tables import DOWNLOAD
from tests.faces_support import iou, load_rgb

pytestmark = pytest.mark.realmodel

OBAMA = ("obama.jpg", "obama2.jpg", "obama3.jpg")
OTHERS = ("biden.jpg", "astronaut.png", "grace_hopper.jpg", "t1.jpg", "solvay.jpg")


@pytest.fixture(scope="module")
def retinaface() -> FaceDetector:
    return FaceDetector(asset_path("retinaface_mnet025.onnx"))


@pytest.fixture(scope="module")
def scrfd() -> FaceDetector:
    return FaceDetector(asset_path("scrfd_2.5g_kps.onnx"))


@pytest.fixture(scope="module")
def images() -> dict[str, np.ndarray]:
    return {p: load_rgb(p) for p in OBAMA + OTHERS}


@pytest.fixture(scope="module")
def detections(retinaface, images) -> dict[str, list]:
    """RetinaFace at native resolution, every face >= 0.9, per photo (computed once: Solvay takes seconds)."""
    return {p: retinaface.detect_batch([img], max_faces=None, score_threshold=0.9, native=True)[0]
            for p, img in images.items()}


def test_retinaface_biubug6_layout(retinaface, images, detections):
    assert retinaface.layout == "biubug6" and retinaface.fixed_size is None
    assert len(detections["solvay.jpg"]) >= 25  # 29 people in the 1927 photo
    assert len(detections["t1.jpg"]) == 6
    for p in OBAMA:
        dets = detections[p]
        assert len(dets) == 1, p
        # the official top-1 rule (no threshold, no NMS needed) picks the same face
        top = retinaface.detect_batch([images[p]], max_faces=1, native=True)[0][0]
        assert np.allclose(top.box, dets[0].box)


def test_scrfd_insightface_layout(scrfd, retinaface, images):
    assert scrfd.layout == "insightface" and scrfd.fixed_size == 640 and scrfd.fixed_batch == 1
    solvay = scrfd.detect_batch([images["solvay.jpg"]], max_faces=None, score_threshold=0.5)[0]
    assert len(solvay) >= 25
    batch = scrfd.detect_batch([images[p] for p in OBAMA], max_faces=None, score_threshold=0.5)
    for p, dets in zip(OBAMA, batch):
        assert len(dets) == 1, p
        ref = retinaface.detect_batch([images[p]], max_faces=1, native=True)[0][0]
        assert iou(dets[0].box, ref.box) > 0.75
        size = ref.box[2] - ref.box[0]
        assert np.abs(dets[0].landmarks - ref.landmarks).max() < 0.1 * size  # same 5 points, same order


def all_faces(images, detections, per_group_photo: int = 12) -> tuple[list[str], list[FaceCrop]]:
    """Every single-person photo's face plus the most confident faces of the group photos (bounded for time)."""
    names, faces = [], []
    for p, img in images.items():
        keep = per_group_photo if p in ("t1.jpg", "solvay.jpg") else 1
        for i, d in enumerate(detections[p][:keep]):
            names.append(f"{p}:{i}")
            # dlib aligns from the photo and the box itself; the aligned 112 crop is not used.
            faces.append(FaceCrop(np.zeros((112, 112, 3), np.uint8), d.landmarks, img, d.box))
    return names, faces


def test_dlib_embedder_recognises_obama(images, detections):
    emb = DlibEmbedder(asset_path("dlib_face_recognition_resnet_model_v1.dat"),
                       asset_path("shape_predictor_5_face_landmarks.dat"))
    names, faces = all_faces(images, detections)
    assert len(faces) == 3 + 3 + 6 + 12
    feats = emb.embed(faces)
    assert feats.shape == (len(faces), 128) and np.isfinite(feats).all()
    dist = np.linalg.norm(feats[:, None] - feats[None], axis=-1)
    unit = feats / np.linalg.norm(feats, axis=1, keepdims=True)
    cos = unit @ unit.T
    obama = [i for i, n in enumerate(names) if n.split(":")[0] in OBAMA]
    rest = [i for i in range(len(names)) if i not in obama]
    assert len(obama) == 3
    merge = embedder_entry("dlib").thresholds["merge"]
    for i in obama:
        same = [dist[i, j] for j in obama if j != i]
        assert max(same) < min(dist[i, j] for j in rest)  # closer to both other Obamas than to anyone else
        assert max(same) < 0.6  # dlib's documented same-person rule
        assert min(cos[i, j] for j in obama if j != i) > merge > max(cos[i, j] for j in rest)
    # Batched descriptors equal one-by-one ones.
    assert np.allclose(emb.embed(faces[:4]), np.concatenate([emb.embed([f]) for f in faces[:4]]), atol=1e-5)


def download_rows(photos: tuple[str, ...]) -> list[dict]:
    """DOWNLOAD rows as the download stage writes them: 640 white-bordered canvas, JPEG q85."""
    rows = []
    for p in photos:
        bgr = cv2.imread(str(asset_path(p)), cv2.IMREAD_COLOR)
        canvas, _ = letterbox_image(bgr, 640, fill=255)
        ok, buf = cv2.imencode(".jpg", canvas, [cv2.IMWRITE_JPEG_QUALITY, 85])
        assert ok
        sid = p.split(".")[0]
        data = buf.tobytes()
        rows.append({"sample_id": sid, "source_label": "obama" if sid.startswith("obama") else sid, "name": sid,
                     "url": f"http://127.0.0.1/{p}", "status": "success", "image": data, "width": 640,
                     "height": 640, "image_sha256": hashlib.sha256(data).hexdigest()})
    return rows


@pytest.mark.slow
def test_persons_to_faces_with_real_models(tmp_path):
    from pipeline.persons import PersonsStage

    photos = OBAMA + ("biden.jpg", "zidane.jpg")
    d = DatasetDir(tmp_path / "download")
    d.commit_shard("00000", DOWNLOAD.from_rows(download_rows(photos)), {"rows_in": 5, "rows_out": 5, "drops": {}})
    persons = PersonsStage(PersonsConfig(model="yolo11n-pose.pt", batch_size=5, threads=2))
    LocalExecutor().run(persons, tmp_path / "download", tmp_path / "persons")
    n_persons = DatasetDir(tmp_path / "persons").read_shard("00000").num_rows
    assert n_persons >= 5
    cfg = FacesConfig(detector_model="retinaface_mnet025.onnx", embedder="dlib", batch_size=8)
    summary = LocalExecutor().run(FacesStage(cfg), tmp_path / "persons", tmp_path / "faces")
    rows = DatasetDir(tmp_path / "faces").read_shard("00000").to_pylist()
    st = summary.stats
    assert st["rows_in"] == n_persons and st["rows_out"] == len(rows)
    assert set(st["drops"]) <= {"no_face", "face_too_small", "align_failed"}
    # The first (most confident) person of each Obama photo has a confident face; all three match.
    best = {r["sample_id"]: r for r in rows if r["detection_index"] == 0}
    assert set(OBAMA_IDS := [p.split(".")[0] for p in OBAMA]) <= set(best) and "biden" in best
    feats = {k: decode_feature(r["feature"], r["feature_dim"]) for k, r in best.items()}
    for a in OBAMA_IDS:
        assert best[a]["face_score"] > 0.95 and best[a]["embedder"] == "dlib"
        others = [np.linalg.norm(feats[a] - f) for k, f in feats.items() if k not in OBAMA_IDS]
        for b in OBAMA_IDS:
            if a != b:
                assert np.linalg.norm(feats[a] - feats[b]) < min(others)
    for a, b in itertools.combinations(OBAMA_IDS, 2):
        assert np.linalg.norm(feats[a] - feats[b]) < 0.6
