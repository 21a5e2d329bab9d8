"""Draw docs/anatomies.png: one axial slice of each anatomy's T1 and tissue maps (MNI152 first).

Why: a look at what the simulator builds subjects from catches a failed registration or
segmentation at once. Run: ``.venv/bin/python docs/make_anatomies_figure.py`` (builds missing
anatomies first; cached afterwards).
"""
from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
from CMBDetectorLib.simulation.anatomies import available_anatomies, load_anatomy
from CMBDetectorLib.simulation.anatomy import load_template, template_dir

Z_MNI = 8.0  # axial slice through the basal ganglia and thalami (MNI mm)


def _rgb(a, zi):
    """GM red, WM green, CSF blue, iron nuclei outlined later."""
    gm, wm = a.gm[:, :, zi].T, a.wm[:, :, zi].T
    csf = np.clip(a.brain[:, :, zi].T - gm - wm, 0, 1)
    return np.clip(np.stack([gm, wm, csf], -1), 0, 1)


def main(out=Path(__file__).with_name("anatomies.png")):
    import nibabel as nib

    mni = load_template()
    t1 = np.asarray(nib.load(str(template_dir() / "mni_icbm152_t1_tal_nlin_sym_09a_converted"
                                 ".nii.gz")).dataobj, np.float32)
    f0 = {k: float(v.sum() / mni.brain.sum()) for k, v in
          (("gm", mni.gm), ("wm", mni.wm), ("csf", mni.brain - mni.gm - mni.wm))}
    rows = [("mni152", mni, t1 / np.percentile(t1[mni.brain > 0], 99.5),
             f"mni152 (default)\n{mni.brain.sum() / 1000:.0f} ml, GM/WM/CSF "
             f"{f0['gm']:.2f}/{f0['wm']:.2f}/{f0['csf']:.2f}")]
    for n in available_anatomies():
        a = load_anatomy(n)
        f = a.info["tissue_fraction"]
        rows.append((n, a, a.t1, f"{n}\n{a.info['native_brain_ml']:.0f} ml, GM/WM/CSF "
                                 f"{f['gm']:.2f}/{f['wm']:.2f}/{f['csf']:.2f}"))
    zi = int(round(Z_MNI - mni.origin[2]))
    fig, ax = plt.subplots(2, len(rows), figsize=(2.3 * len(rows), 5.6))
    box = np.argwhere(mni.brain[:, :, zi] > 0)
    (x0, y0), (x1, y1) = box.min(0) - 8, box.max(0) + 8
    for c, (name, a, t, title) in enumerate(rows):
        for r in range(2):
            ax[r, c].set_xlim(x0, x1)
            ax[r, c].set_ylim(y0, y1)
        ax[0, c].imshow(np.clip(t[:, :, zi].T, 0, 1.1), origin="lower", cmap="gray")
        ax[0, c].contour(a.brain[:, :, zi].T, [0.5], colors="y", linewidths=0.6)
        ax[0, c].set_title(title, fontsize=8)
        ax[1, c].imshow(_rgb(a, zi), origin="lower")
        nuc = a.nuclei[:, :, zi].T
        if np.any(nuc):
            ax[1, c].contour(nuc > 0, [0.5], colors="w", linewidths=0.6)
        for r in range(2):
            ax[r, c].set_axis_off()
    fig.suptitle(f"Anatomies of the simulator: T1 (brain mask yellow) and GM red / WM green / "
                 f"CSF blue, deep nuclei white; axial z = {Z_MNI:.0f} mm after the affine to MNI; "
                 "ml = native brain volume", fontsize=9)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    print(out)


if __name__ == "__main__":
    main()
