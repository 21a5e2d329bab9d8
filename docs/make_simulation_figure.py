"""Regenerate docs/simulation_examples.png: two axial slices of one simulated subject (SWI, QSM,
GRE) with the ground-truth CMBs circled. Run: ``.venv/bin/python docs/make_simulation_figure.py``."""
from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np


def main(out="docs/simulation_examples.png", seed=7):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from CMBDetectorLib.simulation.anatomy import load_template
    from CMBDetectorLib.simulation.simulator import SimulationConfig, simulate_subject

    load_template()  # once per process; not part of the per-subject time

    cfg = SimulationConfig(spacing_mm=(0.7, 0.7, 1.5), te_ms=20.0, b0_t=3.0, n_cmbs=12,
                           oblique_deg=6.0, flip_axes=False)
    t0 = time.perf_counter()
    sub = simulate_subject(seed, cfg)
    el = time.perf_counter() - t0
    swi, qsm, gre = (sub.images[m] for m in ("swi", "qsm", "gre"))
    cmbs = sub.truth["cmbs"]
    ijk = swi.ras_to_ijk_points([c["centre_ras"] for c in cmbs]) if cmbs else np.zeros((0, 3))
    ks = np.round(ijk[:, 2]).astype(int)
    # two slices with the most CMBs (within +-2 slices), at least 8 slices apart
    score = {k: int(np.sum(np.abs(ks - k) <= 2)) for k in range(swi.array.shape[0])}
    order = sorted(score, key=lambda k: (-score[k], abs(k - swi.array.shape[0] // 2)))
    chosen = [order[0]]
    chosen.append(next(k for k in order if abs(k - chosen[0]) >= 8))
    chosen.sort()
    fig, axes = plt.subplots(2, 3, figsize=(13, 9.2))
    lo_s, hi_s = np.percentile(swi.array[sub.brain_mask.array > 0], [0.5, 99.5])
    lo_g, hi_g = np.percentile(gre.array[sub.brain_mask.array > 0], [0.5, 99.5])
    for r, k in enumerate(chosen):
        for c, (vol, name, vmin, vmax) in enumerate(((swi, "SWI", lo_s, hi_s),
                                                      (qsm, "QSM (ppm)", -0.15, 0.25),
                                                      (gre, "GRE magnitude", lo_g, hi_g))):
            ax = axes[r, c]
            im = ax.imshow(vol.array[k], cmap="gray",
                           vmin=vmin, vmax=vmax, origin="lower", interpolation="nearest")
            for q, cm in enumerate(cmbs):
                if abs(ijk[q, 2] - k) <= 2:
                    ax.add_patch(plt.Circle((ijk[q, 0], ijk[q, 1]), 6.0 / swi.spacing[0],
                                            fill=False, color="red", lw=1.2))
                    ax.text(ijk[q, 0] + 7 / swi.spacing[0], ijk[q, 1] + 7 / swi.spacing[0],
                            str(cm["id"]), color="red", fontsize=8)
            ax.set_title(f"{name}, slice k={k}", fontsize=10)
            ax.set_xticks([])
            ax.set_yticks([])
            if c == 1:
                fig.colorbar(im, ax=ax, fraction=0.04)
    p = sub.truth["params"]
    fig.suptitle(f"Simulated subject (seed {seed}): {p['B0_T']} T, TE {p['TE_ms']} ms, "
                 f"{p['spacing'][0]}x{p['spacing'][1]}x{p['spacing'][2]} mm; red circles = "
                 f"ground-truth CMBs within +-2 slices ({len(cmbs)} in the volume); "
                 f"simulated in {el:.1f} s", fontsize=10)
    fig.tight_layout()
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=80)
    print(out, f"{el:.1f} s", chosen)


if __name__ == "__main__":
    main(*sys.argv[1:2])
