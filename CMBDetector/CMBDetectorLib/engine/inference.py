"""Running the networks: sliding-window detection with blending, candidates, student scores.

Architecture-free: these functions take any detector/student ``nn.Module`` (see networks.py).
"""
from __future__ import annotations

import warnings

import numpy as np
from scipy import ndimage as ndi

from ..errors import Cancelled

STRUCTURE_26 = np.ones((3, 3, 3), bool)


def tile_starts(length: int, tile: int, overlap: int) -> list:
    """Start offsets covering ``length`` with tiles of ``tile`` overlapping by >= ``overlap``."""
    if length <= tile:
        return [0]
    n = int(np.ceil((length - overlap) / (tile - overlap)))
    return [int(round(s)) for s in np.linspace(0, length - tile, n)]


def fitted_tile(length: int, tile: int, overlap: int) -> int:
    """The smallest tile edge that covers ``length`` with as few tiles of at most ``tile``
    voxels as possible, overlapping by >= ``overlap``.

    Tiles of a fixed edge waste work on an axis just longer than the edge: two 128-voxel tiles
    on a 155-voxel axis overlap by 101 voxels, and a 155x184x144 brain costs 8 tiles of 128^3,
    four times its own voxels."""
    n = len(tile_starts(length, tile, overlap))
    return min(tile, length, int(np.ceil((length + (n - 1) * overlap) / n)))


def _blend_window(shape, sigma_frac: float = 0.25) -> np.ndarray:
    """Gaussian importance weights: a tile's centre counts more than its borders (no seams)."""
    axes = [np.exp(-0.5 * ((np.arange(s) - (s - 1) / 2) / (sigma_frac * s)) ** 2) for s in shape]
    w = axes[0][:, None, None] * axes[1][None, :, None] * axes[2][None, None, :]
    return np.maximum(w / w.max(), 1e-3).astype(np.float32)


def _device_of(net):
    return next(net.parameters()).device


def as_input(net, t):
    """``t`` on the network's device, channels-last when the network was prepared so
    (:func:`~CMBDetectorLib.engine.networks.for_inference`)."""
    import torch

    t = t.to(_device_of(net))
    if getattr(net, "channels_last", False):
        t = t.contiguous(memory_format=torch.channels_last_3d)
    return t


def _forward_probability(net, x):
    import torch

    with torch.no_grad():
        t = as_input(net, torch.from_numpy(x[None]))
        p = torch.softmax(net(t), 1)[0, 1].float().cpu().numpy()
    return np.ascontiguousarray(p)


def run_with_fallback(fn, net, *args):
    """Run ``fn(net, *args)``; on CUDA out-of-memory warn, move the net to the CPU (it stays
    there for the rest of the run) and retry."""
    import torch

    try:
        return fn(net, *args)
    except torch.cuda.OutOfMemoryError:
        warnings.warn("CUDA out of memory; retrying on the CPU", RuntimeWarning, stacklevel=2)
        torch.cuda.empty_cache()
        net.to(torch.device("cpu"))
        return fn(net, *args)


def predict_volume(net, channels: np.ndarray, tile: int = 224, overlap: float = 0.15,
                   progress=None, cancel=None) -> np.ndarray:
    """Detector probability map for a ``(C, K, J, I)`` input.

    A volume that fits in one tile runs whole: tile borders change the prediction (the
    network sees zero padding where the brain goes on; up to 0.9 in a candidate's maximum
    probability between a tiled and a whole pass). A larger one is covered by the fewest
    overlapping tiles of at most ``tile`` voxels per axis, each as small as that allows
    (:func:`fitted_tile`), blended with Gaussian weights.
    """
    shape = channels.shape[1:]
    ov = max(8, int(round(tile * overlap)))
    sizes = [fitted_tile(s, tile, ov) for s in shape]
    starts = [tile_starts(s, z, ov) for s, z in zip(shape, sizes)]
    jobs = [(a, b, c) for a in starts[0] for b in starts[1] for c in starts[2]]
    if len(jobs) == 1:  # the whole volume: nothing to blend
        p = run_with_fallback(_forward_probability, net, np.ascontiguousarray(channels))
        if progress is not None:
            progress(1.0)
        return p
    window = _blend_window(sizes)
    acc = np.zeros(shape, np.float32)
    wsum = np.zeros(shape, np.float32)
    for n, (a, b, c) in enumerate(jobs):
        if cancel is not None and cancel():
            raise Cancelled("detection cancelled")
        sl = (slice(a, a + sizes[0]), slice(b, b + sizes[1]), slice(c, c + sizes[2]))
        x = np.ascontiguousarray(channels[(slice(None),) + sl])
        p = run_with_fallback(_forward_probability, net, x)
        acc[sl] += p * window
        wsum[sl] += window
        if progress is not None:
            progress((n + 1) / len(jobs))
    return acc / np.maximum(wsum, 1e-6)


def extract_candidates(prob: np.ndarray, threshold: float, mask: np.ndarray | None = None,
                       split: dict | None = None, spacing_mm=(1.0, 1.0, 1.0)):
    """26-connected components of ``prob > threshold`` (inside ``mask``), each split into its
    foci when ``split`` gives the splitting parameters (:mod:`.splitting`; None = whole
    components, as the bundled models were validated).

    Returns the label map and, per candidate (label 1..n), its voxel count, max probability and
    probability-weighted centroid ``(k, j, i)``.
    """
    binary = prob > threshold
    if mask is not None:
        binary &= mask
    labels, n = ndi.label(binary, STRUCTURE_26)
    if split is not None and n:
        from .splitting import split_candidates

        labels, n = split_candidates(prob, labels, n, spacing_mm, **split)
    if n == 0:
        return labels.astype(np.int32), np.zeros(0), np.zeros(0), np.zeros((0, 3))
    counts, pmax, centroids = label_statistics(prob, binary, labels, n)
    return labels.astype(np.int32), counts, pmax, centroids


def label_statistics(prob: np.ndarray, binary: np.ndarray, labels: np.ndarray, n: int):
    """Per label 1..n: voxels of ``binary``, max of ``prob`` and the ``prob * binary``-weighted
    centroid ``(k, j, i)``, as ``ndi.sum_labels``, ``ndi.maximum`` and ``ndi.center_of_mass``
    give them, computed over the labelled voxels only (``ndi.maximum`` sorts the whole
    volume: 0.6 s of a 6 s detection)."""
    where = np.nonzero(labels)
    lab = labels[where].astype(np.intp)
    counts = np.bincount(lab, binary[where].astype(np.float64), n + 1)[1:]
    pmax = np.full(n + 1, -np.inf)
    np.maximum.at(pmax, lab, prob[where].astype(np.float64))
    weight = (prob[where] * binary[where]).astype(np.float64)
    total = np.bincount(lab, weight, n + 1)[1:]
    with np.errstate(invalid="ignore", divide="ignore"):
        centroids = np.stack([np.bincount(lab, weight * axis, n + 1)[1:] / total
                              for axis in where], axis=1)
    return counts, pmax[1:], centroids.reshape(-1, 3)


def extract_patches(channels: np.ndarray, centres_kji: np.ndarray, size: int = 24) -> np.ndarray:
    """``(N, C, size, size, size)`` patches centred on each centre; borders zero-padded so a
    lesion near the edge stays centred (the reference code shifted such patches off-centre)."""
    half = size // 2
    padded = np.pad(channels, [(0, 0)] + [(half, half)] * 3)
    out = np.empty((len(centres_kji), channels.shape[0], size, size, size), np.float32)
    for n, c in enumerate(np.rint(centres_kji).astype(int)):
        c = np.clip(c, 0, np.array(channels.shape[1:]) - 1)
        out[n] = padded[:, c[0]:c[0] + size, c[1]:c[1] + size, c[2]:c[2] + size]
    return out


#: The eight mirror images of a patch (flips of any subset of the three axes).
MIRRORS = tuple(tuple(ax + 2 for ax in range(3) if n >> ax & 1) for n in range(8))


def _student_probabilities(net, patches, batch_size, mirrors=((),)):
    import torch

    probs = []
    with torch.no_grad():
        for s in range(0, len(patches), batch_size):
            t = as_input(net, torch.from_numpy(patches[s:s + batch_size]))
            p = sum(torch.softmax(net(torch.flip(t, dims) if dims else t), 1)[:, 1]
                    for dims in mirrors) / len(mirrors)
            probs.append(p.float().cpu().numpy())
    return np.concatenate(probs) if probs else np.zeros(0, np.float32)


def score_candidates(net, channels: np.ndarray, centres_kji: np.ndarray,
                     patch_size: int = 24, batch_size: int = 64,
                     mirrored: bool = True) -> np.ndarray:
    """Student probability that each candidate is a microbleed.

    With ``mirrored`` the probability is averaged over the patch's eight mirror images (the
    student was trained with random flips; averaging removes the orientation noise of a single
    view, which matters at the strict thresholds that keep false positives below one per scan).
    """
    if len(centres_kji) == 0:
        return np.zeros(0, np.float32)
    patches = extract_patches(channels, centres_kji, patch_size)
    mirrors = MIRRORS if mirrored else ((),)
    return run_with_fallback(_student_probabilities, net, patches, batch_size, mirrors)
