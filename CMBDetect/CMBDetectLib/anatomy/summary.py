"""The clinical summary of the final CMBs: counts by region, size, certainty and side, plus the facts that
matter for the Boston criteria 2.0, stated as facts and never as a diagnosis."""

from __future__ import annotations

import csv
import io
import os
from collections import Counter
from dataclasses import dataclass, field

import numpy as np

from CMBDetectLib.anatomy.regions import RegionInfo
from CMBDetectLib.volume import atomic_write_text

# "Definite" = the student network is confident (p_disc >= 0.8 by default); "possible" = kept by the
# detection threshold (p_disc >= th_disc) but below that. The default mirrors the usual split of rating
# scales (MARS / BOMBS) into certain and uncertain microbleeds; it is a confidence band, not a validated
# cut-off, and can be changed with --th-definite.
DEFAULT_TH_DEFINITE = 0.8
SIZE_BINS = (("< 5 mm", 0.0, 5.0), ("5-10 mm", 5.0, 10.0), ("> 10 mm", 10.0, float("inf")))
NOT_A_DIAGNOSIS = (
    "Not a diagnosis. These are counts of automatically detected, unreviewed candidate microbleeds and their "
    "approximate atlas location. The Boston criteria 2.0 for cerebral amyloid angiopathy also need age, "
    "clinical presentation, other haemorrhagic lesions (ICH, cortical superficial siderosis, convexity SAH) "
    "and white-matter markers (CSO perivascular spaces, multispot WMH), which this tool does not assess.")


def equivalent_diameter_mm(volume_mm3: float) -> float:
    """Diameter of the sphere with the same volume (blooming makes SWI diameters larger than T2*)."""
    return float(np.cbrt(6.0 * max(float(volume_mm3), 0.0) / np.pi))


@dataclass
class CMBEntry:
    """One final CMB with everything the report shows."""

    id: int
    centroid_ras: tuple[float, float, float]
    centroid_ijk: tuple[float, float, float] | None
    volume_mm3: float
    diameter_mm: float
    size_class: str
    p_disc: float
    certainty: str
    region: RegionInfo

    def to_row(self) -> dict:
        return {"id": self.id, "side": self.region.side, "region": self.region.name,
                "region_key": self.region.region, "category": self.region.category,
                "lobe": self.region.lobe or "", "certainty": self.certainty,
                "p_disc": round(self.p_disc, 3), "volume_mm3": round(self.volume_mm3, 2),
                "diameter_mm": round(self.diameter_mm, 2), "size": self.size_class,
                "r_mm": round(self.centroid_ras[0], 1), "a_mm": round(self.centroid_ras[1], 1),
                "s_mm": round(self.centroid_ras[2], 1),
                "atlas_distance_mm": round(self.region.distance_mm, 1)}


@dataclass
class ClinicalSummary:
    entries: list[CMBEntry]
    th_definite: float
    th_disc: float | None
    by_region: dict[str, int] = field(default_factory=dict)
    by_category: dict[str, int] = field(default_factory=dict)
    by_size: dict[str, int] = field(default_factory=dict)
    by_certainty: dict[str, int] = field(default_factory=dict)
    by_side: dict[str, int] = field(default_factory=dict)
    by_lobe: dict[str, int] = field(default_factory=dict)
    facts: list[str] = field(default_factory=list)
    note: str = NOT_A_DIAGNOSIS

    @property
    def total(self) -> int:
        return len(self.entries)

    def to_dict(self) -> dict:
        return {"total": self.total, "th_definite": self.th_definite, "th_disc": self.th_disc,
                "by_category": self.by_category, "by_region": self.by_region, "by_size": self.by_size,
                "by_certainty": self.by_certainty, "by_side": self.by_side, "by_lobe": self.by_lobe,
                "facts": self.facts, "note": self.note, "cmbs": [e.to_row() for e in self.entries]}


def _plural(count: int, word: str) -> str:
    return f"{count} {word}" + ("" if count == 1 else "s")


def boston_facts(entries: list[CMBEntry]) -> list[str]:
    """Sentences of fact (no interpretation) about the distribution Boston 2.0 looks at.

    Boston 2.0 counts lobar (cortico-subcortical) haemorrhagic lesions; deep ones include basal ganglia,
    thalamus, internal/external capsule and brainstem; cerebellar lesions count as neither.
    """
    lobar = [e for e in entries if e.region.category == "lobar"]
    brainstem = [e for e in entries if e.region.region == "brainstem"]
    deep = [e for e in entries if e.region.category == "deep"] + brainstem
    cerebellar = [e for e in entries if e.region.region == "cerebellum"]
    unknown = [e for e in entries if e.region.category not in ("lobar", "deep", "infratentorial")]
    facts = []
    if not entries:
        return ["No CMB was detected."]
    lobes = sorted({e.region.lobe for e in lobar if e.region.lobe})
    if lobar and not deep:
        facts.append(f"{_plural(len(lobar), 'CMB')} strictly lobar ({', '.join(lobes)}), no deep CMBs"
                     + (" (brainstem counted as deep)." if not brainstem else "."))
    else:
        facts.append(f"{_plural(len(lobar), 'lobar CMB')}" + (f" ({', '.join(lobes)})" if lobes else "")
                     + f"; {_plural(len(deep), 'deep CMB')} (basal ganglia, thalamus, capsules, corpus "
                       f"callosum, deep white matter or brainstem), of which {len(brainstem)} "
                       "in the brainstem.")
    if lobar and deep:
        facts.append("Mixed distribution: both lobar and deep CMBs are present.")
    facts.append(f"{_plural(len(cerebellar), 'cerebellar CMB')} (counted as neither lobar nor deep by "
                 "Boston 2.0).")
    definite_lobar = sum(1 for e in lobar if e.certainty == "definite")
    facts.append(f"{definite_lobar} of the lobar CMBs are definite, {len(lobar) - definite_lobar} possible.")
    large = [e for e in entries if e.diameter_mm >= 10.0]
    if large:
        facts.append(f"{_plural(len(large), 'lesion')} of 10 mm or more (larger than a microbleed by "
                     "definition; check for a macrohaemorrhage or a mimic).")
    if unknown:
        facts.append(f"{_plural(len(unknown), 'CMB')} could not be placed in the atlas.")
    return facts


def summarise(candidates: list[dict], regions: list[RegionInfo], *, th_definite: float = DEFAULT_TH_DEFINITE,
              th_disc: float | None = None) -> ClinicalSummary:
    """Summary of the **final** candidates (``candidates`` are ``cmbdetect.candidates/1`` dicts and
    ``regions`` their ``RegionInfo``, in the same order; non-final candidates are ignored)."""
    if len(candidates) != len(regions):
        raise ValueError(f"{len(candidates)} candidates but {len(regions)} regions")
    entries = []
    for candidate, region in zip(candidates, regions):
        if not candidate.get("final", True):
            continue
        diameter = equivalent_diameter_mm(candidate.get("volume_mm3", 0.0))
        size = next(name for name, low, high in SIZE_BINS if low <= diameter < high)
        p_disc = float(candidate.get("p_disc", 1.0))
        entries.append(CMBEntry(
            id=int(candidate["id"]), centroid_ras=tuple(float(v) for v in candidate["centroid_ras"]),
            centroid_ijk=tuple(float(v) for v in candidate["centroid_ijk"]) if candidate.get("centroid_ijk")
            else None,
            volume_mm3=float(candidate.get("volume_mm3", 0.0)), diameter_mm=diameter, size_class=size,
            p_disc=p_disc, certainty="definite" if p_disc >= th_definite else "possible", region=region))
    summary = ClinicalSummary(entries, th_definite, th_disc)
    summary.by_category = {c: sum(1 for e in entries if e.region.category == c)
                           for c in ("lobar", "deep", "infratentorial")}
    if any(e.region.category == "unknown" for e in entries):
        summary.by_category["unknown"] = sum(1 for e in entries if e.region.category == "unknown")
    summary.by_region = dict(sorted(Counter(e.region.label for e in entries).items()))
    summary.by_size = {name: sum(1 for e in entries if e.size_class == name) for name, _, _ in SIZE_BINS}
    summary.by_certainty = {c: sum(1 for e in entries if e.certainty == c) for c in ("definite", "possible")}
    summary.by_side = {s: sum(1 for e in entries if e.region.side == s) for s in ("left", "right", "midline")}
    if any(e.region.side == "unknown" for e in entries):
        summary.by_side["unknown"] = sum(1 for e in entries if e.region.side == "unknown")
    summary.by_lobe = dict(sorted(Counter(e.region.lobe for e in entries if e.region.lobe).items()))
    summary.facts = boston_facts(entries)
    return summary


def summary_csv_text(summary: ClinicalSummary) -> str:
    """Long format ``section,item,count`` (one table that spreadsheets and scripts both read)."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(["section", "item", "count"])
    writer.writerow(["total", "final CMBs", summary.total])
    for section in ("by_category", "by_lobe", "by_region", "by_size", "by_certainty", "by_side"):
        for item, count in getattr(summary, section).items():
            writer.writerow([section[3:], item, count])
    for fact in summary.facts:
        writer.writerow(["fact", fact, ""])
    writer.writerow(["note", summary.note, ""])
    return out.getvalue()


def cmb_table_csv_text(summary: ClinicalSummary) -> str:
    out = io.StringIO()
    rows = [e.to_row() for e in summary.entries]
    columns = list(rows[0]) if rows else list(CMBEntry(0, (0, 0, 0), None, 0, 0, "", 0, "",
                                                       RegionInfo("", "", "", "")).to_row())
    writer = csv.DictWriter(out, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return out.getvalue()


def write_summary_csv(summary: ClinicalSummary, path: str | os.PathLike) -> None:
    atomic_write_text(path, summary_csv_text(summary))


def write_cmb_table_csv(summary: ClinicalSummary, path: str | os.PathLike) -> None:
    atomic_write_text(path, cmb_table_csv_text(summary))
