"""SapiensID configuration and presets."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any, ClassVar, TypeVar

from sapiensid.keypoints import KeypointAugConfig

NUM_KP19 = 19

_S = TypeVar("_S", bound="SectionConfig")


class SectionConfig:
    """Base of a run's config dataclass that is read from one YAML section (``train:``, ``finetune:``) or from
    the whole file: unknown keys are refused, ``--set`` overrides go over the file's values."""

    SECTION: ClassVar[str]

    @classmethod
    def _coerce(cls, data: dict[str, Any]) -> dict[str, Any]:
        """Values that YAML cannot spell as the field's type (a tuple), converted; `data` is a copy."""
        return data

    @classmethod
    def from_dict(cls: type[_S], data: dict[str, Any]) -> _S:
        unknown = set(data) - {f.name for f in fields(cls)}  # type: ignore[arg-type]
        if unknown:
            raise ValueError(f"unknown {cls.SECTION} config key(s): {sorted(unknown)}")
        return cls(**cls._coerce(dict(data)))

    @classmethod
    def from_yaml(cls: type[_S], path: str | Path, overrides: dict[str, Any] | None = None) -> _S:
        import yaml

        raw = yaml.safe_load(Path(path).read_text()) or {}
        section = dict(raw.get(cls.SECTION, raw) if isinstance(raw, dict) else {})
        section.update(overrides or {})
        return cls.from_dict(section)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)  # type: ignore[call-overload]


@dataclass(frozen=True)
class SapiensIDConfig:
    """Model hyper-parameters. ``preset("base")`` is the paper's / released checkpoints' architecture."""

    input_size: int = 384  # square input side in pixels
    patch_size: int = 32  # patch side; the ROI grid is input_size // patch_size (12)
    dim: int = 512
    depth: int = 24
    num_heads: int = 16
    mlp_ratio: float = 3.0
    drop_path_rate: float = 0.1
    output_dim: int = 4096
    per_query: int = 4  # SAH queries per keypoint
    kprpe_kp_dim: int = 32  # per-keypoint projection of the KP-RPE mapping network
    kprpe_hidden: int = 512  # hidden width of the KP-RPE mapping network
    rpe_ratio: float = 1.9
    mask_ratio: float = 0.66  # default training keep count = int(n_candidates * (1 - mask_ratio))
    face_first_prob: float = 0.3  # "face_first_0.3" token-selection offsets in training
    level_emb: bool = False  # optional learned per-ROI level embedding (off in the released model)
    n_datasets: int = 1  # rows of the SAH per-dataset part weights
    sah_depth: int = 1  # only sets the differential-attention lambda_init
    # True (default): padding tokens are masked out of attention, so an embedding never depends on the
    # other images of its batch. False: the reference forward (padding tokens attended as mask tokens).
    mask_padding: bool = True
    kp_aug: KeypointAugConfig = field(default_factory=KeypointAugConfig)

    def __post_init__(self) -> None:
        if self.input_size % self.patch_size:
            raise ValueError(f"input_size {self.input_size} must be a multiple of patch_size {self.patch_size}")
        if self.dim % self.num_heads or self.dim % 4:
            raise ValueError(f"dim {self.dim} must be divisible by num_heads {self.num_heads} and by 4")
        if self.side < 2:
            raise ValueError("the ROI grid needs at least 2x2 patches")

    @property
    def side(self) -> int:
        return self.input_size // self.patch_size

    @property
    def n_candidates(self) -> int:
        return 3 * self.side * self.side

    @property
    def num_keypoints(self) -> int:
        return NUM_KP19

    @classmethod
    def preset(cls, name: str, **overrides: Any) -> SapiensIDConfig:
        """``base`` (411 M params, 4096-d), ``small`` (CPU training) or ``tiny`` (unit tests)."""
        presets = {
            "base": cls(),
            "small": cls(input_size=96, patch_size=8, dim=128, depth=4, num_heads=4, output_dim=256,
                         kprpe_hidden=128, drop_path_rate=0.0),
            "tiny": cls(input_size=96, patch_size=8, dim=64, depth=2, num_heads=4, output_dim=128,
                        kprpe_kp_dim=8, kprpe_hidden=64, drop_path_rate=0.0),
        }
        if name not in presets:
            raise ValueError(f"unknown SapiensID preset {name!r}; choose one of {sorted(presets)}")
        return replace(presets[name], **overrides) if overrides else presets[name]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SapiensIDConfig:
        data = dict(data)
        if isinstance(data.get("kp_aug"), dict):
            data["kp_aug"] = KeypointAugConfig(**data["kp_aug"])
        return cls(**data)
