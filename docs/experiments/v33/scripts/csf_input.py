"""csf_input.py: detector input and output at cortex-touching vs free CMBs (validation scans)."""
import json, sys
from pathlib import Path
import numpy as np
sys.path.insert(0, "CMBDetector")
from CMBDetectorLib.engine.detection import prepare_file, default_settings
from CMBDetectorLib.engine.models import load_bundle
from CMBDetectorLib.engine.inference import predict_volume

scans = Path("runs/valsel25")
models = load_bundle(device="cpu")
rows = json.load(open("runs/rank/v31_percmb.json"))
stems = sorted({r["stem"] for r in rows if r["touches"] == "cortex"})
out = []
for stem in stems:
    truth = json.loads((scans / f"{stem}_truth.json").read_text())
    for m in ("swi", "gre"):
        settings = default_settings(models)
        p = prepare_file(scans / f"{stem}_{m}.nii.gz", m, settings=settings)
        prob = predict_volume(models.detector, p.channels, settings.tile_size, settings.tile_overlap)
        img, frst, mask = p.prep.image, p.prep.frst, p.prep.mask
        kk, jj, ii = np.indices((9, 9, 9)) - 4
        r = np.sqrt(kk**2 + jj**2 + ii**2)
        for c in truth["cmbs"]:
            ijk = p.prep.grid.ras_to_ijk_points(np.array([c["centre_ras"]]))[0]
            k, j, i = np.rint(ijk[::-1]).astype(int)
            sl = (slice(k-4, k+5), slice(j-4, j+5), slice(i-4, i+5))
            I, F, P, M = img[sl], frst[sl], prob[sl], mask[sl]
            core = r <= 1.5
            shell = (r >= 3) & (r <= 4.5)
            vis = c.get(f"{m}_visible_diameter_mm", c["visible_diameter_mm"])
            out.append(dict(stem=stem, mod=m, touches=c.get("touches"), vis=round(vis, 1),
                            pmax=round(float(P[r <= 2.5].max()), 3),
                            core=round(float(I[core].mean()), 2),
                            shell_in=round(float(np.median(I[shell & M])) if (shell & M).any() else np.nan, 2),
                            shell_all=round(float(np.median(I[shell])), 2),
                            shell_p90=round(float(np.percentile(I[shell], 90)), 2),
                            mask_shell=round(float(M[shell].mean()), 2),
                            frst_core=round(float(F[core].mean()), 3),
                            frst_max=round(float(F[r <= 2.5].max()), 3)))
            print(out[-1], flush=True)
json.dump(out, open("runs/csf/csf_input.json", "w"), indent=0)
