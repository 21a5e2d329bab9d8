"""One-page, self-contained HTML report of a CMB detection (printable to PDF by any browser).

Everything is inside the single file (CSS inline, images as base64 PNG), so it can be mailed or
archived without its folder. The page holds the scan identifiers taken from the volume, the
counts by region with their definitions, the lesion table, axial slices with every counted lesion
marked, the model version, and the statement that it is not for diagnostic use.

Numbers in the counts block and the lesion table come from the same lesion list; both carry
``data-*`` attributes so a test can read them back from the rendered page.
"""
from __future__ import annotations

import base64
import datetime as _dt
import html
import io
import os
from pathlib import Path

import numpy as np

from .. import __version__
from ..engine.volume import Volume

MAX_PANELS = 8


def _esc(v) -> str:
    return html.escape("" if v is None else str(v))


def _rows(lesions, location) -> list:
    """One dict per lesion: id, label, status, R/A/S, size, confidence and location columns."""
    from .locate import lesion_records

    recs = lesion_records(lesions)
    locs = location.by_id() if location is not None else {}
    rows = []
    for les, rec in zip(lesions or [], recs):
        get = les.get if isinstance(les, dict) else (lambda k, d=None, _o=les: getattr(_o, k, d))
        loc = locs.get(rec["id"])
        diameter = get("diameter_mm")
        conf = get("confidence")
        rows.append({
            "id": rec["id"], "label": rec["label"], "status": rec["status"],
            "R": rec["ras"][0], "A": rec["ras"][1], "S": rec["ras"][2],
            "diameter_mm": None if diameter in (None, "") else float(diameter),
            "confidence": None if conf in (None, "") else float(conf),
            "category": loc.category if loc else "", "group": loc.group if loc else "",
            "region": loc.region if loc else "", "side": loc.side if loc else "",
            "uncertain": bool(loc.uncertain) if loc else False,
        })
    return rows


# --------------------------------------------------------------------------------------------
# Images
# --------------------------------------------------------------------------------------------
def _axial_slice(volume: Volume, s_mm: float, pixel_mm: float):
    """Axial slice at RAS S = ``s_mm`` in radiological layout (patient right on the left,
    anterior at the top). Returns ``(image [row, col], extent_ras)``."""
    import SimpleITK as sitk

    img = volume.to_sitk()
    if img.GetPixelID() not in (sitk.sitkFloat32, sitk.sitkFloat64):
        img = sitk.Cast(img, sitk.sitkFloat32)
    corners = np.array([[i, j, k] for i in (0, volume.shape_ijk[0] - 1)
                        for j in (0, volume.shape_ijk[1] - 1)
                        for k in (0, volume.shape_ijk[2] - 1)], float)
    ras = volume.ijk_to_ras_points(corners)
    lo, hi = ras.min(0), ras.max(0)
    # LPS identity grid: column along L (from patient right), row along P (from anterior).
    nx = int(np.ceil((hi[0] - lo[0]) / pixel_mm)) + 1
    ny = int(np.ceil((hi[1] - lo[1]) / pixel_mm)) + 1
    ref = sitk.Image([nx, ny, 1], sitk.sitkFloat32)
    ref.SetSpacing([pixel_mm, pixel_mm, 1.0])
    ref.SetOrigin([-hi[0], -hi[1], s_mm])
    out = sitk.Resample(img, ref, sitk.Transform(), sitk.sitkLinear, np.nan, sitk.sitkFloat32)
    arr = sitk.GetArrayFromImage(out)[0]
    return arr, (hi[0], lo[0], lo[1], hi[1])  # left edge R=hi, right edge R=lo; rows A hi->lo


def _panels(rows: list, volume: Volume, max_panels: int) -> list:
    """Group lesions into at most ``max_panels`` axial slabs; returns ``[(s_mm, [rows])]``."""
    if not rows:
        k = volume.shape_ijk[2]
        centre = volume.ijk_to_ras_points([[volume.shape_ijk[0] / 2, volume.shape_ijk[1] / 2,
                                            f * (k - 1)] for f in (0.35, 0.5, 0.65, 0.8)])
        return [(float(c[2]), []) for c in centre]
    order = sorted(rows, key=lambda r: r["S"])
    width = 2.0
    while True:
        groups, cur = [], [order[0]]
        for r in order[1:]:
            if r["S"] - cur[0]["S"] <= width:
                cur.append(r)
            else:
                groups.append(cur)
                cur = [r]
        groups.append(cur)
        if len(groups) <= max_panels:
            break
        width *= 1.5
    return [(float(np.median([r["S"] for r in g])), g) for g in groups]


def _figure_png(volume: Volume, panels: list, pixel_mm: float) -> bytes:
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt
    from matplotlib.patches import Circle

    a = np.asarray(volume.array, np.float32)
    nz = a[np.isfinite(a) & (a != 0)]
    lo, hi = (np.percentile(nz, [1, 99]) if nz.size else (0.0, 1.0))
    n = len(panels)
    cols = min(4, n)
    rows_n = int(np.ceil(n / cols))
    fig, axes = plt.subplots(rows_n, cols, figsize=(2.1 * cols, 2.4 * rows_n), dpi=110,
                             squeeze=False)
    for ax in axes.ravel():
        ax.axis("off")
    for ax, (s_mm, group) in zip(axes.ravel(), panels):
        img, (left, right, bottom, top) = _axial_slice(volume, s_mm, pixel_mm)
        # imshow extent in display coordinates: x = -R (so patient right is on the left).
        ax.imshow(np.nan_to_num(img, nan=lo), cmap="gray", vmin=lo, vmax=hi,
                  extent=(-left, -right, bottom, top), origin="upper")
        for r in group:
            radius = max(4.0, 1.5 * (r["diameter_mm"] or 3.0))
            off = abs(r["S"] - s_mm) > 1.0
            ax.add_patch(Circle((-r["R"], r["A"]), radius, fill=False, lw=1.2,
                                ec="orange" if r["status"] == "added" else "red",
                                ls="--" if off else "-"))
            ax.text(-r["R"] + radius, r["A"] + radius, str(r["id"]), color="yellow",
                    fontsize=7, fontweight="bold")
        ax.set_title(f"S = {s_mm:.1f} mm" + (f" · {len(group)} CMB" if group else ""),
                     fontsize=7)
        ax.text(0.02, 0.02, "R", color="white", fontsize=7, transform=ax.transAxes)
        ax.text(0.93, 0.02, "L", color="white", fontsize=7, transform=ax.transAxes)
    fig.tight_layout(pad=0.3)
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()


# --------------------------------------------------------------------------------------------
# HTML
# --------------------------------------------------------------------------------------------
_CSS = """
@page { size: A4; margin: 10mm; }
body { font-family: Helvetica, Arial, sans-serif; font-size: 9pt; margin: 0 auto;
       max-width: 190mm; color: #111; }
h1 { font-size: 14pt; margin: 2mm 0; } h2 { font-size: 10.5pt; margin: 3mm 0 1mm; }
.banner { border: 2px solid #b00; color: #b00; font-weight: bold; padding: 1.5mm 3mm;
          text-align: center; margin: 2mm 0; }
table { border-collapse: collapse; width: 100%; }
td, th { border: 1px solid #bbb; padding: 0.6mm 1.5mm; text-align: left; vertical-align: top; }
th { background: #eee; } .num { text-align: right; }
.meta td { border: none; padding: 0.3mm 2mm 0.3mm 0; }
.def { color: #444; font-size: 8pt; } .warn { color: #b00; font-weight: bold; }
.cols { display: flex; gap: 4mm; } .cols > div { flex: 1; }
img.slices { width: 100%; } .small { font-size: 7.5pt; color: #555; }
tr.uncertain td.cat { font-style: italic; }
.lesions td:nth-child(2) { white-space: nowrap; }
"""


def _counts_table(summary: dict | None, rows: list) -> str:
    from .locate import CATEGORIES, DEEP_GROUPS, INFRA_GROUPS, LOBES

    counted = [r for r in rows if r["status"] != "rejected"]
    out = ['<table class="counts"><tr><th>Where</th><th class="num">CMBs</th>'
           '<th>Definition</th></tr>',
           f'<tr><td><b>Total</b></td><td class="num" data-count="total">{len(counted)}</td>'
           f'<td class="def">rejected excluded, added included</td></tr>']
    if summary is None:
        out.append('<tr><td colspan="3" class="def">Location not computed '
                   '(run with --locate).</td></tr></table>')
        return "".join(out)
    defs = summary["definitions"]["categories"]
    for cat, groups in zip(CATEGORIES, (LOBES, DEEP_GROUPS, INFRA_GROUPS)):
        n = summary["by_category"][cat]
        parts = " · ".join(
            f'{_esc(g)} <b data-count="group:{_esc(g)}">{summary["by_region"][g]}</b>'
            for g in groups)
        out.append(f'<tr><td><b>{cat.capitalize()}</b></td><td class="num" '
                   f'data-count="{cat}">{n}</td><td>{parts}<br>'
                   f'<span class="def">{_esc(defs[cat])}</span></td></tr>')
    out.append("</table>")
    return "".join(out)


def _lesion_table(rows: list) -> str:
    head = ("<tr><th>#</th><th>Label</th><th class=num>R</th><th class=num>A</th>"
            "<th class=num>S</th><th class=num>Ø mm</th><th class=num>Conf.</th>"
            "<th>Category</th><th>Region</th><th>Side</th><th>Review</th></tr>")
    body = []
    for r in rows:
        if r["status"] == "rejected":
            continue
        cls = "lesion uncertain" if r["uncertain"] else "lesion"
        cat = _esc(r["category"]) + (" (?)" if r["uncertain"] and r["category"] else "")
        diam = "" if r["diameter_mm"] is None else f"{r['diameter_mm']:.1f}"
        conf = "" if r["confidence"] is None else f"{r['confidence']:.2f}"
        body.append(
            f'<tr class="{cls}" data-category="{_esc(r["category"])}" '
            f'data-group="{_esc(r["group"])}" data-status="{_esc(r["status"])}">'
            f'<td>{r["id"]}</td><td>{_esc(r["label"])}</td>'
            f'<td class=num>{r["R"]:.1f}</td><td class=num>{r["A"]:.1f}</td>'
            f'<td class=num>{r["S"]:.1f}</td>'
            f'<td class=num>{diam}</td><td class=num>{conf}</td>'
            f'<td class="cat">{cat}</td><td>{_esc(r["region"])}</td><td>{_esc(r["side"])}</td>'
            f'<td>{_esc(r["status"])}</td></tr>')
    if not body:
        body.append('<tr><td colspan="11">No microbleeds reported.</td></tr>')
    return f'<table class="lesions">{head}{"".join(body)}</table>'


def render_report(volume: Volume, lesions, location=None, model_version: str = "",
                  modality: str | None = None, threshold: float | None = None,
                  max_panels: int = MAX_PANELS) -> str:
    """The report as one HTML string (see :func:`write_report`)."""
    rows = _rows(lesions, location)
    summary = location.summary if location is not None else None
    counted = [r for r in rows if r["status"] != "rejected"]
    spacing = volume.spacing
    pixel_mm = float(max(0.5, min(spacing[0], spacing[1], 1.0)))
    png = _figure_png(volume, _panels(counted, volume, max_panels), pixel_mm)
    meta = volume.metadata or {}
    ident = [("Scan", volume.name or Path(str(meta.get("source", ""))).name),
             ("Patient ID", meta.get("PatientID", "")),
             ("Study date", meta.get("StudyDate", "")),
             ("Series", meta.get("SeriesDescription", "")),
             ("Modality", (modality or meta.get("modality", "")).upper()),
             ("Grid", " × ".join(str(s) for s in volume.shape_ijk) + " voxels, "
              + " × ".join(f"{s:.2f}" for s in spacing) + " mm"),
             ("Source file", meta.get("source", ""))]
    ident = [(k, v) for k, v in ident if v]
    prov = [("Model version", model_version or "unknown"),
            ("Software", f"cmbdetector {__version__}"),
            ("Confidence threshold", "" if threshold is None else f"{threshold:.2f}"),
            ("Generated", _dt.datetime.now().strftime("%Y-%m-%d %H:%M"))]
    loc_html = ""
    if summary is not None:
        reg = summary.get("registration") or {}
        warn = (f'<p class="warn">{_esc(reg["warning"])}</p>' if reg.get("warning") else "")
        loc_html = (
            f'<p><b>Distribution: <span data-count="distribution">'
            f'{_esc(summary["distribution"])}</span></b> — '
            f'<span class="def">{_esc(summary["distribution_definition"])}</span></p>'
            f'<p class="def">{_esc(summary["definitions"]["boston_v2_context"])}</p>'
            f'<p class="small">Location: registration to {_esc(summary["template"])}, atlas '
            f'{_esc(summary["atlas"])}; brain-mask Dice {reg.get("dice", "")}. '
            f'Uncertain (?) = {_esc(summary["definitions"]["uncertain"])}: '
            f'<span data-count="uncertain">{summary["uncertain"]}</span>.</p>{warn}')
    items = ident + [(k, v) for k, v in prov if v]
    half = (len(items) + 1) // 2
    cells = [f"<td><b>{_esc(k)}</b></td><td>{_esc(v)}</td>" for k, v in items]
    meta_rows = "".join(f"<tr>{a}{b}</tr>" for a, b in
                        zip(cells[:half], cells[half:] + [""] * (2 * half - len(cells))))
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<title>CMBDetector report – {_esc(volume.name)}</title><style>{_CSS}</style></head>
<body>
<h1>Cerebral microbleed report</h1>
<div class="banner">NOT FOR DIAGNOSTIC USE — research software; models trained on simulated
lesions only. Every finding must be checked by a qualified reader.</div>
<table class="meta">{meta_rows}</table>
<h2>Counts by region</h2>{_counts_table(summary, rows)}
{loc_html}
<h2>Axial slices (radiological view: patient right on the left)</h2>
<img class="slices" alt="axial slices with lesions marked"
 src="data:image/png;base64,{base64.b64encode(png).decode("ascii")}">
<p class="small">Circles mark each counted lesion with its number (solid: lesion centre in
this slice; dashed: within the slab shown; orange: added by the reader).</p>
<h2>Lesions</h2>{_lesion_table(rows)}
<p class="small">Coordinates: scanner RAS mm. Rejected lesions are excluded from table and
counts ({sum(r["status"] == "rejected" for r in rows)} rejected).</p>
</body></html>
"""


def write_report(path, volume: Volume, lesions, location=None, model_version: str = "",
                 modality: str | None = None, threshold: float | None = None) -> str:
    """Write the one-page HTML report atomically; returns its path.

    Parameters
    ----------
    path : output ``.html`` file.
    volume : the scan the lesions refer to (identifiers come from ``name``/``metadata``).
    lesions : :class:`~CMBDetectorLib.engine.results.Lesion` objects or dicts (see
        :func:`CMBDetectorLib.location.locate.lesion_records`); optional ``status`` for review.
    location : :class:`~CMBDetectorLib.location.locate.LocationResult` or None (no region columns).
    model_version : recorded on the page (e.g. ``DetectionResult.model_version``).
    """
    path = Path(path)
    text = render_report(volume, list(lesions or []), location, model_version, modality,
                         threshold)
    tmp = path.with_name(f".{path.name}.part{os.getpid()}")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)
    return str(path)
