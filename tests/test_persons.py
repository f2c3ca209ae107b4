"""The persons stage's plumbing with a random-initialised YOLO11n-pose (built from Ultralytics' yaml, no
download): drop reasons, geometry of every row, crops, modes, weights errors, local vs Ray executors."""

from __future__ import annotations

import hashlib
from pathlib import Path

import cv2
import numpy as np
import pyarrow as pa
import pytest

from pipeline.assets import asset_path
from pipeline.config import BuildConfig, PersonsConfig, load_config
from pipeline.executors import LocalExecutor, RayExecutor
from pipeline.geometry import crop_window, crop_with_fill, letterbox_image, pad_box
from pipeline.inference import installed_backends
from pipeline.persons import PersonsStage, executor_for, pick_device, resolve_model, run, threads_per_worker
from pipeline.runtime import cache_dir, has_gpu
from pipeline.shards import DatasetDir, format_shard_id
from pipeline.stage import StageError
from schemas.persons import check_persons
from schemas.tables import DOWNLOAD

TINY = dict(model="yolo11n-pose.yaml", imgsz=160, conf_threshold=0.0, crop_format="png", batch_size=2, threads=1)


def download_row(sample_id: str, photo: str | None, size: int = 640, status: str = "success",
                 image: bytes | None = None) -> dict:
    """A DOWNLOAD row as the download stage writes it: border resize to `size` (white), JPEG q85."""
    if photo is not None:
        src = cv2.imread(str(asset_path(photo)), cv2.IMREAD_COLOR)
        canvas, _ = letterbox_image(src, size, fill=255)
        ok, buf = cv2.imencode(".jpg", canvas, [cv2.IMWRITE_JPEG_QUALITY, 85])
        assert ok
        image = buf.tobytes()
    return {
        "sample_id": sample_id, "source_label": f"label_{sample_id}", "name": f"name {sample_id}",
        "url": f"http://127.0.0.1/{sample_id}.jpg", "status": status, "image": image,
        "width": size if image else None, "height": size if image else None,
        "image_sha256": hashlib.sha256(image).hexdigest() if image else None,
        "error": None if status == "success" else "HTTP 404",
    }


def write_download(root, shards: list[list[dict]]) -> DatasetDir:
    d = DatasetDir(root)
    for i, rows in enumerate(shards):
        d.commit_shard(format_shard_id(i), DOWNLOAD.from_rows(rows), {"rows_in": len(rows), "rows_out": len(rows),
                                                                       "drops": {}})
    return d


def decode(data: bytes) -> np.ndarray:
    img = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
    assert img is not None
    return img


def check_rows_geometry(table: pa.Table, sources: dict[str, bytes], padding: float, lossless: bool) -> None:
    """Every row's box, crop window, crop pixels and keypoint frames agree with each other and the source."""
    check_persons(table, "persons output")
    for r in table.to_pylist():
        assert r["person_id"] == f"{r['sample_id']}_{r['detection_index']}"
        assert np.allclose(r["box"], pad_box(r["det_box"], padding), atol=1e-3)
        x0, y0, x1, y1 = crop_window(r["box"])
        # float32 storage can move an edge across an integer by a hair: allow one pixel.
        assert abs(r["crop_x"] - x0) <= 1 and abs(r["crop_y"] - y0) <= 1
        assert abs(r["crop_width"] - (x1 - x0)) <= 1 and abs(r["crop_height"] - (y1 - y0)) <= 1
        crop = decode(r["crop"])
        assert crop.shape[:2] == (r["crop_height"], r["crop_width"])
        src = decode(sources[r["sample_id"]])
        assert (r["image_width"], r["image_height"]) == (src.shape[1], src.shape[0])
        window = (r["crop_x"], r["crop_y"], r["crop_x"] + r["crop_width"], r["crop_y"] + r["crop_height"])
        expected = crop_with_fill(src, window, 255)
        diff = np.abs(crop.astype(int) - expected.astype(int))
        assert (diff.max() == 0) if lossless else (diff.mean() < 3), diff.mean()
        kp = np.array(r["keypoints"]).reshape(17, 3)
        kc = np.array(r["keypoints_crop"]).reshape(17, 3)
        assert np.allclose(kc[:, :2] + [r["crop_x"], r["crop_y"]], kp[:, :2], atol=1e-3)
        assert (kc[:, 2] == kp[:, 2]).all() and ((kp[:, 2] >= 0) & (kp[:, 2] <= 1)).all()
    for _, g in table.to_pandas().groupby("sample_id"):
        assert sorted(g["detection_index"]) == list(range(len(g)))
        scores = g.sort_values("detection_index")["box_score"].to_numpy()
        assert (np.diff(scores) <= 1e-7).all()  # confidence order


@pytest.fixture(scope="module", params=installed_backends())
def tiny_stage(request) -> PersonsStage:
    """The plumbing tests run once per installed inference backend."""
    stage = PersonsStage(PersonsConfig(**TINY, backend=request.param))
    stage.ensure_setup()
    assert stage.backend == request.param
    return stage


def share_model(stage: PersonsStage, loaded: PersonsStage) -> None:
    """Give `stage` (another config) the already loaded model of `loaded`."""
    stage.cfg = stage.cfg.model_copy(update={"backend": loaded.backend})
    stage.model, stage.backend, stage._ready, stage.device = loaded.model, loaded.backend, True, "cpu"


def mixed_rows() -> list[dict]:
    return [
        download_row("a", "bus.jpg", size=160),
        download_row("b", "zidane.jpg", size=160),
        download_row("c", None, status="failed_to_download"),
        download_row("d", None, image=b"\xff\xd8 not really a jpeg"),
        download_row("e", None, image=None),  # "success" without bytes: a broken writer, not a person
        download_row("f", "astronaut.png", size=160),
    ]


def test_stage_keeps_persons_and_counts_bad_rows(tmp_path, tiny_stage):
    rows = mixed_rows()
    write_download(tmp_path / "download", [rows])
    summary = LocalExecutor().run(tiny_stage, tmp_path / "download", tmp_path / "persons")
    stats = summary.stats
    assert stats["rows_in"] == 6
    assert stats["drops"] == {"decode_error": 2, "not_downloaded": 1}
    table = DatasetDir(tmp_path / "persons").read_shard("00000")
    assert set(table.column("sample_id").to_pylist()) == {"a", "b", "f"}
    assert stats["rows_out"] == table.num_rows and table.num_rows <= 3 * 6
    sources = {r["sample_id"]: r["image"] for r in rows if r["image"]}
    check_rows_geometry(table, sources, 0.05, lossless=True)
    # The random model's boxes reach the image edge, so padding leaves the image: that part is white.
    r0 = table.slice(0, 1).to_pylist()[0]
    assert r0["box"][0] < 0 or r0["box"][1] < 0 or r0["box"][2] > 160 or r0["box"][3] > 160
    # Labels and provenance pass through.
    assert r0["source_label"] == f"label_{r0['sample_id']}" and r0["image_sha256"] == hashlib.sha256(
        sources[r0["sample_id"]]).hexdigest()


def test_max_persons_and_dominant_mode(tmp_path, tiny_stage):
    batch = DOWNLOAD.from_rows([download_row("a", "bus.jpg", size=160), download_row("b", "t1.jpg", size=160)])
    all_rows = tiny_stage.process(batch).table
    capped = PersonsStage(PersonsConfig(**{**TINY, "max_persons": 2}))
    share_model(capped, tiny_stage)  # same model, other config
    top2 = capped.process(batch).table
    assert max(top2.to_pandas().groupby("sample_id").size()) <= 2
    dominant = PersonsStage(PersonsConfig(**{**TINY, "mode": "dominant"}))
    share_model(dominant, tiny_stage)
    dom = dominant.process(batch).table
    assert sorted(dom.column("sample_id").to_pylist()) == sorted(set(all_rows.column("sample_id").to_pylist()))
    for r in dom.to_pylist():
        peers = [p for p in all_rows.to_pylist() if p["sample_id"] == r["sample_id"]]
        area = [(p["det_box"][2] - p["det_box"][0]) * (p["det_box"][3] - p["det_box"][1]) for p in peers]
        mine = (r["det_box"][2] - r["det_box"][0]) * (r["det_box"][3] - r["det_box"][1])
        assert mine == pytest.approx(max(area))
        assert r["person_id"] in {p["person_id"] for p in peers}  # same id as in "all" mode


def test_no_person_is_counted(tiny_stage):
    strict = PersonsStage(PersonsConfig(**{**TINY, "conf_threshold": 0.5}))
    share_model(strict, tiny_stage)
    result = strict.process(DOWNLOAD.from_rows([download_row("a", "bus.jpg", size=160)]))
    assert result.table.num_rows == 0 and dict(result.drops) == {"no_person": 1}


def test_jpeg_crops_are_high_quality(tiny_stage):
    jpg = PersonsStage(PersonsConfig(**{**TINY, "crop_format": "jpg", "crop_quality": 95}))
    share_model(jpg, tiny_stage)
    row = download_row("a", "zidane.jpg", size=160)
    table = jpg.process(DOWNLOAD.from_rows([row])).table
    assert set(table.column("crop_format").to_pylist()) == {"jpg"}
    check_rows_geometry(table, {"a": row["image"]}, 0.05, lossless=False)


@pytest.mark.slow
def test_ray_actor_pool_matches_local(tmp_path, ray_local, tiny_stage):
    shards = [mixed_rows(), [download_row("g", "grace_hopper.jpg", size=160), download_row("h", "t1.jpg", 160)]]
    write_download(tmp_path / "download", shards)
    LocalExecutor().run(tiny_stage, tmp_path / "download", tmp_path / "local")
    ray_stage = PersonsStage(tiny_stage.cfg)  # fresh: the actor loads its own model
    summary = RayExecutor(num_actors=1, actor_cpus=0.5).run(ray_stage, tmp_path / "download", tmp_path / "ray")
    assert summary.processed == ["00000", "00001"]
    local, ray_out = DatasetDir(tmp_path / "local"), DatasetDir(tmp_path / "ray")
    for sid in ("00000", "00001"):
        assert local.read_shard(sid).num_rows > 0
        # Byte-identical: this process has run other backends' stages before (the module's earlier
        # parametrisations, a torch one first), the actor is a fresh process (tests the NMS choice in
        # pipeline/inference.py CompiledPose.predict).
        assert Path(local.parquet(sid)).read_bytes() == Path(ray_out.parquet(sid)).read_bytes(), sid
    assert summary.stats["drops"] == {"decode_error": 2, "not_downloaded": 1}


def test_default_model_offline_names_the_file_and_where(tmp_path, monkeypatch):
    monkeypatch.setenv("WEBBODY_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("WEBBODY_OFFLINE", "1")
    with pytest.raises(StageError) as err:
        resolve_model(PersonsConfig().model)
    assert "yolov8n-pose.pt" in str(err.value) and str(cache_dir() / "weights" / "yolov8n-pose.pt") in str(err.value)
    # The stage entry point fails before reading anything or starting Ray.
    with pytest.raises(StageError, match="yolov8n-pose.pt"):
        run(BuildConfig(), {"download": tmp_path / "nothing"}, tmp_path / "out")
    with pytest.raises(StageError, match="not found at"):
        resolve_model(str(tmp_path / "missing" / "pose.pt"))
    # A file placed in the cache is found by name.
    placed = cache_dir() / "weights" / "yolov8n-pose.pt"
    placed.parent.mkdir(parents=True)
    placed.write_bytes(b"x")
    assert resolve_model("yolov8n-pose.pt") == str(placed)


def test_registry_shipped_weights_resolve_when_named():
    assert resolve_model("yolo11n-pose.pt") == str(asset_path("yolo11n-pose.pt"))
    assert resolve_model("asset:yolo11n-pose.pt") == str(asset_path("yolo11n-pose.pt"))


def test_non_pose_model_is_refused(tmp_path):
    with pytest.raises(StageError, match="not a COCO-17 pose model"):
        PersonsStage(PersonsConfig(model="yolo11n.yaml", imgsz=160)).setup()
    # On Ray it must fail on the driver, as a StageError, not as an actor that died in its constructor.
    cfg = BuildConfig.model_validate({"run": {"executor": "ray"}, "persons": {"model": "yolo11n.yaml"}})
    with pytest.raises(StageError, match="not a COCO-17 pose model"):
        run(cfg, {"download": tmp_path / "nothing"}, tmp_path / "out")


def test_device_selection():
    assert pick_device("auto") == ("cuda:0" if has_gpu() else "cpu")
    assert pick_device("CPU") == "cpu"
    with pytest.raises(StageError, match="not understood"):
        pick_device("tpu")
    if not has_gpu():
        with pytest.raises(StageError, match="no CUDA GPU"):
            pick_device("cuda")


def test_config_hash_ignores_execution_settings():
    base = PersonsStage(PersonsConfig()).config_hash()
    assert PersonsStage(PersonsConfig(batch_size=64, num_actors=4, threads=3, actor_cpus=1)).config_hash() == base
    assert PersonsStage(PersonsConfig(conf_threshold=0.5)).config_hash() != base
    assert PersonsStage(PersonsConfig(mode="dominant")).config_hash() != base


def test_threads_per_worker_follows_the_pool(monkeypatch):
    monkeypatch.setattr("os.cpu_count", lambda: 8)
    # configs/webbody4m.yaml sizes the pool from the cluster (num_actors null, 2 CPUs an actor): the actor's share.
    paper = load_config(Path(__file__).parents[1] / "configs" / "webbody4m.yaml")
    assert paper.run.num_actors is None and paper.run.actor_cpus == 2
    assert threads_per_worker(paper) == 2
    assert threads_per_worker(paper.model_copy(update={"persons": paper.persons.model_copy(
        update={"actor_cpus": 0.5})})) == 1  # a fractional reservation still gets a thread
    assert threads_per_worker(paper.model_copy(update={"persons": paper.persons.model_copy(
        update={"actor_cpus": 4.0})})) == 4
    # A fixed pool splits the machine's cores; the persons section overrides the run section; threads wins.
    fixed = BuildConfig.model_validate({"run": {"executor": "ray", "num_actors": 4}})
    assert threads_per_worker(fixed) == 2
    assert threads_per_worker(fixed.model_copy(update={"persons": PersonsConfig(num_actors=8)})) == 1
    assert threads_per_worker(fixed.model_copy(update={"persons": PersonsConfig(threads=3)})) == 3
    assert threads_per_worker(BuildConfig.model_validate({"run": {"executor": "local", "num_actors": None}})) == 8
    # The executor built from the same config sizes the pool from the cluster within the run's bounds.
    ex = executor_for(paper)
    assert ex.num_actors is None and ex.actor_cpus == 2 and ex.max_actors == 512
