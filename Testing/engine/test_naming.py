from __future__ import annotations

from CMBDetectorLib.engine.naming import looks_like_projection


def test_projections_are_recognised_by_name():
    for name in ("SWI_mIP", "mIP_Images(SW)", "swi minip", "SWI Min IP", "MIN-IP 8mm", "MIP"):
        assert looks_like_projection(name), name
    for name in ("sub-01_swi", "SWI_Images", "T2* hemo", "premipsum", "", None):
        assert not looks_like_projection(name), name
    assert looks_like_projection("7: SWI", "SWI mIP 4 slices")  # the series description
