"""SapiensID (CVPR 2025): public model interface.

``SapiensID(config)`` wraps :class:`sapiensid.mrm.MaskedRecognitionModel` as ``.net`` so its state dict
is exactly the released checkpoints' (``net.*``). Inputs:

* ``images`` (B, 3, S, S) RGB in [-1, 1] (S = 384 for ``base``), white-padded to a square;
* ``foreground_masks`` (B, S, S) bool or None (None = everything is foreground);
* ``ldmks`` (B, 22, 2) in [0, 1], -1 = missing (17 COCO body points + 5 face landmarks);
* ``dataset_index`` (B,) optional row of the per-dataset part weights (default row 0).

In training the number of kept tokens is ``model.set_keep_tokens(n)`` or ``forward(..., n_keep=n)``;
see :mod:`sapiensid.masking` for the paper's variable rate and batch-size rules.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from sapiensid.checkpoint import CheckpointMismatchError, load_strict
from sapiensid.config import SapiensIDConfig
from sapiensid.keypoints import hflip_keypoints22
from sapiensid.masking import keep_count_for_batch, lr_for_keep, variable_keep_count
from sapiensid.mrm import MaskedRecognitionModel

__all__ = [
    "CheckpointMismatchError",
    "SapiensID",
    "SapiensIDConfig",
    "embed_with_flip",
    "hflip_inputs",
    "keep_count_for_batch",
    "load_sapiensid_weights",
    "lr_for_keep",
    "variable_keep_count",
]



class SapiensID(nn.Module):
    def __init__(self, config: SapiensIDConfig | None = None) -> None:
        super().__init__()
        self.config = config or SapiensIDConfig.preset("base")
        self.net = MaskedRecognitionModel(self.config)

    @property
    def output_dim(self) -> int:
        return self.config.output_dim

    @property
    def n_candidates(self) -> int:
        return self.config.n_candidates

    def set_keep_tokens(self, n: int | None) -> None:
        """Number of candidate tokens kept per sample in training (the MRM keep count).

        ``None`` switches MRM off: training then keeps every valid token, like evaluation. A forward call's
        ``n_keep=`` overrides this for that call only.
        """
        if n is not None and not 1 <= int(n) <= self.config.n_candidates:
            raise ValueError(f"keep count must be in [1, {self.config.n_candidates}], got {n}")
        self.net.n_keep = None if n is None else int(n)

    @property
    def keep_tokens(self) -> int | None:
        return self.net.n_keep

    def forward(self, *inputs: torch.Tensor | None, n_keep: int | None = None) -> torch.Tensor:
        """Raw (not normalised) embeddings (B, output_dim) of `MaskedRecognitionModel.forward`'s positional
        inputs (images, foreground_masks, ldmks[, dataset_index]): this wrapper only keeps the released
        checkpoints' `net.*` key layout, so it declares them once, there."""
        return self.net(*inputs, n_keep=n_keep)  # type: ignore[return-value]


def load_sapiensid_weights(model: SapiensID, path: str | Path) -> SapiensID:
    """Strictly load a released checkpoint: flat ``net.*`` or ``{"model_state_dict": {"model.net.*"}}``
    (.pth/.pt via ``torch.load(weights_only=True)``, or .safetensors). Raises CheckpointMismatchError."""
    return load_strict(model, path)  # type: ignore[return-value]


def hflip_inputs(
    images: torch.Tensor, masks: torch.Tensor | None, ldmks: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """Horizontally flip images, masks and 22-point keypoints (x -> 1 - x, left/right pairs swapped)."""
    return images.flip(-1), (masks.flip(-1) if masks is not None else None), hflip_keypoints22(ldmks)


@torch.no_grad()
def embed_with_flip(
    model: nn.Module,
    images: torch.Tensor,
    masks: torch.Tensor | None,
    ldmks: torch.Tensor,
    dataset_index: torch.Tensor | None = None,
) -> torch.Tensor:
    """Evaluation embedding: L2-normalised ``f(x) + f(hflip x)``."""
    feats = model(images, masks, ldmks, dataset_index)
    fi, fm, fl = hflip_inputs(images, masks, ldmks)
    feats = feats + model(fi, fm, fl, dataset_index)
    return F.normalize(feats, dim=1)
