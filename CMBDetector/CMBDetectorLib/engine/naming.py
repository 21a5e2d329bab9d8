"""What a scan's name says about it: its modality, and whether it is a projection
(no Slicer, no torch)."""
from __future__ import annotations

import re

#: A volume name or series description that says the image is a projection over slices
#: (minimum-intensity projection, "mIP"/"minIP"; also "MIP").
_PROJECTION = re.compile(r"(^|[^a-z])(min[ _-]?ip|mip)([^a-z]|$)")

#: What the panel says when the input looks like a projection (docs/VALIDATION.md: visible
#: SWI CMBs found on the cross-domain split, v31).
MIN_IP_NOTE = ("This looks like a minimum-intensity projection (mIP). The models find fewer CMBs "
               "on mIP SWI (simulated cross-domain: 64 % of visible CMBs against 84 % on the "
               "SWI itself); load the SWI itself if you have it.")


def looks_like_projection(*texts: str) -> bool:
    """Whether a volume name or series description names a projection over slices."""
    return any(_PROJECTION.search((t or "").lower()) for t in texts)


_MODALITY_PATTERNS = (
    # QSM first: "susceptibility" also appears in SWI descriptions.
    ("qsm", ("qsm", "chimap", "chi_map", "chi-map", "susceptibility map", "quantitative susc")),
    ("swi", ("swi", "swan", "susceptibility weighted", "susceptibility-weighted", "venobold",
             "sw_", "minip")),
    ("gre", ("t2*", "t2star", "t2_star", "t2s", "gre", "ffe", "fl2d", "fl3d", "hemo",
             "gradient echo", "medic", "me_", "mgre")),
)


def guess_modality(*texts: str) -> str | None:
    """Modality (``swi``, ``gre``, ``qsm``) named by a volume name or series description."""
    for text in texts:
        low = (text or "").lower()
        for modality, patterns in _MODALITY_PATTERNS:
            if any(p in low for p in patterns):
                return modality
    return None
