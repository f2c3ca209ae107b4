"""Build configuration: one pydantic model per stage, composed into `BuildConfig` and read from YAML.

Defaults are the paper's (docs/official-pipeline.md, section 1: WebBody steps a-j). A wrong type or an unknown key is
a clear error naming the field, before anything runs.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


_EXECUTION = {"execution": True}


def execution(default: Any = ..., **kwargs: Any) -> Any:
    """A field that changes how a stage runs, never what it writes (batch sizes, threads, actor counts,
    timeouts): marked here once, and left out of every output's config hash by `hashed_dump`, so a resume with
    other execution settings keeps its finished shards."""
    return Field(default, json_schema_extra=_EXECUTION, **kwargs)


def is_execution(model: type[BaseModel], name: str) -> bool:
    return (model.model_fields[name].json_schema_extra or {}) == _EXECUTION


def _hash_exclude(model: type[BaseModel]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name, info in model.model_fields.items():
        if is_execution(model, name):
            out[name] = True
        elif isinstance(info.annotation, type) and issubclass(info.annotation, BaseModel):
            sub = _hash_exclude(info.annotation)
            if sub:
                out[name] = sub
    return out


def hashed_dump(config: BaseModel) -> dict[str, Any]:
    """The config as it enters an output's hash: JSON-mode dump without the execution fields (nested too)."""
    return config.model_dump(mode="json", exclude=_hash_exclude(type(config)) or None)


class RunConfig(_Strict):
    """Where and how stages run (execution only: none of these enters an output's config hash)."""

    executor: Literal["local", "ray"] = execution("ray")
    ray_address: str | None = execution(None)  # None = local Ray started in-process
    # Actor pool of model stages: a fixed size, or None = from the cluster: floor(GPUs / actor_gpus) where
    # GPUs exist, else floor(CPUs / actor_cpus), within [min_actors, max_actors], never above pending shards.
    num_actors: int | None = execution(1, ge=1)
    min_actors: int = execution(1, ge=1)
    max_actors: int | None = execution(None, ge=1)
    actor_cpus: float = execution(0.5, gt=0)
    actor_gpus: float = execution(0.0, ge=0)  # asked for only when the cluster has GPUs; 0.25 = 4 actors a GPU
    # CPU stages: one Ray task per shard, as many in flight as the cluster has CPUs / task_cpus.
    task_cpus: float = execution(1.0, gt=0)
    task_timeout_s: float | None = execution(None, gt=0)  # a unit running longer is cancelled and run again
    task_retries: int = execution(2, ge=0)  # attempts after a unit's own error (lost workers/nodes don't count)


class QueryInput(_Strict):
    path: str
    # url_lst: `idx label URL...` lines; table: CSV/JSONL/parquet with name|label and url; captions: LAION-style
    # parquet with url + caption searched for `names`.
    format: Literal["auto", "url_lst", "table", "captions"] = "auto"
    names: list[str] | str | None = None  # captions: a list, or a path to a file with one name per line
    per_name_cap: int | None = Field(None, ge=1)


class QueryConfig(_Strict):
    inputs: list[QueryInput] = Field(default_factory=list)
    shard_size: int = Field(10_000, ge=1)  # rows per manifest shard (and so per downstream shard)
    optout_names: list[str] | str | None = None  # names, or a file with one per line
    optout_domains: list[str] | str | None = None  # domains (suffix match), or a file
    per_name_cap: int | None = Field(None, ge=1)


class DownloadConfig(_Strict):
    image_size: int = Field(640, ge=16)
    resize_mode: Literal["border", "keep_ratio", "center_crop", "no"] = "border"
    resize_only_if_bigger: bool = False  # the paper upscales small images to 640
    encode_format: Literal["jpg", "png", "webp"] = "jpg"
    encode_quality: int = Field(85, ge=1, le=100)
    timeout: int = Field(20, ge=1)
    retries: int = Field(1, ge=0)
    # No effect (kept so that older configs load): downloads run one task per manifest shard, as many at
    # once as the Ray cluster has CPUs; `thread_count` is the fetch threads per task.
    processes_count: int = execution(2, ge=1)
    thread_count: int = execution(16, ge=1)
    # Opt-out headers (X-Robots-Tag) honoured by default; an empty list is an explicit, logged override.
    disallowed_header_directives: list[str] = Field(
        default_factory=lambda: ["noai", "noimageai", "noindex", "noimageindex"]
    )
    max_image_area: int = Field(89_478_485, ge=1)  # decompression-bomb guard (PIL's default limit)
    max_body_bytes: int = Field(50_000_000, ge=1)  # a response body above this is cut off (body_too_large)
    allow_private_hosts: list[str] = Field(default_factory=list)  # e.g. ["127.0.0.1"] for tests and the demo
    retry_failed: bool = execution(True)  # a second pass over failed URLs
    # Where the per-shard tasks run: auto = the run section's executor (ray: one Ray task per manifest shard;
    # local: in-process, shard after shard); "local" or "ray" to choose for this stage only.
    distributor: Literal["auto", "local", "ray"] = execution("auto")
    task_timeout: float = execution(3600.0, gt=0)  # seconds per shard task before it is cancelled and run again
    task_attempts: int = execution(3, ge=1)  # attempts per shard before its rows are committed as task_failed
    user_agent_token: str | None = None  # e.g. "img2dataset", to match X-Robots-Tag directives for a UA


class PersonsConfig(_Strict):
    model: str = "yolov8n-pose.pt"  # a path, or a name resolved through the cache directory
    conf_threshold: float = Field(0.7, ge=0, le=1)
    max_persons: int = Field(6, ge=1)
    mode: Literal["all", "dominant"] = "all"
    box_padding: float = Field(0.05, ge=0)
    imgsz: int = Field(640, ge=32)
    batch_size: int = execution(16, ge=1)
    device: str = "cpu"
    crop_format: Literal["png", "jpg"] = "jpg"
    crop_quality: int = Field(95, ge=1, le=100)
    fill: int = Field(255, ge=0, le=255)  # white, matching the download's border padding
    iou: float = Field(0.7, gt=0, le=1)  # NMS IoU (Ultralytics' default, as the official run)
    # Inference backend (pipeline/inference.py); auto = the fastest installed here. Part of the config hash.
    backend: Literal["auto", "torch", "onnxruntime", "openvino"] = "auto"
    # Execution only (left out of the output's config hash): None = the `run` section's value.
    num_actors: int | None = execution(None, ge=1)
    actor_cpus: float | None = execution(None, gt=0)
    actor_gpus: float | None = execution(None, ge=0)  # asked for only when the machine has GPUs
    threads: int = execution(0, ge=0)  # torch threads per actor; 0 = the machine's cores split over the actors


class FacesConfig(_Strict):
    # A registered detector (pipeline/faces/detectors.py: retinaface (biubug6 or insightface output layout),
    # scrfd (insightface layout only), or one from `plugins`); an unknown name fails on the driver.
    detector: str = "retinaface"
    # Paper: RetinaFace-R50 (put it in <cache>/weights/ or give a path); offline demo: "retinaface_mnet025.onnx"
    # or "scrfd_2.5g_kps.onnx" (both ship in registry packages). None = the family's default name.
    detector_model: str | None = "retinaface_r50.onnx"
    # Output layout: biubug6 (loc/conf/landmarks) or insightface (score_s/bbox_s/kps_s); auto = from the outputs.
    detector_layout: Literal["auto", "biubug6", "insightface"] = "auto"
    detector_input: int = Field(160, ge=32)  # square side the pre-crop is resized to (fixed-size models: theirs)
    detector_nms: float = Field(0.4, ge=0, le=1)
    min_detector_score: float = Field(0.0, ge=0, le=1)  # official: best box kept whatever its score; clean filters
    # A registered embedder (pipeline/faces/embedders.py: kprpe, arcface, dlib, or one from `plugins`); an
    # unknown name fails on the driver before any worker starts.
    embedder: str = "kprpe"
    # None = the embedder's registered default weights; "random" (kprpe only) = random weights for tests and
    # benchmarks.
    embedder_model: str | None = None
    # Inference backend of the detector and the KP-RPE embedder (pipeline/inference.py); auto = the fastest
    # installed here (dlib and insightface's ArcFace keep their own runtimes). Part of the config hash.
    backend: Literal["auto", "torch", "onnxruntime", "openvino"] = "auto"
    kprpe_size: Literal["base", "tiny"] = "base"
    dlib_shape_predictor: str = "shape_predictor_5_face_landmarks.dat"
    keypoint_conf: float = Field(0.5, ge=0, le=1)  # a body keypoint is visible at this YOLO confidence
    upper_body_margin: float = Field(0.5, ge=0)  # official crop_upper_body_from_body margin
    min_face_size: int = Field(16, ge=1)  # official rule: 2 * face side >= 16 px
    batch_size: int = execution(16, ge=1)
    device: str = execution("auto")  # auto = GPU when present (torch/onnxruntime), else CPU
    num_threads: int | None = execution(None, ge=1)  # per-actor intra-op threads (None = library default)


class EmbedderThresholds(_Strict):
    """Clean thresholds of one embedder, all on cosine similarities of L2-normalised features (the clean
    stage normalises every feature, so one scale serves kprpe, arcface and dlib); `dbscan_eps` is a distance
    on 1 - clip(cos, 0, 1). Defaults are the official kprpe values."""

    dbscan_eps: float = Field(0.7, gt=0, le=1)
    dbscan_min_samples: int = Field(2, ge=1)
    merge: float = Field(0.7, ge=-1, le=1)  # identity centers above this are one identity
    ambiguous: float = Field(0.6, ge=-1, le=1)  # (ambiguous, merge]: drop the smaller identity
    val_overlap: float = Field(0.7, ge=-1, le=1)  # identity center vs any validation center
    # Ours, not official: a one-image validation center is the identity's person when its member ratio
    # (pipeline/clean/overlap.py) is above this. Lower removes more look-alikes, higher misses more planted
    # persons; 0.73 is recall first, chosen on the clean benchmark's development seeds (docs/clean.md).
    val_overlap_image: float = Field(0.73, gt=0, le=2)
    duplicate: float = Field(0.9, ge=-1, le=1)  # two images of one identity above this: keep one

    @model_validator(mode="after")
    def _ordered(self) -> EmbedderThresholds:
        if self.ambiguous > self.merge:
            raise ValueError(f"ambiguous ({self.ambiguous}) must not exceed merge ({self.merge})")
        return self


class CleanConfig(_Strict):
    # Per embedder name; an embedder missing here uses the thresholds it registered with
    # (pipeline/faces/embedders.py), then the official kprpe values.
    thresholds: dict[str, EmbedderThresholds] = Field(default_factory=dict)
    top_k_clusters: int = Field(1, ge=1)  # largest DBSCAN clusters kept per name, each its own identity
    face_score: float = Field(0.95, ge=0, le=1)  # kept if score > this
    min_images: int = Field(2, ge=1)
    valsets: list[str] = Field(default_factory=list)  # center files from `webbody valsets build`
    block_size: int = Field(65_536, ge=1)  # query rows per block of every similarity search
    # Identity centers: "norm" sums raw features (the official rule: higher-norm, higher-quality faces
    # weigh more); "mean" averages the normalised features.
    center_weighting: Literal["norm", "mean"] = "norm"
    # DBSCAN runs on sparse neighbour graphs of many names at once; this bounds the pairs per call.
    dbscan_pair_budget: int = Field(4_000_000, ge=1)
    # A name whose runner-up cluster holds at least this share of the winner's distinct photos yields no
    # identity (`ambiguous_name`) when top_k_clusters is 1; 1.0 = only exact ties (docs/clean.md).
    tie_share: float = Field(1.0, gt=0, le=1)
    # Two faces of one name in different photos are copies of one photo when the perceptual hashes of their
    # face patches (either orientation) differ in at most this many of 64 bits (pipeline/clean/copies.py).
    copy_hash_distance: int = Field(12, ge=0, le=64)


class BundleConfig(_Strict):
    image_size: int = Field(384, ge=32)
    jpeg_quality: int = Field(95, ge=1, le=100)
    samples_per_shard: int = Field(5_000, ge=1)
    test_identities: int = Field(4000, ge=0)
    seed: int = 42
    write_face_npy: bool = False
    # The output writer (pipeline/bundle/writers.py registry): the format of the shard files. A user writer's
    # module goes in `plugins`. Enters the records' config hash only when it is not the default.
    writer: str = "webdataset"
    # Packing: one task per window of `pack_window` consecutive input shards (samples shuffled across them with
    # `seed`); each task reads its inputs one parquet row group at a time and asks Ray for `pack_memory_mb`.
    pack_window: int = Field(16, ge=1)
    pack_memory_mb: int = Field(1024, ge=64)
    # The split defaults below (the official recipe) are set here only; pipeline/bundle/splits.py reads them.
    # WebBody-test eligibility (official rule, exclusive bounds): an identity qualifies when the number of its
    # images with the lower body visible AND a partial face lies in (min, max), and its image count too.
    # Small builds lower these.
    test_min_hard: int = Field(30, ge=-1)
    test_max_hard: int = Field(70, ge=0)
    test_min_images: int = Field(30, ge=-1)
    test_max_images: int = Field(150, ge=0)
    # Per test identity, this fraction of its "hard" images (at least one) is the query set; the rest gallery.
    query_fraction: float = Field(0.25, gt=0, lt=1)
    # Train subsets (index column `subsets`): fractions of the "frequent" identities (top `frequent_fraction`
    # by image count) and of all training identities, each an independent seeded draw (official recipe).
    frequent_fraction: float = Field(0.48, gt=0, le=1)
    frequent_subsets: dict[str, float] = Field(default_factory=lambda: {"12m": 0.70, "4m": 0.25})
    random_subsets: dict[str, float] = Field(default_factory=lambda: {"4m_random": 0.23})


class BuildConfig(_Strict):
    name: str = "webbody"
    run: RunConfig = Field(default_factory=RunConfig)
    query: QueryConfig = Field(default_factory=QueryConfig)
    download: DownloadConfig = Field(default_factory=DownloadConfig)
    persons: PersonsConfig = Field(default_factory=PersonsConfig)
    faces: FacesConfig = Field(default_factory=FacesConfig)
    clean: CleanConfig = Field(default_factory=CleanConfig)
    bundle: BundleConfig = Field(default_factory=BundleConfig)
    # User stages (pipeline/registry.py): modules imported before the build, each registering its stages, and
    # each such stage's settings under its name (validated by the section model it registered).
    plugins: list[str] = Field(default_factory=list)
    extensions: dict[str, dict[str, Any]] = Field(default_factory=dict)

    @field_validator("name")
    @classmethod
    def _safe_name(cls, v: str) -> str:
        if not v or "/" in v or v.startswith("."):
            raise ValueError("name must be a plain word (no '/', not starting with '.')")
        return v


class ConfigError(ValueError):
    pass


def load_config(path: str | Path | None = None, overrides: dict | None = None) -> BuildConfig:
    """Read a YAML config (relative input paths resolve against the config file's folder)."""
    data: dict = {}
    base = Path.cwd()
    if path is not None:
        p = Path(path)
        if not p.exists():
            raise ConfigError(f"config file {p} not found (see configs/ for examples)")
        try:
            data = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"config file {p} is not valid YAML: {exc}") from exc
        if not isinstance(data, dict):
            raise ConfigError(f"config file {p} must hold a mapping at the top level")
        base = p.resolve().parent
    for key, value in (overrides or {}).items():
        _set_dotted(data, key, value)
    try:
        cfg = BuildConfig.model_validate(data)
    except ValidationError as exc:
        lines = [f"  {'.'.join(str(x) for x in e['loc'])}: {e['msg']}" for e in exc.errors()]
        raise ConfigError(f"invalid config {path or '(defaults)'}:\n" + "\n".join(lines)) from None
    for inp in cfg.query.inputs:
        if not Path(inp.path).is_absolute() and "://" not in inp.path:
            inp.path = str((base / inp.path).resolve())
    return cfg


def _set_dotted(data: dict, key: str, value: object) -> None:
    parts = key.split(".")
    cur = data
    for part in parts[:-1]:
        cur = cur.setdefault(part, {})
    cur[parts[-1]] = value
