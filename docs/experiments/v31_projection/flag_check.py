"""flag_check.py SCANS [EXTRA.nii.gz ...]: the projection found in every scan of a simulated set
against the simulator's record (``params.appearance.swi.mip``), plus any extra volumes.
Run from the repository root."""
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, "CMBDetector")
from CMBDetectorLib.engine.projection import find_projection  # noqa: E402
from CMBDetectorLib.engine.volume import read_volume  # noqa: E402

scans = Path(sys.argv[1])
wrong, seconds = 0, []
for truth in sorted(scans.glob("sub-*_truth.json")):
    stem = truth.name[:-len("_truth.json")]
    params = json.loads(truth.read_text())["params"]
    mip = int(params["appearance"]["swi"].get("mip", 0))
    for m in ("gre", "swi", "qsm"):
        vol = read_volume(scans / f"{stem}_{m}.nii.gz")
        t0 = time.perf_counter()
        p = find_projection(vol)
        seconds.append(time.perf_counter() - t0)
        expected = mip if (m == "swi" and mip > 1) else 0
        # the simulator projects along its array's last axis, the NIfTI's k (the slice axis)
        ok = (p is None and expected == 0) or (p is not None and expected > 0 and p.axis_ijk == 2)
        wrong += not ok
        if p is not None or expected or not ok:
            print(stem, m, "mIP", expected, "found", None if p is None else
                  (p.axis_ijk, p.n_slices, round(p.equal_fraction, 3)), "" if ok else "WRONG")
for extra in sys.argv[2:]:
    p = find_projection(read_volume(extra))
    wrong += p is not None
    print(extra, "found", p)
print(f"{len(seconds)} scans, {wrong} wrong; {max(seconds):.2f} s at most, "
      f"{sum(seconds) / len(seconds):.2f} s mean")
