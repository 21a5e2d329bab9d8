"""Detect the selection scans with the simulator's brain mask, but normalise with the statistics
of the automatic mask (monkeypatched), to see whether the mask's statistics cost the CMBs."""
import sys, glob
from pathlib import Path
import numpy as np
sys.path.insert(0, "CMBDetector")
import CMBDetectorLib.engine.preprocessing as P
from CMBDetectorLib.engine.volume import read_volume
from CMBDetectorLib.engine.detection import detect, default_settings
from CMBDetectorLib.engine.models import load_bundle
from CMBDetectorLib.engine.outputs import write_outputs
def patched(array, mask, modality, method="percentile"):
    """The ``iqr`` scaling with the automatic mask's statistics, zero outside the given mask."""
    auto = P.brain_mask(array, 1.0, modality, 0.0, "log")
    inside = np.asarray(array, np.float32)[auto]
    sign = -1.0 if modality in ("gre", "swi") else 1.0
    med = float(np.median(inside)); q25, q75 = np.percentile(inside, [25, 75])
    o = np.clip(sign * (np.asarray(array, np.float32) - med) / max(P.IQR_UNITS * float(q75 - q25), 1e-6), -3, 3)
    o[~mask] = 0.0
    return o.astype(np.float32)
P.normalise = patched
bundle = load_bundle("CMBDetector/Resources/Models", device="cpu")
s = default_settings(bundle)
assert s.normalisation == "iqr" and s.working_spacing_mm == 1.0
out = Path(sys.argv[1]); out.mkdir(parents=True, exist_ok=True)
for f in sorted(glob.glob("runs/valsel25/sub-*_*.nii.gz")):
    stem = Path(f).name[:-7]
    if stem.split("_")[1] not in ("gre", "swi", "qsm"):
        continue
    sub, m = stem.split("_")
    vol = read_volume(f); mask = read_volume(f"runs/valsel25/{sub}_brainmask.nii.gz")
    res = detect(vol, m, mask, s, bundle)
    write_outputs(vol, res, out, name=stem)
    print(stem, len(res.candidates), flush=True)
