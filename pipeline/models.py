"""`webbody models export`: the model stages' compiled graphs, made ahead of a run.

Its own module (not pipeline/inference.py) because it needs the stages, and the stages need the inference
backends: inference stays below persons and faces in the import graph (tests/test_layering.py).
"""

from __future__ import annotations

from typing import Any

from pipeline.faces import FacesStage
from pipeline.faces.embedders import kprpe_onnx
from pipeline.inference import choose_backend, openvino_ir
from pipeline.persons import PersonsStage, export_pose_model, resolve_model


def export_models(cfg: Any, backends: list[str] | None = None) -> list[dict]:
    """Export the build's persons and faces models for `backends` (default: each stage's configured one, 'auto'
    resolved) ahead of a run; returns one record per graph made or found in the cache."""

    done: list[dict] = []
    persons = PersonsStage(cfg.persons)
    source = resolve_model(cfg.persons.model)
    for b in backends or [persons.backend_name()]:
        if choose_backend(b) != "torch":
            done.append({"stage": "persons", "backend": b, "model": source,
                         "graph": str(export_pose_model(source, cfg.persons.imgsz, b))})
    faces = FacesStage(cfg.faces)
    det, emb, _ = faces.resolve_paths()
    for b in backends or [faces.backend_name()]:
        if choose_backend(b) == "openvino" and det is not None and det.suffix == ".onnx":
            done.append({"stage": "faces", "backend": b, "model": str(det), "graph": str(openvino_ir(det))})
        if cfg.faces.embedder == "kprpe" and choose_backend(b) != "torch":
            import torch

            from sapiensid.kprpe_face import build_kprpe_face_vit, load_kprpe_face_weights

            if emb is None:
                torch.manual_seed(0)  # random weights, as KPRPEEmbedder makes them (tests, benchmarks)
            model = build_kprpe_face_vit(cfg.faces.kprpe_size)
            if emb is not None:
                load_kprpe_face_weights(model, emb)
            graph = kprpe_onnx(model, emb, cfg.faces.kprpe_size)
            if b == "openvino":
                graph = openvino_ir(graph)
            done.append({"stage": "faces", "backend": b, "model": str(emb or "random"), "graph": str(graph)})
    return done
