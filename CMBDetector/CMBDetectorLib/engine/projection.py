"""Whether a scan's voxels are a projection over slices (an mIP), read from the voxels alone.

A clinical minimum-intensity projection (mIP) replaces each voxel by the minimum over ``n``
neighbouring slices, on the same grid. One dark voxel then stays the minimum for up to ``n``
slices, so neighbours along the slice axis are exactly equal far more often than neighbours
in the slice plane; an acquired image, even one stored as integers, repeats a value about as
rarely along every axis. Names (``naming.looks_like_projection``) can say the same, but a
series exported as "SWI" may be the mIP; the voxels do not lie. Resampling an mIP onto another
grid interpolates the repeats away, and then nothing is found (the detection runs as on any
scan).

A sliding minimum is a grey-level erosion along one axis, so it can be reversed up to what it
erased: the sliding maximum over the same slab (the reflected window) turns it into the
*opening* of the image before the projection (:func:`reverse_projection`). Every dark focus (a
CMB, a vein) comes back to its own extent and place; only bright details thinner than the slab
stay lost. Whether it was a minimum or a maximum is read from the voxels too: an erosion is
unchanged by the matching closing, a dilation by the opening (:func:`find_reversal`). Monotone
changes (integer storage, rescaling) commute with minimum and maximum and do not hide it. Where
the slab sat against its slice cannot be read (a closing does not depend on it): the reversal
assumes a centred slab, so the foci come back at the centre of the streak the mIP shows, where
a reader marks them; a scanner whose slab starts at its slice puts them up to ``(n - 1) / 2``
slices from where they were acquired.

When a projection cannot be reversed, the clean-up measures elongation across its axis: a
projection stretches every dark focus by ``n - 1`` slices along it, so a round CMB reads as
elongated there (:func:`~CMBDetectorLib.engine.cleanup.shape_features` with ``across``).
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
#: A projection is reversed when the matching closing (opening for a maximum) leaves at least
#: this share of tissue voxels unchanged, and the other kind's test does not: exactly 1.0 for
#: an unresampled sliding minimum away from the first and last slab (how a scanner pads its
#: ends is not known, so they are not tested); about 0.85 for the other kind.
MIN_UNCHANGED = 0.999
#: The reversal test looks at a central block of at most this many voxels.
TEST_VOXELS = 4_000_000


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
    kind: str = ""               # "minimum" or "maximum" when reversible (find_reversal)
    unchanged_fraction: float = 0.0  # share of tissue voxels the matching closing keeps

    @property
    def reversible(self) -> bool:
        return bool(self.kind)

    def note(self, across: bool, reversed_: bool = False) -> str:
        """The one-line warning the result carries; ``across``: whether the clean-up measured
        elongation across the projection; ``reversed_``: whether detection ran on the
        reversed image (:func:`reverse_projection`)."""
        what = "minimum" if self.kind != "maximum" else "maximum"
        text = (f"{NOTE_START} {'ijk'[self.axis_ijk]} axis like a "
                f"{what}-intensity projection ({'mIP' if what == 'minimum' else 'MIP'}) over "
                f"about {self.n_slices} slices.")
        if reversed_:
            other = "maximum" if what == "minimum" else "minimum"
            return (text + f" Detection runs on it reversed (a sliding {other} over the same "
                    "slices); run detection on the SWI itself if you have it.")
        return (text + " The models find fewer CMBs on mIP images; run detection on the SWI "
                "itself if you have it." + (" Elongation was measured across the projection."
                                            if across else ""))


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


def _reflected_origin(n: int) -> int:
    """scipy.ndimage's ``origin`` of the window reflecting a centred ``n``-slice window (its
    default, origin 0): the same window for odd ``n``, one slice later for even ``n``."""
    return -(1 - n % 2)


def _central_block(a: np.ndarray, axis_kji: int) -> np.ndarray:
    """At most :data:`TEST_VOXELS` voxels from the middle of the two other axes (the whole
    projection axis kept)."""
    keep = max(1.0, np.sqrt(a.size / TEST_VOXELS))
    index = [slice(None)] * 3
    for ax in range(3):
        if ax != axis_kji and keep > 1:
            m = int(np.ceil(a.shape[ax] / keep))
            start = (a.shape[ax] - m) // 2
            index[ax] = slice(start, start + m)
    return a[tuple(index)]


def find_reversal(array: np.ndarray, axis_kji: int, n: int) -> tuple:
    """``(kind, unchanged share)`` of the sliding projection over ``n`` slices along
    ``axis_kji`` that ``array`` is: for a minimum (an erosion) the closing with the same slab
    leaves the image unchanged, for a maximum the opening. ``kind`` is "" unless exactly one
    kind leaves :data:`MIN_UNCHANGED` of the tissue voxels unchanged: slices repeated by
    nearest-neighbour resampling pass both (they are an erosion and a dilation), and reversing
    them would thin every lesion."""
    from scipy import ndimage as ndi

    a = _central_block(np.asarray(array), axis_kji)
    keep = _tissue(a)
    if a.shape[axis_kji] > 4 * n:  # the end slabs: padding unknown
        ends = [slice(None)] * 3
        ends[axis_kji] = slice(n, a.shape[axis_kji] - n)
        inner = np.zeros_like(keep)
        inner[tuple(ends)] = True
        keep &= inner
    if n < 2 or not keep.any():
        return "", 0.0
    back = _reflected_origin(n)
    shares = {}
    for kind, first, then in (("minimum", ndi.maximum_filter1d, ndi.minimum_filter1d),
                              ("maximum", ndi.minimum_filter1d, ndi.maximum_filter1d)):
        again = then(first(a, n, axis=axis_kji, mode="nearest", origin=back), n,
                     axis=axis_kji, mode="nearest")
        shares[kind] = float((again == a)[keep].mean())
    passing = [k for k, v in shares.items() if v >= MIN_UNCHANGED]
    if len(passing) == 1:
        return passing[0], shares[passing[0]]
    return "", max(shares.values())


def reverse_projection(volume, projection: Projection):
    """``volume`` with its projection reversed up to what the projection erased: a sliding
    maximum (for an mIP) over the same slab with the reflected window, the opening of the
    image before the projection, for a centred slab (the module's docstring says what another
    slab does). Geometry and data type unchanged."""
    from scipy import ndimage as ndi

    if not projection.reversible:
        raise ValueError("this projection was not found reversible")
    back = _reflected_origin(projection.n_slices)
    undo = ndi.maximum_filter1d if projection.kind == "minimum" else ndi.minimum_filter1d
    array = undo(np.asarray(volume.array), projection.n_slices, axis=2 - projection.axis_ijk,
                 mode="nearest", origin=back)
    return volume.with_array(array)


def as_detected(volume, reverse: bool = True) -> tuple:
    """``(projection, image)``: what :func:`find_projection` finds in ``volume`` (or None), and
    the image the networks see: ``volume``, or with ``reverse`` its reversal when the voxels
    allow one (``DetectionSettings.reverse_projection``; training cases use it too)."""
    projection = find_projection(volume)
    if reverse and projection is not None and projection.reversible:
        return projection, reverse_projection(volume, projection)
    return projection, volume


def find_projection(volume) -> Projection | None:
    """The projection over slices in ``volume`` (a :class:`~CMBDetectorLib.engine.volume.Volume`),
    with how to reverse it when the voxels say (:func:`find_reversal`), or None for an image
    that is not one."""
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
    kind, unchanged = find_reversal(volume.array, ax, n)
    return Projection(axis_ijk, n, float(fractions[ax]), tuple(float(x) for x in direction),
                      kind, unchanged)


def direction_in_grid(direction_ras, grid) -> np.ndarray:
    """A RAS direction as a unit vector in ``grid``'s ``(k, j, i)`` millimetre coordinates
    (the coordinates :func:`~CMBDetectorLib.engine.cleanup.shape_features` measures in)."""
    m = np.asarray(grid.ijk_to_ras, float)[:3, :3]
    step_ijk = np.linalg.solve(m, np.asarray(direction_ras, float))  # in voxels
    mm_kji = (step_ijk * np.asarray(grid.spacing, float))[::-1]
    return mm_kji / np.linalg.norm(mm_kji)
