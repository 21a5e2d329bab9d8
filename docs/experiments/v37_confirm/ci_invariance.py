"""ci_invariance.py MODELS: the CI invariance test's subject and verdict for any bundle
(Testing/engine/test_intensity_invariance.py runs it for the bundled one)."""
import sys
sys.path.insert(0, "CMBDetector")
from CMBDetectorLib.engine.models import load_bundle
from CMBDetectorLib.evaluation.invariance import lesion_changes
from CMBDetectorLib.simulation.simulator import SimulationConfig, simulate_subject

bundle = load_bundle(sys.argv[1], device="cpu")
subject = simulate_subject(3_200_500, SimulationConfig(roi_mm=96.0, n_cmbs=12, cmb_size_prior="real"))
ok = True
for m in ("gre", "swi", "qsm"):
    changes = lesion_changes(subject.images[m], m, bundle)
    n_ref = changes["gamma 0.7"][0]
    ok &= n_ref >= 3
    for name, (n, lost, gained) in changes.items():
        good = lost + gained <= max(1, n // 4)
        ok &= good
        print(m, name, "n", n, "lost", lost, "gained", gained, "ok" if good else "FAIL", flush=True)
print("PASS" if ok else "FAIL")
