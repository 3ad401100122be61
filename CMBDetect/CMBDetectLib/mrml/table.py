"""The candidate table node (one row per shown CMB), rebuilt from the review in one batch."""

from __future__ import annotations

from typing import Mapping, Sequence

from CMBDetectLib.review import CandidateReview

COLUMNS = (  # (name, vtk array class, title shown in Slicer, unit)
    ("id", "vtkIntArray", "ID", ""),
    ("volume_mm3", "vtkDoubleArray", "Volume", "mm3"),
    ("p_det", "vtkDoubleArray", "p_det", ""),
    ("p_disc", "vtkDoubleArray", "p_disc", ""),
    ("status", "vtkStringArray", "Status", ""),
    ("segment_id", "vtkStringArray", "Segment", ""),
    ("region", "vtkStringArray", "Region", ""),
)


def new_table_node(name: str):
    """A table node (not yet in a scene) with the candidate columns and no rows."""
    import slicer

    node = slicer.vtkMRMLTableNode()
    node.SetName(name)
    node.SetLocked(True)   # the table mirrors the review; editing cells would not change decisions
    update_table(node, [])
    return node


def update_table(node, entries: Sequence[CandidateReview], regions: Mapping[int, str] | None = None) -> None:
    """Replace the rows of ``node`` with ``entries`` (one Modified event for the whole table).

    ``regions``: ``{id: "left thalamus"}`` once the CMBs are located (empty cell otherwise).
    """
    regions = regions or {}
    import vtk

    table = vtk.vtkTable()
    columns = {}
    for name, array_class, _title, _unit in COLUMNS:
        array = getattr(vtk, array_class)()
        array.SetName(name)
        array.SetNumberOfTuples(len(entries))
        table.AddColumn(array)
        columns[name] = array
    for row, entry in enumerate(entries):
        columns["id"].SetValue(row, int(entry.id))
        columns["volume_mm3"].SetValue(row, round(float(entry.volume_mm3), 2))
        columns["p_det"].SetValue(row, _probability(entry.p_det))
        columns["p_disc"].SetValue(row, _probability(entry.p_disc))
        columns["status"].SetValue(row, entry.decision.value)
        columns["segment_id"].SetValue(row, entry.segment_id)
        columns["region"].SetValue(row, regions.get(entry.id, ""))
    was_modifying = node.StartModify()
    node.SetAndObserveTable(table)
    for name, _array_class, title, unit in COLUMNS:
        node.SetColumnTitle(name, title)
        if unit:
            node.SetColumnUnitLabel(name, unit)
    node.EndModify(was_modifying)


def _probability(value: float | None) -> float:
    return float("nan") if value is None else round(float(value), 3)   # NaN: added by the reviewer


def table_rows(node) -> list[dict]:
    """Rows as dictionaries (for tests and the Python console)."""
    table = node.GetTable()
    rows = []
    for row in range(table.GetNumberOfRows()):
        values = {}
        for column in range(table.GetNumberOfColumns()):
            array = table.GetColumn(column)
            value = array.GetValue(row)
            if isinstance(value, float) and value != value:
                value = None   # NaN: "no probability" (a CMB the reviewer added)
            values[array.GetName()] = value
        rows.append(values)
    return rows
