"""The shipped models must not depend on one scanner's intensity curve: a scan and the same
scan after a monotone intensity change (gamma 0.7-1.4), another bias field or more noise give
the same lesions."""
from __future__ import annotations

import pytest

pytest.importorskip("torch")

from CMBDetectorLib.evaluation.invariance import lesion_changes as _changes


def lesion_changes(subject, modality: str, bundle) -> dict:
    """For each change: (lesions of the original, lost, gained)."""
    return _changes(subject.images[modality], modality, bundle)


@pytest.fixture(scope="module")
def subject():
    from CMBDetectorLib.simulation.simulator import SimulationConfig, simulate_subject

    return simulate_subject(3_200_500, SimulationConfig(roi_mm=96.0, n_cmbs=12,
                                                        cmb_size_prior="real"))


@pytest.fixture(scope="module")
def bundled():
    from CMBDetectorLib.engine.models import load_bundle

    return load_bundle(device="cpu")


#: Measured 2026-12-05: the v15 models (percentile normalisation) lost or gained 2 of 5 SWI
#: lesions under a +-25 % bias field; v20 (iqr) moved 4 of 6 QSM lesions under gamma 0.7. With 8
#: CMBs the subject showed v21's GRE lesions as 4, but they were 2 foci each split in two; once
#: the splitter merged such pieces only 2 were left, too few to test, hence 12 CMBs: v21 kept
#: all 5 GRE and 5 SWI lesions and gained 1 of 6 on QSM under gamma 1.4. v27 showed 10 GRE, 9 SWI
#: and 6 QSM lesions and changed at most 2 (GRE, more noise); v31 showed 10 GRE, 8 SWI and 6 QSM
#: lesions and changed at most 2 (docs/experiments/v31/invariance_ci_subject.txt); the bundled
#: v37 shows 10 GRE, 9 SWI and 6 QSM lesions and changes at most 2 (GRE bias field and more
#: noise, SWI more noise; docs/experiments/v37/invariance_ci_subject.txt). One subject is a noisy
#: gate (with 16 CMBs v21 loses 4 of 11 QSM lesions under gamma 0.7); models are chosen with
#: the pooled ``cmbdetector invariance`` (docs/training.md).
@pytest.mark.parametrize("modality", ["gre", "swi", "qsm"])
def test_changes_of_intensity_bias_and_noise_keep_the_lesions(subject, bundled, modality):
    changes = lesion_changes(subject, modality, bundled)
    n_ref = changes["gamma 0.7"][0]
    assert n_ref >= 3, f"the subject shows only {n_ref} lesions on {modality}"
    for name, (n, lost, gained) in changes.items():
        assert lost + gained <= max(1, n // 4), (name, n, lost, gained)
