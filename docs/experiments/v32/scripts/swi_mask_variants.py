"""swi_mask_variants.py: validation subject 3100208 (selection scans) re-simulated with only its
SWI phase mask changed; same anatomy, lesions, GRE and QSM. Validation scans only."""
import sys
from concurrent.futures import ProcessPoolExecutor
from dataclasses import replace
from pathlib import Path

SEED = 3100208
VARIANTS = {"pos6": ("positive", 6), "pos2": ("positive", 2), "neg6": ("negative", 6),
            "both6": ("both", 6)}


def one(name):
    from CMBDetectorLib.simulation.anatomies import available_anatomies
    from CMBDetectorLib.simulation.domains import domain_config
    from CMBDetectorLib.simulation.simulator import SimulationConfig, simulate_subject, write_subject

    mask, power = VARIANTS[name]
    base = SimulationConfig(n_cmbs=(4, 10))
    cfg = domain_config(SEED, "validation", base, available_anatomies())
    cfg = replace(cfg, swi_filter="gaussian", swi_filter_width=1.8419357532095981,
                  swi_mask=mask, swi_power=power, swi_mip=0)
    subj = simulate_subject(SEED, cfg)
    out = Path("runs/swivar") / name
    write_subject(subj, out, f"sub-{SEED}", modalities=("swi",))
    return name


if __name__ == "__main__":
    with ProcessPoolExecutor(2) as ex:
        for n in ex.map(one, sys.argv[1:] or list(VARIANTS)):
            print(n, "done", flush=True)
