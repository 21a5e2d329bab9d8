"""probe_swi.py: for SWI CMBs without a candidate (validation subjects), the brain mask at the
centre (open / closed 3 mm), the normalised image there, and the detector's peak within 3 mm."""
import json, sys
import numpy as np
sys.path.insert(0, "CMBDetector")
from CMBDetectorLib.engine.detection import prepare_file, default_settings
from CMBDetectorLib.engine.models import load_bundle
from CMBDetectorLib.engine.inference import predict_volume
import dataclasses
cases = [("runs/valsel96", "3100224", 6.8), ("runs/valsel96", "3100225", 8.3), ("runs/valsel96", "3100231", 6.0),
         ("runs/valsel96", "3100241", 7.4), ("runs/valsel_d", "3100308", 9.1), ("runs/valsel_d", "3100310", 8.1),
         ("runs/valsel_d", "3100315", 6.6), ("runs/valsel96", "3100288", 10.8)]
models = load_bundle(); s0 = default_settings(models)
for folder, sub, vis in cases:
    t = json.load(open(f"{folder}/sub-{sub}_truth.json"))
    c = min(t["cmbs"], key=lambda c: abs(c.get("swi_visible_diameter_mm", 0) - vis))
    out = [sub, t["params"]["appearance"]["swi"], c["touches"], round(c["swi_visible_diameter_mm"], 1), round(c["visible_diameter_mm"], 1)]
    for m, mc in (("swi", 0.0), ("swi", 3.0), ("gre", 0.0)):
        st = dataclasses.replace(s0, mask_closing_mm=mc)
        p = prepare_file(f"{folder}/sub-{sub}_{m}.nii.gz", m, settings=st)
        g = p.prep.grid
        ijk = g.ras_to_ijk_points(np.array([c["centre_ras"]]))[0]
        k, j, i = np.round(ijk[::-1]).astype(int)
        inside = bool(p.prep.mask[k, j, i])
        from scipy import ndimage as ndi
        dist = ndi.distance_transform_edt(p.prep.mask)[k, j, i]
        prob = predict_volume(models.detector, p.channels, st.tile_size, st.tile_overlap)
        r = 3
        pk = float(prob[max(k-r,0):k+r+1, max(j-r,0):j+r+1, max(i-r,0):i+r+1].max())
        im = p.channels[0]; fr = p.channels[1]
        out.append(f"{m}/c{mc:g}: in={inside} edge={dist:.1f} img={im[k,j,i]:.2f} imgmin3={im[k-2:k+3,j-2:j+3,i-2:i+3].min():.2f} frst={fr[k-2:k+3,j-2:j+3,i-2:i+3].max():.2f} det={pk:.3f}")
    print(*out, sep="\n  ", flush=True)
