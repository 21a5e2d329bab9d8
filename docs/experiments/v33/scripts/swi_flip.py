"""swi_flip.py SEED MASK [SEED MASK ...]: a selection-scan subject (seeds 3100208-3100215, drawn with
--n-cmbs 4 10) re-simulated with only its SWI phase-mask sign changed (its own filter, width, power
and mIP kept); SWI only, into runs/swiflip/<seed>_<mask>. Validation scans only."""
import json, sys
from concurrent.futures import ProcessPoolExecutor
from dataclasses import replace
from pathlib import Path


def one(seed, mask):
    sys.path.insert(0, "CMBDetector")
    from CMBDetectorLib.simulation.anatomies import available_anatomies
    from CMBDetectorLib.simulation.domains import domain_config
    from CMBDetectorLib.simulation.simulator import SimulationConfig, simulate_subject, write_subject

    a = json.loads(Path(f"runs/valsel25/sub-{seed}_truth.json").read_text())["params"]["appearance"]["swi"]
    cfg = domain_config(seed, "validation", SimulationConfig(n_cmbs=(4, 10)), available_anatomies())
    cfg = replace(cfg, swi_filter=a["filter"], swi_filter_width=a["sigma_mm"], swi_mask=mask,
                  swi_power=a["power"], swi_mip=a["mip"])
    subj = simulate_subject(seed, cfg)
    out = Path("runs/swiflip") / f"{seed}_{mask}"
    write_subject(subj, out, f"sub-{seed}", modalities=("swi",))
    return str(out)


if __name__ == "__main__":
    args = sys.argv[1:]
    jobs = [(int(args[i]), args[i + 1]) for i in range(0, len(args), 2)]
    with ProcessPoolExecutor(2) as ex:
        for out in ex.map(one, *zip(*jobs)):
            print(out, "done", flush=True)
