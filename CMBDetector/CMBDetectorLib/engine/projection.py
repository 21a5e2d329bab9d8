"""Whether a scan's voxels are a projection over slices (an mIP), read from the voxels alone.

A clinical minimum-intensity projection (mIP) replaces each voxel by the minimum over ``n``
neighbouring slices, on the same grid. One dark voxel then stays the minimum for up to ``n``
slices, so neighbours along the slice axis are exactly equal far more often than neighbours
in the slice plane; an acquired image, even one stored as integers, repeats a value about as
rarely along every axis. Names (``naming.looks_like_projection``) can say the same, but a
series exported as "SWI" may be the mIP; the voxels do not lie. Resampling an mIP onto another
grid interpolates the repeats away, and then nothing is found (the detection runs as on any
scan).

The clean-up uses it: a projection stretches every dark focus by ``n - 1`` slices along its
axis, so a round CMB reads as elongated there (:func:`~CMBDetectorLib.engine.cleanup.shape_features`
with ``across``).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

#: An axis is a projection's when at least this fraction of its neighbour pairs are equal
#: (a sliding minimum over 2 slices of a continuous image repeats 1 pair in 3, over 4 about
#: half: the 45 simulated mIPs of 2-4 slices among 324 scans checked gave 0.26-0.56) ...
MIN_EQUAL_FRACTION = 0.15
#: ... and at least this many times the fraction of the most repetitive other axis (acquired
#: images here: under 0.02 on every axis).
MIN_RATIO = 5.0
#: The slab estimate: the longest run of equal values that holds at least this share of runs.
RUN_SHARE = 0.10


#: How the note of :meth:`Projection.note` starts (the command line prints it; the GPU notes
#: in a result's warnings were printed when they happened).
NOTE_START = "The image repeats values along its"


def is_note(text: str) -> bool:
    """Whether a result's warning is a projection's note."""
    return text.startswith(NOTE_START)


@dataclass(frozen=True)
class Projection:
    """A projection found in a scan: its array axis, slab and direction."""

    axis_ijk: int                # the input volume's axis (0 = i, 1 = j, 2 = k)
    n_slices: int                # estimated slices per slab (>= 2)
    equal_fraction: float        # share of equal neighbour pairs along that axis
    direction_ras: tuple         # unit vector of the axis in RAS

    def note(self, across: bool) -> str:
        """The one-line warning the result carries; ``across``: whether the clean-up measured
        elongation across the projection."""
        return (f"{NOTE_START} {'ijk'[self.axis_ijk]} axis like a "
                f"minimum-intensity projection (mIP) over about {self.n_slices} slices. The "
                "models find fewer CMBs on mIP images; run detection on the SWI itself if you "
                "have it." + (" Elongation was measured across the projection." if across
                              else ""))


def _tissue(array: np.ndarray) -> np.ndarray:
    """Voxels worth comparing: finite, not zero and not the volume's background value."""
    a = np.asarray(array)
    keep = np.isfinite(a) & (a != 0)
    if not keep.any():
        return keep
    values, counts = np.unique(a[keep][:: max(1, keep.sum() // 200_000)], return_counts=True)
    if counts.max() > 0.05 * counts.sum():  # a constant fill (e.g. -1024 outside the head)
        keep &= a != values[counts.argmax()]
    return keep


def equal_fractions(array: np.ndarray) -> np.ndarray:
    """Share of exactly equal neighbour pairs of tissue voxels along each array axis
    (``[k, j, i]`` order, like the array)."""
    a = np.asarray(array)
    keep = _tissue(a)
    out = np.zeros(3)
    for ax in range(3):
        lo = [slice(None)] * 3
        hi = [slice(None)] * 3
        lo[ax], hi[ax] = slice(None, -1), slice(1, None)
        both = keep[tuple(lo)] & keep[tuple(hi)]
        n = int(both.sum())
        if n:
            out[ax] = float(((a[tuple(lo)] == a[tuple(hi)]) & both).sum()) / n
    return out


def slab_estimate(array: np.ndarray, axis_kji: int) -> int:
    """Slices per slab: the longest run of equal tissue values along ``axis_kji`` that holds
    at least :data:`RUN_SHARE` of all runs (a sliding minimum over n slices keeps a value for
    at most about n slices)."""
    a = np.moveaxis(np.asarray(array), axis_kji, 0)
    keep = np.moveaxis(_tissue(np.asarray(array)), axis_kji, 0)
    equal = (a[1:] == a[:-1]) & keep[1:] & keep[:-1]
    lengths = np.zeros(a.shape[0] + 2, np.int64)
    run = np.zeros(a.shape[1:], np.int64)
    for step in equal:
        ended = ~step & (run > 0)
        lengths += np.bincount(run[ended] + 1, minlength=len(lengths))[: len(lengths)]
        run = np.where(step, run + 1, 0)
    lengths += np.bincount(run[run > 0] + 1, minlength=len(lengths))[: len(lengths)]
    total = lengths.sum()
    if total == 0:
        return 1
    common = np.nonzero(lengths >= RUN_SHARE * total)[0]
    return int(common.max()) if len(common) else 1


def find_projection(volume) -> Projection | None:
    """The projection over slices in ``volume`` (a :class:`~CMBDetectorLib.engine.volume.Volume`),
    or None for an image that is not one."""
    fractions = equal_fractions(volume.array)
    ax = int(np.argmax(fractions))
    others = np.delete(fractions, ax).max()
    if fractions[ax] < MIN_EQUAL_FRACTION or fractions[ax] < MIN_RATIO * others:
        return None
    n = slab_estimate(volume.array, ax)
    if n < 2:
        return None
    axis_ijk = 2 - ax
    column = np.asarray(volume.ijk_to_ras, float)[:3, axis_ijk]
    direction = column / np.linalg.norm(column)
    return Projection(axis_ijk, n, float(fractions[ax]), tuple(float(x) for x in direction))


def direction_in_grid(direction_ras, grid) -> np.ndarray:
    """A RAS direction as a unit vector in ``grid``'s ``(k, j, i)`` millimetre coordinates
    (the coordinates :func:`~CMBDetectorLib.engine.cleanup.shape_features` measures in)."""
    m = np.asarray(grid.ijk_to_ras, float)[:3, :3]
    step_ijk = np.linalg.solve(m, np.asarray(direction_ras, float))  # in voxels
    mm_kji = (step_ijk * np.asarray(grid.spacing, float))[::-1]
    return mm_kji / np.linalg.norm(mm_kji)
