"""Fine-tune SapiensID on a new domain (cross-spectral, low-light, small data): docs/finetune.md.

One module per concern: ``data`` (generic layout, keypoint sidecar, model inputs), ``llcm`` (LLCM adapter),
``synthetic`` (a generated multi-domain set), ``samplers`` (random / domain-aware P x K), ``losses``
(AdaFace or cross-entropy + batch-hard triplet), ``adapt`` (base checkpoint, full / LoRA via peft),
``features`` (global / global + SAH part means), ``evaluate`` (cross-domain protocols, per-image and template
metrics), ``config`` and ``trainer``.
"""

from sapiensid.finetune.config import FinetuneConfig
from sapiensid.finetune.trainer import finetune, load_datasets

__all__ = ["FinetuneConfig", "finetune", "load_datasets"]
