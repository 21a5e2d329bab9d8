"""reversal_check.py SCANS [EXTRA.nii.gz ...]: whether each scan of a simulated set is found to
be a reversible projection, against the simulator's record (``params.appearance.swi.mip``, made
with ``scipy.ndimage.minimum_filter1d``'s centred window), plus any extra volumes (expected: no
projection). Run from the repository root."""
import sys

sys.path.insert(0, "docs/experiments")
from projection_scans import find_projection, found_projections, read_volume  # noqa: E402

wrong, seconds, shares = 0, [], []
for stem, m, expected, p, s in found_projections(sys.argv[1]):
    seconds.append(s)
    if expected:
        ok = (p is not None and p.axis_ijk == 2 and p.n_slices == expected
              and p.kind == "minimum")
        if p is not None:
            shares.append(p.unchanged_fraction)
    else:
        ok = p is None
    wrong += not ok
    if p is not None or expected or not ok:
        print(stem, m, "mIP", expected, "found", None if p is None else
              (p.axis_ijk, p.n_slices, p.kind, round(p.unchanged_fraction, 5)),
              "" if ok else "WRONG", flush=True)
for extra in sys.argv[2:]:
    p = find_projection(read_volume(extra))
    wrong += p is not None
    print(extra, "found", p)
print(f"{len(seconds)} scans, {wrong} wrong; reversible projections: unchanged share "
      f"{min(shares, default=0):.5f}-{max(shares, default=0):.5f}; find_projection "
      f"{max(seconds):.2f} s at most, {sum(seconds) / len(seconds):.2f} s mean")
