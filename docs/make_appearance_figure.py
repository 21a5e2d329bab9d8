"""Regenerate docs/appearance_variants.png: one axial slice of one small simulated subject per
appearance variant (GRE weighting and acquisition, SWI processing, QSM reconstruction).

Run: ``.venv/bin/python docs/make_appearance_figure.py``. The same seed everywhere, so every
panel shows the same anatomy, lesions and noise draws; only the appearance changes."""
from __future__ import annotations

import sys
import time

import numpy as np

SEED = 7
BASE = dict(roi_mm=(96.0, 96.0, 18.0), roi_center_mni=(0.0, -14.0, 8.0),
            spacing_mm=(0.8, 0.8, 1.5), te_ms=20.0, b0_t=3.0, snr=45.0, oblique_deg=0.0,
            flip_axes=False, n_cmbs=6)

ROWS = [
    ("gre", [("default (t2star)", {}),
             ("2D long TR", dict(gre_weighting="2d_long_tr")),
             ("3D short-TR spoiled", dict(gre_weighting="3d_spoiled")),
             ("mixed PD/T1", dict(gre_weighting="mixed")),
             ("Gibbs 0.3 + ghost 0.05", dict(gibbs=0.3, ghosting=0.05)),
             ("g-factor 1.5 + texture\n+ bias x2.5", dict(gfactor=1.5, texture=0.05,
                                                          bias_strength=2.5))]),
    ("swi", [("default (Gauss 3 mm, neg., ^4)", {}),
             ("Hann 2D, 1.5 mm", dict(swi_filter="hann", homodyne_sigma_mm=1.5)),
             ("Gauss 6 mm, ^2", dict(homodyne_sigma_mm=6.0, swi_power=2)),
             ("power 6", dict(swi_power=6)),
             ("both-sided mask", dict(swi_mask="both")),
             ("mIP 4 slices", dict(swi_mip=4))]),
    ("qsm", [("default (blurred chi)", {}),
             ("TKD 0.1", None),
             ("TKD 0.2", None),
             ("Tikhonov", dict(qsm_recon="tikhonov")),
             ("TKD + background 0.01", dict(qsm_recon="tkd", qsm_background=0.01)),
             ("scale 0.7, offset +0.03", dict(qsm_scale=0.7, qsm_offset_ppm=0.03))]),
]


def _tkd_subject(seed, threshold):
    """A TKD subject at a chosen threshold (the config draws it in 0.1-0.2 per subject)."""
    from CMBDetectorLib.simulation import appearance as ap
    from CMBDetectorLib.simulation.simulator import SimulationConfig, simulate_subject

    draw = ap.draw_qsm
    ap.draw_qsm = lambda knobs, rngs: dict(draw(knobs, rngs), threshold=threshold)
    try:
        return simulate_subject(seed, SimulationConfig(**BASE, qsm_recon="tkd"))
    finally:
        ap.draw_qsm = draw


def main(out="docs/appearance_variants.png"):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from CMBDetectorLib.simulation.anatomy import load_template
    from CMBDetectorLib.simulation.simulator import SimulationConfig, simulate_subject

    load_template()
    t0 = time.perf_counter()
    ref = simulate_subject(SEED, SimulationConfig(**BASE))
    brain = ref.brain_mask.array > 0
    cmbs = ref.truth["cmbs"]
    ijk = ref.images["gre"].ras_to_ijk_points([c["centre_ras"] for c in cmbs])
    ks = np.round(ijk[:, 2]).astype(int)
    k = int(np.bincount(ks[(ks >= 0) & (ks < brain.shape[0])]).argmax()) if len(ks) else \
        brain.shape[0] // 2
    fig, axes = plt.subplots(3, 6, figsize=(18, 9.6))
    for r, (mod, variants) in enumerate(ROWS):
        for c, (title, kw) in enumerate(variants):
            if kw is None:
                sub = _tkd_subject(SEED, float(title.split()[-1]))
            else:
                sub = simulate_subject(SEED, SimulationConfig(**BASE, **kw)) if kw else ref
            img = sub.images[mod].array[k]
            ax = axes[r, c]
            if mod == "qsm":
                ax.imshow(img, cmap="gray", vmin=-0.15, vmax=0.15, origin="lower")
            else:
                lo, hi = np.percentile(sub.images[mod].array[brain], [0.5, 99.5])
                ax.imshow(img, cmap="gray", vmin=lo, vmax=hi, origin="lower")
            for p, kk in zip(ijk, ks):
                if abs(kk - k) <= 1:
                    ax.add_patch(plt.Circle((p[0], p[1]), 6, fill=False, color="yellow", lw=0.8))
            ax.set_title(f"{mod.upper()}: {title}", fontsize=9)
            ax.set_axis_off()
    fig.suptitle(f"Appearance variants of one simulated subject (seed {SEED}, 3 T, TE 20 ms, "
                 f"0.8 x 0.8 x 1.5 mm; axial slice {k}; CMBs circled; QSM -0.15..0.15 ppm)",
                 fontsize=11)
    fig.tight_layout()
    fig.savefig(out, dpi=80)
    print(f"wrote {out} in {time.perf_counter() - t0:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:]))
