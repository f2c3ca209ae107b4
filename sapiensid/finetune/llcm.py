"""LLCM (Low-Light Cross-Modality, CVPR 2023) visible-infrared ReID in its published layout.

Facts of the layout this adapter reads (docs/finetune.md):

* ``ROOT/vis/<pid>/<pid>_cNN_sXXXXXX_fYYYY_vis.jpg`` and ``ROOT/nir/<pid>/..._nir.jpg``, ``pid`` 4 digits;
* ``ROOT/idx/{train,test}_{vis,nir}.txt``: one ``relative/path label`` per line (paths relative to ROOT,
  e.g. ``nir/0351/0351_c06_s200656_f4830_nir.jpg 350``); the camera is the ``_cNN_`` field of the name;
* test modes: VIS->IR (visible queries, infrared gallery) and IR->VIS (infrared queries, visible gallery).

Domains are named ``vis`` and ``nir`` (protocols ``vis->nir``, ``nir->vis``); the identity is the ``<pid>``
folder. Keypoints: an optional ``ROOT/keypoints.json`` as in the generic layout.
"""

from __future__ import annotations

import re
from pathlib import Path

from sapiensid.finetune.data import DomainDataset, DomainImage, filter_coverage, read_sidecar

LLCM_DOMAINS = ("vis", "nir")
LLCM_PROTOCOLS = ("vis->nir", "nir->vis")  # LLCM's VIS->IR and IR->VIS test modes
_CAMERA = re.compile(r"_c(\d+)_")


def _read_list(root: Path, split: str, domain: str, sidecar: dict) -> list[DomainImage]:
    path = root / "idx" / f"{split}_{domain}.txt"
    if not path.is_file():
        raise FileNotFoundError(f"LLCM list not found: {path} (expected ROOT/idx/{{train,test}}_{{vis,nir}}.txt)")
    out = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        parts = line.split()
        if len(parts) != 2 or not parts[1].lstrip("-").isdigit():
            raise ValueError(f"{path}:{n}: expected 'relative/path label', got {line!r}")
        rel = Path(parts[0])
        if rel.parts[0] != domain or len(rel.parts) < 3:
            raise ValueError(f"{path}:{n}: {parts[0]!r} is not under {domain}/<pid>/")
        cam = _CAMERA.search(rel.name)
        kps = sidecar.get(rel.as_posix())
        out.append(DomainImage(root / rel, rel.parts[1], domain, int(cam.group(1)) if cam else -1,
                               tuple(map(tuple, kps)) if kps is not None else None))  # type: ignore[arg-type]
    return out


def read_llcm(root: str | Path, split: str = "train", missing_domain: str = "drop", min_images: int = 2,
              check_files: bool = True) -> DomainDataset:
    """The `split` ("train" or "test") of LLCM as a two-domain dataset (``vis``, ``nir``)."""
    root = Path(root)
    if split not in ("train", "test"):
        raise ValueError(f"LLCM split must be 'train' or 'test', got {split!r}")
    sidecar = read_sidecar(root)  # optional ROOT/keypoints.json, as for the generic layout
    images = _read_list(root, split, "vis", sidecar) + _read_list(root, split, "nir", sidecar)
    if check_files:
        missing = [str(im.path) for im in images if not im.path.is_file()]
        if missing:
            raise FileNotFoundError(f"LLCM {split}: {len(missing)} listed image(s) missing, e.g. {missing[:3]}")
    return filter_coverage(images, LLCM_DOMAINS, missing_domain, min_images, where=f"LLCM {split} at {root}")
