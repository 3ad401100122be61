"""Save / load a detection session so a review can continue without re-running the networks.

The background process (``cmbdetect detect --save-prob``) writes ``<stem>_session.npz``; the Slicer process
loads it and answers threshold changes itself. The file holds plain arrays and JSON only (no pickle):
the stage-1 probability map (float16), the brain mask (bit-packed), the input channels (float16, so a
lower ``Th_Cdet`` can still be scored by the student when a model is at hand), the student-score cache,
the stable-id table and the grid geometry.
"""

from __future__ import annotations

import dataclasses
import io
import json
import os
import tempfile
from pathlib import Path
from types import SimpleNamespace
from typing import TYPE_CHECKING

import numpy as np

from CMBDetectLib.errors import InputError

if TYPE_CHECKING:
    from CMBDetectLib.model_package import ModelPackage
    from CMBDetectLib.pipeline import DetectionSession

SCHEMA = "cmbdetect.session/1"


def save_session(session: DetectionSession, path: Path) -> Path:
    features = session.features
    meta = {
        "schema": SCHEMA,
        "modality": session.modality,
        "model": session.model_info,
        "device": session.device_used,
        "timings": session.timings,
        "grid": dataclasses.asdict(features.grid),
        "spacing_zyx": list(features.spacing_zyx),
        "input_reference": {"spacing": list(session._input_reference.spacing),
                            "origin": list(session._input_reference.origin),
                            "direction": list(session._input_reference.direction)},
        "scores": [[*key, value] for key, value in session._scores.items()],
        "ids": [[*peak, value] for peak, value in session._ids.items()],
    }
    mask = features.brain_mask.astype(bool)
    buffer = io.BytesIO()
    np.savez_compressed(
        buffer, meta=np.frombuffer(json.dumps(meta).encode("utf-8"), dtype=np.uint8),
        probability=session.probability.astype(np.float16), brain_mask=np.packbits(mask.ravel()),
        mask_shape=np.asarray(mask.shape), channels=features.channels.astype(np.float16))
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".partial", dir=path.parent)
    try:
        with os.fdopen(handle, "wb") as stream:
            stream.write(buffer.getvalue())
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    return path


def load_session(cls: type, path: Path, model: ModelPackage | None) -> DetectionSession:
    from CMBDetectLib.postprocessing import edge_distance_mm
    from CMBDetectLib.preprocessing import ScanGrid
    from CMBDetectLib.volume import Volume

    try:
        with np.load(path, allow_pickle=False) as data:
            meta = json.loads(bytes(data["meta"]).decode("utf-8"))
            probability = data["probability"].astype(np.float32)
            shape = tuple(int(v) for v in data["mask_shape"])
            mask = np.unpackbits(data["brain_mask"])[: int(np.prod(shape))].reshape(shape).astype(bool)
            channels = data["channels"].astype(np.float32)
    except (OSError, ValueError, KeyError) as error:
        raise InputError(f"cannot read the detection session {path}: {error}") from None
    if meta.get("schema") != SCHEMA:
        raise InputError(f"{path} is not a CMBDetect session file (schema {meta.get('schema')!r})")
    grid_fields = {k: (tuple(v) if isinstance(v, list) else v) for k, v in meta["grid"].items()}
    grid = ScanGrid(**grid_fields)
    session = cls(model)
    session.features = SimpleNamespace(channels=channels, brain_mask=mask, grid=grid,
                                       spacing_zyx=tuple(meta["spacing_zyx"]), timings={})
    session.probability = probability
    session.modality = meta["modality"]
    session.timings = dict(meta.get("timings", {}))
    session.device_used = meta.get("device")
    reference = meta["input_reference"]
    session._input_reference = Volume(np.zeros((1, 1, 1), np.uint8), tuple(reference["spacing"]),
                                      tuple(reference["origin"]), tuple(reference["direction"]))
    session._edge_distance = edge_distance_mm(mask, session.features.spacing_zyx)
    session._scores = {tuple(int(v) for v in row[:3]): float(row[3]) for row in meta["scores"]}
    session._ids = {tuple(int(v) for v in row[:3]): int(row[3]) for row in meta["ids"]}
    if model is None:
        session.model_info = dict(meta.get("model", {}))
    return session
