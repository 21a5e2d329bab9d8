"""The fast radial symmetry transform in torch, on any device.

The same computation as :func:`~CMBDetectorLib.engine.radial_symmetry.frst`, step by step
(float32 gradients as ``np.gradient`` takes them, float64 vote positions rounded half to
even, float64 vote sums, scipy's Gaussian kernel with its ``reflect`` border), so the map
agrees with the numpy reference within float32 rounding of the smoothing (about 1e-6) and
the bundled models need no retraining. It is for the GPU: on a CPU the numpy transform is
faster (1.0 s against 4.9 s for a 144x204x174 brain), so ``prepare`` uses this one only when
the networks run on CUDA.
"""
from __future__ import annotations

import numpy as np


def _gradient(img, spacing):
    """``np.gradient`` of a 3-D float32 tensor: central differences inside, one-sided
    first-order differences on the faces."""
    import torch

    out = []
    for axis, h in enumerate(spacing):
        g = torch.empty_like(img)
        n = img.shape[axis]
        if n < 2:
            raise ValueError("every axis needs at least 2 voxels")
        inner = (img.narrow(axis, 2, n - 2) - img.narrow(axis, 0, n - 2)) / (2.0 * float(h))
        g.narrow(axis, 1, n - 2).copy_(inner)
        g.narrow(axis, 0, 1).copy_((img.narrow(axis, 1, 1) - img.narrow(axis, 0, 1)) / float(h))
        g.narrow(axis, n - 1, 1).copy_(
            (img.narrow(axis, n - 1, 1) - img.narrow(axis, n - 2, 1)) / float(h))
        out.append(g)
    return out


def gaussian_kernel(sigma: float, truncate: float = 4.0) -> np.ndarray:
    """scipy.ndimage's 1-D Gaussian (radius ``int(truncate * sigma + 0.5)``, unit sum)."""
    radius = int(truncate * float(sigma) + 0.5)
    x = np.arange(-radius, radius + 1)
    phi = np.exp(-0.5 / float(sigma) ** 2 * x ** 2)
    return phi / phi.sum()


def _reflect_pad(x, axis: int, r: int):
    """scipy's ``reflect`` border (d c b a | a b c d | d c b a), repeated for kernels wider
    than the axis."""
    import torch

    while r > 0:
        n = x.shape[axis]
        step = min(r, n)
        head = x.narrow(axis, 0, step).flip(axis)
        tail = x.narrow(axis, n - step, step).flip(axis)
        x = torch.cat([head, x, tail], axis)
        r -= step
    return x


def gaussian_filter(x, sigma_vox):
    """Separable Gaussian smoothing of a 3-D tensor like ``ndi.gaussian_filter`` (reflect
    border, truncate 4): per axis a weighted sum of shifted copies, which beats ``conv1d``
    over millions of one-channel rows (0.05 s against 1 s on 2 CPU cores)."""
    for axis, s in enumerate(sigma_vox):
        if s <= 0:
            continue
        k = gaussian_kernel(s)
        r = (len(k) - 1) // 2
        n = x.shape[axis]
        padded = _reflect_pad(x, axis, r)
        y = padded.narrow(axis, 0, n) * float(k[0])
        for i in range(1, len(k)):
            y.add_(padded.narrow(axis, i, n), alpha=float(k[i]))
        x = y
    return x


def frst_torch(image, spacing_mm=(1.0, 1.0, 1.0), radii_mm=(1.0, 2.0, 3.0),
               alpha: float = 2.0, grad_threshold: float = 0.02, device="cpu") -> np.ndarray:
    """:func:`~CMBDetectorLib.engine.radial_symmetry.frst` computed with torch on ``device``
    (a numpy array or a tensor in; a float32 numpy array out)."""
    import torch

    spacing = [float(s) for s in np.asarray(spacing_mm, float)[::-1]]  # (k, j, i)
    img = torch.as_tensor(np.asarray(image, np.float32) if not torch.is_tensor(image) else image,
                          device=device).float()
    shape = img.shape
    g = _gradient(img, spacing)
    mag = torch.sqrt(g[0] ** 2 + g[1] ** 2 + g[2] ** 2)
    voters = torch.nonzero(mag.reshape(-1) > grad_threshold).squeeze(1)
    out = torch.zeros(shape, dtype=torch.float32, device=img.device)
    if voters.numel() == 0:
        return out.cpu().numpy()
    mag_v = mag.reshape(-1)[voters]
    unit = torch.stack([gi.reshape(-1)[voters] / mag_v for gi in g], 1).double()
    pos = torch.stack(torch.unravel_index(voters, shape), 1).double()
    size = torch.tensor(shape, device=img.device)
    strides = torch.tensor([shape[1] * shape[2], shape[2], 1], device=img.device)
    spacing_t = torch.tensor(spacing, dtype=torch.float64, device=img.device)
    for n in radii_mm:
        target = torch.round(pos + unit * (float(n) / spacing_t)).long()
        ok = ((target >= 0) & (target < size)).all(1)
        flat = (target[ok] * strides).sum(1)
        count = torch.bincount(flat, minlength=img.numel()).to(torch.float32)
        msum = torch.bincount(flat, weights=mag_v[ok].double(),
                              minlength=img.numel()).to(torch.float32)
        k_n = 8.0 if n * 1.0 <= 1.0 else 9.9 * (n / 2.0) ** 2
        conc = torch.clamp(count, max=k_n) / k_n
        f = (conc ** alpha) * msum / torch.clamp(count, min=1.0)
        out += gaussian_filter(f.reshape(shape), [(n / 2.0) / s for s in spacing])
    out /= len(radii_mm)
    return out.cpu().numpy()
