"""What ``find_projection`` finds on every scan of a simulated set, beside what the simulator
made (shared by v31_projection/flag_check.py and v31_unprojection/reversal_check.py)."""
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, "CMBDetector")
from CMBDetectorLib.engine.projection import find_projection  # noqa: E402
from CMBDetectorLib.engine.volume import read_volume  # noqa: E402


def found_projections(scans):
    """Yield ``(stem, modality, expected, projection, seconds)`` for every GRE, SWI and QSM
    scan of the folder ``scans``: ``expected`` is the simulator's mIP slab on an SWI
    (``params.appearance.swi.mip`` > 1), else 0; ``seconds`` is ``find_projection``'s time."""
    scans = Path(scans)
    for truth in sorted(scans.glob("sub-*_truth.json")):
        stem = truth.name[:-len("_truth.json")]
        params = json.loads(truth.read_text())["params"]
        mip = int(params.get("appearance", {}).get("swi", {}).get("mip", 0))
        for m in ("gre", "swi", "qsm"):
            vol = read_volume(scans / f"{stem}_{m}.nii.gz")
            t0 = time.perf_counter()
            p = find_projection(vol)
            yield stem, m, (mip if (m == "swi" and mip > 1) else 0), p, time.perf_counter() - t0
