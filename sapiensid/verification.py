"""Face verification on insightface `.bin` pair sets (LFW, CFP-FP, AgeDB-30, CALFW, CPLFW).

A `.bin` file is a pickle of ``(images, issame)``: ``images`` a list of 2*P encoded JPEG/PNG byte strings
(pair i = images[2i], images[2i+1]) and ``issame`` a list of P booleans. The protocol follows CVLface:
embeddings L2-normalised, distance = squared L2, 10 folds in file order (no shuffle), the threshold with the best
accuracy on 9 folds (grid 0..4 step 0.01) is applied to the held-out fold; report mean and std x100.
"""

from __future__ import annotations

import pickle
from pathlib import Path

import cv2
import numpy as np

THRESHOLDS = np.arange(0.0, 4.0, 0.01)

# ArcFace 112x112 five-point template (left eye, right eye, nose, left mouth, right mouth), in pixels.
ARCFACE_TEMPLATE_112 = np.array(
    [[38.2946, 51.6963], [73.5318, 51.5014], [56.0252, 71.7366], [41.5493, 92.3655], [70.7299, 92.2041]],
    dtype=np.float32,
)


class _BinUnpickler(pickle.Unpickler):
    """A .bin set is only tuples, lists, bytes and bools (numpy arrays in some re-exports): refuse every
    other global, so a crafted .bin file cannot run code (docs/security.md)."""

    _ALLOWED = {
        ("numpy", "ndarray"), ("numpy", "dtype"), ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"), ("numpy.core.multiarray", "scalar"),
        ("numpy._core.multiarray", "scalar"), ("builtins", "bytearray"), ("__builtin__", "bytearray"),
    }

    def find_class(self, module: str, name: str):
        if (module, name) in self._ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing global {module}.{name} in a .bin file")


def load_bin(path: str | Path) -> tuple[list[np.ndarray], np.ndarray]:
    """Decode an insightface `.bin` set into RGB uint8 images and the `issame` boolean array."""
    with open(path, "rb") as f:
        try:
            bins, issame = _BinUnpickler(f, encoding="bytes").load()
        except Exception as exc:  # a truncated or foreign pickle: say which file
            raise ValueError(f"{path}: not an insightface .bin pair file ({exc})") from exc
    issame = np.asarray(issame, dtype=bool)
    if len(bins) != 2 * len(issame):
        raise ValueError(f"{path}: {len(bins)} images for {len(issame)} pairs (need 2 per pair)")
    images = []
    for i, b in enumerate(bins):
        raw = b.tobytes() if isinstance(b, np.ndarray) else bytes(b)
        arr = cv2.imdecode(np.frombuffer(raw, dtype=np.uint8), cv2.IMREAD_COLOR)
        if arr is None:
            raise ValueError(f"{path}: image {i} does not decode")
        images.append(cv2.cvtColor(arr, cv2.COLOR_BGR2RGB))
    return images, issame


def write_bin(path: str | Path, images: list[np.ndarray], issame: np.ndarray) -> None:
    """Write RGB uint8 images and pair labels in the insightface `.bin` layout (for tests and tools)."""
    bins = []
    for img in images:
        ok, buf = cv2.imencode(".jpg", cv2.cvtColor(img, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, 95])
        if not ok:
            raise ValueError("JPEG encoding failed")
        bins.append(buf.tobytes())
    with open(path, "wb") as f:
        pickle.dump((bins, [bool(x) for x in issame]), f, protocol=4)


def pair_distances(embeddings: np.ndarray) -> np.ndarray:
    """Squared L2 distances of consecutive pairs of L2-normalised embeddings (values in [0, 4])."""
    e = np.asarray(embeddings, dtype=np.float64)
    e = e / np.maximum(np.linalg.norm(e, axis=1, keepdims=True), 1e-12)
    return np.sum((e[0::2] - e[1::2]) ** 2, axis=1)


def _accuracy(dist: np.ndarray, issame: np.ndarray, threshold: float) -> float:
    return float(np.mean((dist < threshold) == issame))


def ten_fold_accuracy(
    dist: np.ndarray, issame: np.ndarray, n_folds: int = 10, thresholds: np.ndarray = THRESHOLDS
) -> dict[str, float]:
    """k-fold verification accuracy: threshold picked on the other folds (first best on ties)."""
    dist = np.asarray(dist, dtype=np.float64)
    issame = np.asarray(issame, dtype=bool)
    if len(dist) != len(issame):
        raise ValueError(f"{len(dist)} distances for {len(issame)} labels")
    if len(dist) < n_folds:
        raise ValueError(f"need at least {n_folds} pairs for {n_folds}-fold verification, got {len(dist)}")
    # np.array_split gives the first len % k folds one extra item, like sklearn's KFold without shuffling.
    folds = np.array_split(np.arange(len(dist)), n_folds)
    # acc[t, i] for every threshold and pair at once: (T, P) booleans are small for these sets (6-12k pairs).
    correct = (dist[None, :] < thresholds[:, None]) == issame[None, :]
    accs, best_thresholds = [], []
    for test_idx in folds:
        train_mask = np.ones(len(dist), dtype=bool)
        train_mask[test_idx] = False
        train_acc = correct[:, train_mask].mean(axis=1)
        best = int(np.argmax(train_acc))
        best_thresholds.append(float(thresholds[best]))
        accs.append(float(correct[best, test_idx].mean()))
    return {
        "accuracy": 100.0 * float(np.mean(accs)),
        "std": 100.0 * float(np.std(accs)),
        "threshold": float(np.mean(best_thresholds)),
        "num_pairs": int(len(dist)),
    }


def face_to_body_input(face: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Turn an aligned 112x112 face crop into the model's inputs: the image resized to `size` and the 22
    keypoints in [0, 1] (body points -1, the 5 face points at the ArcFace template). The whole image is
    foreground, so no white padding is added."""
    img = cv2.resize(face, (size, size), interpolation=cv2.INTER_LINEAR)
    ldmks = np.full((22, 2), -1.0, dtype=np.float32)
    # Sets stored at another size are still ArcFace-aligned, so the normalised template holds for any size.
    ldmks[17:22] = ARCFACE_TEMPLATE_112 / 112.0
    return img, ldmks
