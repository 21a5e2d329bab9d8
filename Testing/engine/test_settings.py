from __future__ import annotations

import json

import pytest

from CMBDetectorLib.errors import InputError
from CMBDetectorLib.engine.settings import DetectionSettings


def test_modality_thresholds_round_trip_and_fall_back():
    s = DetectionSettings(threshold=0.6, modality_thresholds={"gre": 0.75, "qsm": 0.9})
    back = DetectionSettings.from_dict(json.loads(json.dumps(s.to_dict())))
    assert back == s
    assert (back.threshold_for("gre"), back.threshold_for("qsm"),
            back.threshold_for("swi")) == (0.75, 0.9, 0.6)


@pytest.mark.parametrize("bad, match", [({"t1": 0.5}, "unknown modality 't1'"),
                                        ({"gre": 1.5}, "gre threshold must be in")])
def test_bad_modality_thresholds_are_refused(bad, match):
    with pytest.raises(InputError, match=match):
        DetectionSettings.from_dict({"modality_thresholds": bad})


@pytest.mark.parametrize("bad, match", [({"mask_threshold": "otsu"}, "mask_threshold must be one of"),
                                        ({"normalisation": "zscore"}, "normalisation must be one of")])
def test_unknown_preparation_choices_are_refused(bad, match):
    with pytest.raises(InputError, match=match):
        DetectionSettings.from_dict(bad)
