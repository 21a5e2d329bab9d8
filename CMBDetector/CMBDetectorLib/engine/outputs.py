"""Writing detection results: Slicer markups JSON, lesion CSV, label map, provenance JSON.

Every file is written to a temporary name and renamed when complete, so an interrupted run
never leaves a half file that looks finished.
"""
from __future__ import annotations

import csv
import io
import json
import os
from pathlib import Path

import numpy as np

from .. import __version__
from .results import LESION_COLUMNS, DetectionResult
from .volume import Volume, stem, write_volume

MARKUPS_SCHEMA = ("https://raw.githubusercontent.com/slicer/slicer/master/Modules/Loadable/"
                  "Markups/Resources/Schema/markups-schema-v1.0.3.json#")


def atomic_write_text(path, text: str) -> None:
    path = Path(path)
    tmp = path.with_name(f".{path.name}.part{os.getpid()}")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def lesion_description(lesion) -> str:
    return (f"confidence {lesion.confidence:.2f}; volume {lesion.volume_mm3:.1f} mm3; "
            f"diameter {lesion.diameter_mm:.1f} mm")


def markups_json(lesions, extra_columns: dict | None = None) -> dict:
    """A 3D Slicer markups fiducial document (LPS, as Slicer writes it), one point per lesion."""
    points = []
    for les in lesions:
        r, a, s = les.centroid_ras
        points.append({"id": str(les.id), "label": les.label,
                       "description": lesion_description(les), "associatedNodeID": "",
                       "position": [-r, -a, s], "orientation": [-1.0, 0.0, 0.0, 0.0, -1.0, 0.0,
                                                               0.0, 0.0, 1.0],
                       "selected": True, "locked": False, "visibility": True,
                       "positionStatus": "defined"})
    return {"@schema": MARKUPS_SCHEMA,
            "markups": [{"type": "Fiducial", "coordinateSystem": "LPS", "coordinateUnits": "mm",
                         "locked": False, "fixedNumberOfControlPoints": False,
                         "labelFormat": "CMB-%d", "lastUsedControlPointNumber": len(points),
                         "controlPoints": points, "measurements": []}]}


def lesion_rows(lesions, extra: dict | None = None) -> list:
    """Table rows; ``extra`` maps lesion id -> {column: value} (e.g. location columns)."""
    rows = []
    for les in lesions:
        row = les.as_row()
        if extra and les.id in extra:
            row.update(extra[les.id])
        rows.append(row)
    return rows


def csv_text(rows, columns=None) -> str:
    columns = list(columns or LESION_COLUMNS)
    for r in rows:
        columns += [k for k in r if k not in columns]
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=columns, lineterminator="\n")
    w.writeheader()
    w.writerows(rows)
    return buf.getvalue()


def output_paths(out_dir, name: str) -> dict:
    out_dir = Path(out_dir)
    return {"markups": out_dir / f"{name}.mrk.json", "csv": out_dir / f"{name}_lesions.csv",
            "labels": out_dir / f"{name}_cmb.nii.gz", "json": out_dir / f"{name}_detection.json"}


def write_outputs(volume: Volume, result: DetectionResult, out_dir, threshold=None,
                  name: str | None = None, extra: dict | None = None) -> dict:
    """Write the four outputs of one scan; returns their paths by kind.

    ``<name>.mrk.json`` (fiducials CMB-1..n), ``<name>_lesions.csv``, ``<name>_cmb.nii.gz``
    (label n = CMB-n on the input grid) and ``<name>_detection.json`` (all candidates with
    scores, settings, timings, versions: enough to re-threshold without the networks).
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    name = name or volume.name or stem(volume.metadata.get("source", "scan"))
    paths = output_paths(out_dir, name)
    t = result.threshold if threshold is None else float(threshold)
    lesions = result.lesions(t)
    write_volume(volume.with_array(result.label_map(t)), paths["labels"])
    atomic_write_text(paths["csv"], csv_text(lesion_rows(lesions, extra)))
    atomic_write_text(paths["markups"], json.dumps(markups_json(lesions), indent=2))
    summary = result.summary()
    summary.update({"threshold": t, "engine_version": __version__,
                    "source": volume.metadata.get("source", ""),
                    "lesions": lesion_rows(lesions, extra),
                    "stage_counts": result.stage_counts(t)})
    atomic_write_text(paths["json"], json.dumps(summary, indent=1, default=_json_default))
    return paths


def _json_default(o):
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    raise TypeError(type(o).__name__)
