"""Name the anatomical region of each CMB: from the registered MNI atlas or a user parcellation."""

from __future__ import annotations

import csv
import os
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Union

import numpy as np
import SimpleITK as sitk
from scipy import ndimage

from CMBDetectLib.anatomy.atlas import CATEGORIES, REGION_BY_KEY, mni_to_index
from CMBDetectLib.anatomy.registration import RegistrationResult
from CMBDetectLib.errors import InputError
from CMBDetectLib.volume import Volume, read_volume

MIDLINE_MM = 2.0          # |MNI x| below this is reported as midline (brainstem, vermis, corpus callosum)
MAX_DISTANCE_MM = 6.0     # a CMB just outside every label takes the nearest label within this distance
SIDES = ("left", "right", "midline", "unknown")


@dataclass(frozen=True)
class RegionInfo:
    """Where one CMB lies."""

    region: str               # machine key (atlas) or the parcellation's region name
    name: str                 # human-readable, without the side
    category: str             # lobar | deep | infratentorial | unknown
    side: str                 # left | right | midline | unknown
    lobe: str | None = None   # frontal | parietal | temporal | occipital | insula for lobar regions
    source: str = "atlas"     # atlas | parcellation
    distance_mm: float = 0.0  # > 0 when the CMB lay outside every label and the nearest one was taken

    @property
    def label(self) -> str:
        return self.name if self.side in ("midline", "unknown") else f"{self.side} {self.name}"

    def to_dict(self) -> dict:
        data = asdict(self)
        data["distance_mm"] = round(float(self.distance_mm), 2)
        data["label"] = self.label
        return data


UNKNOWN = RegionInfo("unknown", "outside the brain atlas", "unknown", "unknown")


@dataclass(frozen=True)
class ParcellationEntry:
    region: str
    category: str
    side: str | None = None
    lobe: str | None = None


@dataclass
class Parcellation:
    """A user label map on (or physically aligned with) the scan, with a label -> region table."""

    labels: Volume
    table: dict[int, ParcellationEntry]

    @classmethod
    def from_files(cls, labelmap: str | os.PathLike, table_csv: str | os.PathLike) -> Parcellation:
        labels = read_volume(labelmap)
        labels = labels.with_array(np.rint(np.asarray(labels.array)).astype(np.int64))
        return cls(labels, read_parcellation_table(table_csv))


def _side_from_text(text: str) -> str | None:
    words = re.split(r"[\s_\-.]+", text.strip().lower())
    if words and words[0] in ("left", "lh", "l"):
        return "left"
    if words and words[0] in ("right", "rh", "r"):
        return "right"
    return None


def read_parcellation_table(path: str | os.PathLike) -> dict[int, ParcellationEntry]:
    """CSV with columns ``label,region,category`` and optional ``side``, ``lobe``.

    ``category`` is lobar, deep or infratentorial; ``side`` (left/right/midline) defaults to a leading
    "Left"/"Right"/"lh"/"rh" in the region name, so FreeSurfer-style names need no side column.
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(f"parcellation table not found: {path}")
    with open(path, newline="", encoding="utf-8-sig") as stream:
        reader = csv.DictReader(stream)
        columns = {c.strip().lower() for c in (reader.fieldnames or [])}
        if not {"label", "region", "category"} <= columns:
            raise InputError(f"{path.name} needs the columns label,region,category (optional side, lobe); "
                             f"found {', '.join(sorted(columns)) or 'none'}")
        table: dict[int, ParcellationEntry] = {}
        for line, row in enumerate(reader, start=2):
            row = {k.strip().lower(): (v or "").strip() for k, v in row.items() if k}
            try:
                label = int(float(row["label"]))
            except ValueError:
                raise InputError(f"{path.name} line {line}: label {row['label']!r} "
                                 "is not an integer") from None
            category = row["category"].lower()
            if category not in CATEGORIES:
                raise InputError(f"{path.name} line {line}: category {row['category']!r} must be one of "
                                 f"{', '.join(CATEGORIES)}")
            side = row.get("side", "").lower() or _side_from_text(row["region"])
            if side is not None and side not in SIDES:
                raise InputError(f"{path.name} line {line}: side {row['side']!r} "
                                 "must be left, right or midline")
            table[label] = ParcellationEntry(row["region"], category, side, row.get("lobe") or None)
    if not table:
        raise InputError(f"{path.name} lists no labels")
    return table


def _nearest_label_lookup(labels: np.ndarray, spacing_zyx: tuple) -> tuple[np.ndarray, np.ndarray]:
    """Distance (mm) to, and value of, the nearest labelled voxel for every voxel."""
    distance, indices = ndimage.distance_transform_edt(labels == 0, sampling=spacing_zyx, return_indices=True)
    return distance, labels[tuple(indices)]


def _lookup(labels: np.ndarray, spacing_zyx: tuple, kji: np.ndarray, max_distance_mm: float
            ) -> list[tuple[int, float]]:
    """Label at each continuous [k, j, i] (nearest voxel), or the nearest label within the distance."""
    shape = np.asarray(labels.shape)
    voxel = np.rint(kji).astype(int)
    found: list[tuple[int, float]] = []
    nearest = None
    for point in voxel:
        if np.any(point < 0) or np.any(point >= shape):
            found.append((0, float("inf")))
            continue
        value = int(labels[tuple(point)])
        if value:
            found.append((value, 0.0))
            continue
        if nearest is None:
            # Computed once per call and only when a point falls outside every label.
            nearest = _nearest_label_lookup(labels, tuple(float(s) for s in spacing_zyx))
        distance = float(nearest[0][tuple(point)])
        label = int(nearest[1][tuple(point)]) if distance <= max_distance_mm else 0
        found.append((label, distance))
    return found


def _side_from_x(x_mm: float, midline_mm: float = MIDLINE_MM) -> str:
    if abs(x_mm) < midline_mm:
        return "midline"
    return "right" if x_mm > 0 else "left"


def assign_regions(points_ras: np.ndarray,
                   source: Union[RegistrationResult, Parcellation, Volume],
                   *, registration: RegistrationResult | None = None,
                   max_distance_mm: float = MAX_DISTANCE_MM) -> list[RegionInfo]:
    """One ``RegionInfo`` per point (scan RAS mm, N x 3).

    ``source`` is the atlas registration (``register_to_atlas``), a ``Parcellation`` (user labels on the
    scan), or a ``Volume`` of atlas region codes already warped onto the scan
    (``RegistrationResult.warp_to_scan``). With a parcellation whose table has no side, ``registration``
    (if given) supplies left/right from the MNI x coordinate.
    """
    points = np.atleast_2d(np.asarray(points_ras, dtype=float)).reshape(-1, 3)
    if points.size == 0:
        return []
    if isinstance(source, Parcellation):
        return _from_parcellation(points, source, registration, max_distance_mm)
    if isinstance(source, RegistrationResult):
        atlas_labels = source.atlas.labels
        mni = source.scan_to_mni(points)
        kji = mni_to_index(atlas_labels, mni)
        labels = sitk.GetArrayFromImage(atlas_labels).astype(np.int64)
        spacing = atlas_labels.GetSpacing()[::-1]
        sides = [_side_from_x(x) for x in mni[:, 0]]
        return _atlas_infos(_lookup(labels, spacing, kji, max_distance_mm), sides)
    if isinstance(source, Volume):
        labels = np.asarray(source.array).astype(np.int64)
        lookups = _lookup(labels, source.spacing_zyx, source.ras_to_index(points), max_distance_mm)
        sides = ([_side_from_x(x) for x in registration.scan_to_mni(points)[:, 0]] if registration
                 else ["unknown"] * len(points))
        return _atlas_infos(lookups, sides)
    raise TypeError(f"cannot assign regions from a {type(source).__name__}")


def _atlas_infos(lookups: list[tuple[int, float]], sides: list[str]) -> list[RegionInfo]:
    from CMBDetectLib.anatomy.atlas import REGION_BY_CODE

    infos = []
    for (code, distance), side in zip(lookups, sides):
        region = REGION_BY_CODE.get(code)
        if region is None:
            infos.append(UNKNOWN)
            continue
        infos.append(RegionInfo(region.key, region.name, region.category, side, region.lobe, "atlas",
                                distance))
    return infos


def _from_parcellation(points: np.ndarray, parcellation: Parcellation,
                       registration: RegistrationResult | None, max_distance_mm: float) -> list[RegionInfo]:
    labels = np.asarray(parcellation.labels.array).astype(np.int64)
    # Labels absent from the table are treated as background (e.g. CSF, skull in a whole-head labelling).
    known = np.isin(labels, np.fromiter(parcellation.table, dtype=np.int64))
    labels = np.where(known, labels, 0)
    lookups = _lookup(labels, parcellation.labels.spacing_zyx, parcellation.labels.ras_to_index(points),
                      max_distance_mm)
    mni_x = registration.scan_to_mni(points)[:, 0] if registration is not None else None
    infos = []
    for index, (label, distance) in enumerate(lookups):
        entry = parcellation.table.get(label)
        if entry is None:
            infos.append(UNKNOWN)
            continue
        side = entry.side or (_side_from_x(mni_x[index]) if mni_x is not None else "unknown")
        atlas_region = REGION_BY_KEY.get(entry.region)
        lobe = entry.lobe or (atlas_region.lobe if atlas_region else None)
        if atlas_region:
            name = atlas_region.name
        else:  # the side is reported separately: drop a "Left_" / "rh-" prefix from the name
            name = re.sub(r"^(left|right|lh|rh)[\s_\-.]+", "", entry.region, flags=re.IGNORECASE)
            name = name.replace("_", " ")
        infos.append(RegionInfo(entry.region, name, entry.category, side, lobe, "parcellation", distance))
    return infos
