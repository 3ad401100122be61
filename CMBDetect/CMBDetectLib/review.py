"""Review state of one case (schema ``cmbdetect.review/1``), independent of Slicer.

CMBDetect writes it next to the reviewed segmentation (``<case>.review.json`` + ``<case>.seg.nrrd``);
CMBDetectTraining and ``cmbdetect export`` read it. Only candidates that were shown to the reviewer are
listed in ``cmbs``; rejected ones are also listed as ``hard_negatives`` because they are exactly the mimics
the student network must learn to reject.
"""

from __future__ import annotations

import datetime as _dt
import getpass
import json
import os
from dataclasses import asdict, dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any, Iterable

from CMBDetectLib.errors import InputError
from CMBDetectLib.volume import atomic_write_text

REVIEW_SCHEMA = "cmbdetect.review/1"

# Ids of CMBs the reviewer added by hand start above this value so that they never collide with the
# stable stage-1 candidate ids a later ``th_det`` change may create, while still fitting a uint16 label map.
ADDED_ID_BASE = 60000


class Decision(str, Enum):
    """What the reviewer said about one CMB (``added`` = a CMB the detector did not report)."""

    PENDING = "pending"
    ACCEPTED = "accepted"
    REJECTED = "rejected"
    ADDED = "added"

    @classmethod
    def parse(cls, value: Decision | str) -> Decision:
        try:
            return cls(str(getattr(value, "value", value)).strip().lower())
        except ValueError:
            raise InputError(f"unknown review decision {value!r}; expected one of "
                             f"{', '.join(d.value for d in cls)}") from None

    @property
    def is_cmb(self) -> bool:
        """Counts as a microbleed in the reviewed result."""
        return self in (Decision.ACCEPTED, Decision.ADDED)


def now_iso() -> str:
    return _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).isoformat()


def default_reviewer() -> str:
    try:
        return os.environ.get("CMBDETECT_REVIEWER") or getpass.getuser()
    except Exception:  # getpass fails without a login name (containers); a review still needs a name
        return "unknown"


@dataclass
class CandidateReview:
    """One CMB shown to the reviewer."""

    id: int
    decision: Decision = Decision.PENDING
    segment_id: str = ""
    centroid_ras: tuple[float, float, float] = (0.0, 0.0, 0.0)
    volume_mm3: float = 0.0
    p_det: float | None = None
    p_disc: float | None = None
    edited: bool = False
    final: bool = True          # the detector's verdict at the current thresholds
    reason: str | None = None   # why the detector removed it (None if final)

    def __post_init__(self) -> None:
        self.id = int(self.id)
        self.decision = Decision.parse(self.decision)
        if not self.segment_id:
            self.segment_id = segment_id_for(self.id)

    def to_dict(self) -> dict:
        data = asdict(self)
        data["decision"] = self.decision.value
        data["centroid_ras"] = [round(float(v), 3) for v in self.centroid_ras]
        data["volume_mm3"] = round(float(self.volume_mm3), 4)
        for key in ("p_det", "p_disc"):
            data[key] = None if data[key] is None else round(float(data[key]), 4)
        return data

    @classmethod
    def from_dict(cls, data: dict) -> CandidateReview:
        try:
            return cls(id=int(data["id"]), decision=data.get("decision", "pending"),
                       segment_id=str(data.get("segment_id") or ""),
                       centroid_ras=tuple(float(v) for v in data.get("centroid_ras", (0, 0, 0))),
                       volume_mm3=float(data.get("volume_mm3") or 0.0),
                       p_det=None if data.get("p_det") is None else float(data["p_det"]),
                       p_disc=None if data.get("p_disc") is None else float(data["p_disc"]),
                       edited=bool(data.get("edited", False)), final=bool(data.get("final", True)),
                       reason=data.get("reason"))
        except (KeyError, TypeError, ValueError) as error:
            raise InputError(f"a CMB entry of the review file is malformed ({error}): {data!r}") from None


def segment_id_for(cmb_id: int) -> str:
    """Stable segment id of a CMB (``CMB_3``): survives threshold changes, saving and loading."""
    return f"CMB_{int(cmb_id)}"


@dataclass
class CaseReview:
    """Every decision about one case, plus where it came from."""

    case: str
    modality: str = "swi"
    subject: str | None = None
    image: dict = field(default_factory=dict)
    model: dict = field(default_factory=dict)
    parameters: dict = field(default_factory=dict)
    reviewer: str = field(default_factory=default_reviewer)
    time: str = field(default_factory=now_iso)
    source: str = "review"
    cmbs: list[CandidateReview] = field(default_factory=list)
    history: list[dict] = field(default_factory=list)
    extra: dict = field(default_factory=dict)   # unknown keys of a loaded file, written back unchanged

    # ------------------------------------------------------------------ access
    def get(self, cmb_id: int) -> CandidateReview | None:
        for cmb in self.cmbs:
            if cmb.id == int(cmb_id):
                return cmb
        return None

    def ids(self) -> list[int]:
        return [cmb.id for cmb in self.cmbs]

    def upsert(self, entry: CandidateReview) -> CandidateReview:
        for index, cmb in enumerate(self.cmbs):
            if cmb.id == entry.id:
                self.cmbs[index] = entry
                return entry
        self.cmbs.append(entry)
        return entry

    def remove(self, cmb_id: int) -> None:
        self.cmbs = [cmb for cmb in self.cmbs if cmb.id != int(cmb_id)]

    def set_decision(self, cmb_id: int, decision: Decision | str,
                     action: str | None = None) -> CandidateReview:
        entry = self.get(cmb_id)
        if entry is None:
            raise InputError(f"CMB {cmb_id} is not part of this review")
        entry.decision = Decision.parse(decision)
        self.log(action or entry.decision.value, cmb_id)
        return entry

    def log(self, action: str, cmb_id: int | None = None, **details: Any) -> None:
        record: dict[str, Any] = {"time": now_iso(), "action": action}
        if cmb_id is not None:
            record["id"] = int(cmb_id)
        record.update(details)
        self.history.append(record)
        self.time = record["time"]

    def next_added_id(self, taken: Iterable[int] = ()) -> int:
        used = set(self.ids()) | {int(v) for v in taken}
        candidate = ADDED_ID_BASE + 1
        while candidate in used:
            candidate += 1
        if candidate > 65535:
            raise InputError("too many added CMBs in one case (the label map is 16-bit)")
        return candidate

    def counts(self) -> dict[str, int]:
        counts = {decision.value: 0 for decision in Decision}
        for cmb in self.cmbs:
            counts[cmb.decision.value] += 1
        counts["total"] = len(self.cmbs)
        counts["cmbs"] = counts[Decision.ACCEPTED.value] + counts[Decision.ADDED.value]
        return counts

    # ------------------------------------------------------------------ serialisation
    def to_json_dict(self) -> dict:
        data = dict(self.extra)
        data.update({
            "schema": REVIEW_SCHEMA, "case": self.case, "subject": self.subject or self.case,
            "modality": self.modality, "image": self.image, "model": self.model,
            "parameters": self.parameters, "reviewer": self.reviewer, "time": self.time,
            "source": self.source,
            "cmbs": [cmb.to_dict() for cmb in self.cmbs],
            "hard_negatives": [{"id": cmb.id, "centroid_ras": [round(float(v), 3) for v in cmb.centroid_ras],
                                "kind": "rejected"}
                               for cmb in self.cmbs if cmb.decision is Decision.REJECTED],
            "counts": self.counts(),
            "history": self.history,
        })
        return data

    @classmethod
    def from_json_dict(cls, data: dict) -> CaseReview:
        if not isinstance(data, dict) or data.get("schema") != REVIEW_SCHEMA:
            found = data.get("schema") if isinstance(data, dict) else type(data).__name__
            raise InputError(f"not a CMBDetect review file (schema {found!r}, expected {REVIEW_SCHEMA!r})")
        known = {"schema", "case", "subject", "modality", "image", "model", "parameters", "reviewer", "time",
                 "source", "cmbs", "hard_negatives", "counts", "history"}
        return cls(case=str(data.get("case") or "case"), modality=str(data.get("modality") or "swi"),
                   subject=data.get("subject"), image=dict(data.get("image") or {}),
                   model=dict(data.get("model") or {}), parameters=dict(data.get("parameters") or {}),
                   reviewer=str(data.get("reviewer") or "unknown"), time=str(data.get("time") or now_iso()),
                   source=str(data.get("source") or "review"),
                   cmbs=[CandidateReview.from_dict(item) for item in data.get("cmbs") or []],
                   history=list(data.get("history") or []),
                   extra={k: v for k, v in data.items() if k not in known})

    def save(self, path: str | os.PathLike) -> Path:
        """Write atomically (a crash never leaves a half-written review)."""
        return atomic_write_text(path, json.dumps(self.to_json_dict(), indent=1) + "\n")

    @classmethod
    def load(cls, path: str | os.PathLike) -> CaseReview:
        path = Path(path)
        if not path.is_file():
            raise InputError(f"review file not found: {path}")
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as error:
            raise InputError(f"the review file {path.name} is not valid JSON ({error})") from None
        return cls.from_json_dict(data)
