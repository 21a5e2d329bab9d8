from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("torch")

from CMBDetectorLib.errors import InputError
from CMBDetectorLib.training.finetune import find_pairs, finetune, truth_from_mask
from CMBDetectorLib.engine.models import load_bundle
from CMBDetectorLib.engine.volume import Volume, write_volume


def test_truth_from_mask_components_in_ras():
    a = np.zeros((20, 20, 20), np.uint8)
    a[5:7, 5:7, 5:7] = 1
    a[14, 14, 14] = 1
    lab, truth = truth_from_mask(Volume.from_arrays(a, spacing=(1, 1, 2), origin=(10, 0, 0)))
    assert lab.array.max() == 2 and len(truth["cmbs"]) == 2
    np.testing.assert_allclose(truth["cmbs"][0]["centre_ras"], [15.5, 5.5, 11.0])


def test_needs_pairs(tmp_path):
    with pytest.raises(InputError, match="need at least 2"):
        find_pairs(tmp_path)


def test_finetune_tiny_writes_loadable_weights(tmp_path, tiny_run):
    from CMBDetectorLib.simulation.simulator import SimulationConfig, simulate_subject

    data = tmp_path / "data"
    data.mkdir()
    for n in range(3):
        s = simulate_subject(700 + n, SimulationConfig(roi_mm=64.0, spacing_mm=(1, 1, 1.5),
                                                       n_cmbs=(2, 3)))
        write_volume(s.images["swi"], data / f"p{n}.nii.gz")
        write_volume(s.cmb_labels, data / f"p{n}_cmb.nii.gz")
    out = tmp_path / "ft"
    manifest = finetune(data, "swi", out, tiny_run[1], steps=2, disc_steps=2, batch=2,
                        patch=24)
    b = load_bundle(out, device="cpu")
    assert b.version.endswith("+finetuned")
    assert b.manifest["finetune"]["scans"] == 3
    assert manifest.exists() and not (out / "checkpoints").exists()


def test_an_mip_scan_is_prepared_reversed_as_detect_prepares_it(tmp_path):
    """Your own mIP scans train on what ``detect()`` gives the networks: the reversed image."""
    from dataclasses import replace

    from scipy import ndimage as ndi

    from CMBDetectorLib.engine.projection import find_projection, reverse_projection
    from CMBDetectorLib.engine.settings import DetectionSettings
    from CMBDetectorLib.training.data import make_case
    from CMBDetectorLib.training.finetune import _read_cases

    rng = np.random.default_rng(3)
    smooth = ndi.gaussian_filter(rng.normal(size=(30, 48, 48)), 3)
    scan = (100 + 400 * (smooth - smooth.min()) + rng.normal(0, 5, smooth.shape)).astype(
        np.float32)
    scan[13:17, 22:26, 22:26] = 10.0
    labels = np.zeros(scan.shape, np.uint8)
    labels[13:17, 22:26, 22:26] = 1
    mip = Volume.from_arrays(ndi.minimum_filter1d(scan, 3, axis=0), (1.0, 1.0, 2.0))
    write_volume(mip, tmp_path / "a.nii.gz")
    write_volume(mip.with_array(labels), tmp_path / "a_cmb.nii.gz")
    [case] = _read_cases([(tmp_path / "a.nii.gz", tmp_path / "a_cmb.nii.gz", None)], "swi",
                         DetectionSettings())
    p = find_projection(mip)
    assert p is not None and p.reversible

    def unreversed(image):
        return make_case("a", image, "swi", mip.with_array(labels), None,
                         {"cmbs": [], "mimics": []},
                         replace(DetectionSettings(), reverse_projection=False)).image

    np.testing.assert_array_equal(case.image, unreversed(reverse_projection(mip, p)))
    assert not np.array_equal(case.image, unreversed(mip))
