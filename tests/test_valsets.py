"""`webbody valsets build` with the real RetinaFace-mnet0.25 detector and the dlib embedder on real photos:
identity folders, insightface .bin files of aligned faces, and the .bin safety rules."""

from __future__ import annotations

import pickle

import cv2
import numpy as np
import pyarrow.parquet as pq
import pytest

from flows.cli import main
from pipeline.assets import asset_path
from pipeline.clean.overlap import read_valset
from pipeline.config import FacesConfig
from pipeline.faces.align import pad_to_square, similarity_to_template, warp_face
from pipeline.stage import StageError
from pipeline.valsets import ValsetEmbedder, build_valset_centers, read_bin, write_bin

pytestmark = pytest.mark.realmodel


@pytest.fixture(scope="module")
def dlib_faces() -> FacesConfig:
    return FacesConfig(
        detector_model=str(asset_path("retinaface_mnet025.onnx")),
        embedder="dlib",
        embedder_model=str(asset_path("dlib_face_recognition_resnet_model_v1.dat")),
        dlib_shape_predictor=str(asset_path("shape_predictor_5_face_landmarks.dat")),
        device="cpu",
    )


@pytest.fixture(scope="module")
def embedder(dlib_faces) -> ValsetEmbedder:
    return ValsetEmbedder(dlib_faces)


def rgb(name: str) -> np.ndarray:
    return cv2.imread(str(asset_path(name)))[:, :, ::-1].copy()


def aligned_jpeg(emb: ValsetEmbedder, name: str) -> bytes:
    """An insightface-style 112x112 aligned face of a photo, JPEG-encoded as in the .bin files."""
    square, _, _ = pad_to_square(rgb(name))
    det = emb.detector.detect_batch([square], max_faces=1)[0][0]
    face = warp_face(square, similarity_to_template(det.landmarks))
    ok, buf = cv2.imencode(".jpg", face[:, :, ::-1], [cv2.IMWRITE_JPEG_QUALITY, 95])
    assert ok
    return buf.tobytes()


def test_folder_set_through_the_cli(tmp_path, dlib_faces):
    root = tmp_path / "lfw"
    for person, photo in [("Barack_Obama", "obama.jpg"), ("Barack_Obama", "obama2.jpg"), ("Joe_Biden", "biden.jpg")]:
        (root / person).mkdir(parents=True, exist_ok=True)
        (root / person / photo).write_bytes(asset_path(photo).read_bytes())
    (root / "Nobody").mkdir()
    (root / "Nobody" / "broken.jpg").write_bytes(b"not an image")
    out = tmp_path / "lfw_dlib.parquet"
    args = ["valsets", "build", "--name", "lfw", "--source", str(root), "--output", str(out)]
    for key in ("detector_model", "embedder", "embedder_model", "dlib_shape_predictor", "device"):
        args += ["--set", f"faces.{key}={getattr(dlib_faces, key)}"]
    assert main(args) == 0
    vs = read_valset(out)
    assert vs.name == "lfw" and vs.embedder == "dlib" and vs.embedder_config["embedder"] == "dlib"
    assert vs.items == ["Barack_Obama", "Joe_Biden"]
    assert pq.read_table(out).column("n_images").to_pylist() == [2, 1]
    assert np.allclose(np.linalg.norm(vs.centers, axis=1), 1, atol=1e-5)
    # dlib: same person when L2 < 0.6; its descriptors have norm ~1.38 here, so that is cosine ~0.9.
    assert vs.centers[0] @ vs.centers[1] < 0.9


def test_bin_set_embeds_aligned_faces_one_center_per_image(tmp_path, dlib_faces, embedder):
    images = [aligned_jpeg(embedder, n) for n in ("obama2.jpg", "obama3.jpg", "biden.jpg")]
    bin_path = tmp_path / "agedb_30.bin"
    write_bin(bin_path, images + [b"garbage"], [True, False])  # pairs: (obama2, obama3) same, (biden, ?) not
    assert read_bin(bin_path)[1] == [True, False]
    out = tmp_path / "agedb.parquet"
    report = build_valset_centers("agedb_30", bin_path, out, dlib_faces, embedder=embedder)
    assert report["centers"] == 4 and report["decode_error"] == 1
    vs = read_valset(out)
    assert vs.items == ["img00000", "img00001", "img00002", "pair00000"]
    # The aligned-face path must agree with the detect-and-align path on who is who.
    folder = embedder.photos([rgb("obama.jpg")])[0]
    folder /= np.linalg.norm(folder)
    sims = vs.centers @ folder
    assert sims[0] > 0.9 and sims[1] > 0.9 and sims[2] < 0.9 and sims[3] > 0.9


def test_bin_with_foreign_objects_is_refused(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    path = tmp_path / "evil.bin"
    path.write_bytes(pickle.dumps(([Evil()], [True])))
    with pytest.raises(StageError, match="not an insightface verification .bin"):
        read_bin(path)
