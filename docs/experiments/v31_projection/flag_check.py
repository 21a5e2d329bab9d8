"""flag_check.py SCANS [EXTRA.nii.gz ...]: the projection found in every scan of a simulated set
against the simulator's record (``params.appearance.swi.mip``), plus any extra volumes.
Run from the repository root."""
import sys

sys.path.insert(0, "docs/experiments")
from projection_scans import find_projection, found_projections, read_volume  # noqa: E402

wrong, seconds = 0, []
for stem, m, expected, p, s in found_projections(sys.argv[1]):
    seconds.append(s)
    # the simulator projects along its array's last axis, the NIfTI's k (the slice axis)
    ok = (p is None and expected == 0) or (p is not None and expected > 0 and p.axis_ijk == 2)
    wrong += not ok
    if p is not None or expected or not ok:
        print(stem, m, "mIP", expected, "found", None if p is None else
              (p.axis_ijk, p.n_slices, round(p.equal_fraction, 3)), "" if ok else "WRONG")
for extra in sys.argv[2:]:
    p = find_projection(read_volume(extra))
    wrong += p is not None
    print(extra, "found", p)
print(f"{len(seconds)} scans, {wrong} wrong; {max(seconds):.2f} s at most, "
      f"{sum(seconds) / len(seconds):.2f} s mean")
