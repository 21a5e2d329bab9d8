"""write_outputs: the four files, the label map written once, losslessly, as uint16."""
from __future__ import annotations

import numpy as np

from CMBDetectorLib.engine import outputs
from CMBDetectorLib.engine.results import Candidate, DetectionResult
from CMBDetectorLib.engine.volume import Volume, read_volume


def _result(shape=(12, 40, 48)):
    vol = Volume.from_arrays(np.full(shape, 100.0, np.float32), spacing=(0.45, 0.45, 2.0))
    vol.name = "scan"
    labels = np.zeros(shape, np.int32)
    labels[3:5, 10:13, 10:13], labels[8, 30, 40] = 1, 2
    cands = [Candidate(1, (1.0, 2.0, 3.0), (11.0, 11.0, 3.5), 3.0, 0.9, 0.8),
             Candidate(2, (4.0, 5.0, 6.0), (40.0, 30.0, 8.0), 1.0, 0.7, 0.95)]
    return vol, DetectionResult("swi", vol.ijk_to_ras.copy(), shape, cands, labels, 0.5)


def test_label_map_written_once_and_read_back_exactly(tmp_path, monkeypatch):
    vol, res = _result()
    writes = []
    real = outputs.write_volume
    monkeypatch.setattr(outputs, "write_volume", lambda v, p, *a, **k: (writes.append(p),
                                                                        real(v, p, *a, **k)))
    paths = outputs.write_outputs(vol, res, tmp_path)
    assert writes == [paths["labels"]]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        ["scan.mrk.json", "scan_lesions.csv", "scan_cmb.nii.gz", "scan_detection.json"])
    back = read_volume(paths["labels"])
    assert back.array.dtype == np.uint16
    np.testing.assert_array_equal(back.array, res.label_map())
    np.testing.assert_allclose(back.ijk_to_ras, vol.ijk_to_ras, atol=1e-5)
    assert set(np.unique(back.array)) == {0, 1, 2}  # CMB-1 = the more confident candidate 2
    assert back.array[8, 30, 40] == 1
