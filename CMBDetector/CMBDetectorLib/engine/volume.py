"""A scalar volume with its full geometry, and reading/writing it through SimpleITK.

Every library indexes voxels its own way (Slicer and nibabel can disagree on the same NIfTI), so
the engine carries one convention only: ``array`` is indexed ``[k, j, i]`` (as SimpleITK's
``GetArrayFromImage`` and Slicer's ``arrayFromVolume``) and ``ijk_to_ras`` maps the column vector
``(i, j, k, 1)`` to RAS millimetres. Geometry crosses library borders only as RAS.
"""
from __future__ import annotations

import contextlib
import locale
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..errors import InputError

LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


@dataclass
class Volume:
    """Voxels ``[k, j, i]`` plus a 4x4 IJK-to-RAS matrix (spacing, direction and origin in one)."""

    array: np.ndarray
    ijk_to_ras: np.ndarray = field(default_factory=lambda: np.eye(4))
    name: str = ""
    metadata: dict = field(default_factory=dict)

    @classmethod
    def from_arrays(cls, array, spacing=(1.0, 1.0, 1.0), origin=(0.0, 0.0, 0.0),
                    direction=None, name: str = "") -> "Volume":
        """Build from an array ``[k, j, i]``, spacing ``(i, j, k)`` mm, RAS origin and direction.

        ``direction`` is a 3x3 matrix whose columns are the RAS unit vectors of the i, j, k axes.
        """
        direction = np.eye(3) if direction is None else np.asarray(direction, float)
        m = np.eye(4)
        m[:3, :3] = direction @ np.diag(np.asarray(spacing, float))
        m[:3, 3] = np.asarray(origin, float)
        return cls(np.asarray(array), m, name)

    @property
    def shape_ijk(self) -> tuple[int, int, int]:
        return tuple(int(s) for s in self.array.shape[::-1])

    @property
    def spacing(self) -> np.ndarray:
        """Voxel size along i, j, k in mm."""
        return np.linalg.norm(self.ijk_to_ras[:3, :3], axis=0)

    @property
    def direction(self) -> np.ndarray:
        """3x3 RAS direction cosines (columns: i, j, k axes)."""
        return self.ijk_to_ras[:3, :3] / self.spacing

    @property
    def origin(self) -> np.ndarray:
        return self.ijk_to_ras[:3, 3].copy()

    def ijk_to_ras_points(self, ijk) -> np.ndarray:
        """Map ``(N, 3)`` continuous voxel indices ``(i, j, k)`` to RAS mm."""
        ijk = np.atleast_2d(np.asarray(ijk, float))
        return ijk @ self.ijk_to_ras[:3, :3].T + self.ijk_to_ras[:3, 3]

    def ras_to_ijk_points(self, ras) -> np.ndarray:
        """Map ``(N, 3)`` RAS mm to continuous voxel indices ``(i, j, k)``."""
        ras = np.atleast_2d(np.asarray(ras, float))
        inv = np.linalg.inv(self.ijk_to_ras)
        return ras @ inv[:3, :3].T + inv[:3, 3]

    def with_array(self, array: np.ndarray, name: str | None = None) -> "Volume":
        """Same geometry, other voxels (e.g. a label map on the input grid)."""
        if array.shape != self.array.shape:
            raise ValueError(f"shape {array.shape} differs from {self.array.shape}")
        return Volume(array, self.ijk_to_ras.copy(), self.name if name is None else name,
                      dict(self.metadata))

    def same_grid(self, other: "Volume", tol: float = 1e-3) -> bool:
        return (self.array.shape == other.array.shape
                and np.allclose(self.ijk_to_ras, other.ijk_to_ras, atol=tol))

    # --- SimpleITK bridge ---------------------------------------------------------------
    def to_sitk(self):
        import SimpleITK as sitk

        img = sitk.GetImageFromArray(np.ascontiguousarray(self.array))
        lps = LPS_TO_RAS @ self.ijk_to_ras  # LPS_TO_RAS is its own inverse
        spacing = self.spacing
        img.SetSpacing([float(s) for s in spacing])
        img.SetOrigin([float(v) for v in lps[:3, 3]])
        img.SetDirection([float(v) for v in (lps[:3, :3] / spacing).ravel()])
        return img

    @classmethod
    def from_sitk(cls, img, name: str = "") -> "Volume":
        import SimpleITK as sitk

        if img.GetDimension() != 3:
            raise InputError(f"{name or 'image'}: expected a 3D scan, got {img.GetDimension()}D")
        if img.GetNumberOfComponentsPerPixel() != 1:
            raise InputError(f"{name or 'image'}: expected a scalar scan, got "
                             f"{img.GetNumberOfComponentsPerPixel()} components per voxel "
                             "(vector/RGB)")
        spacing = np.array(img.GetSpacing(), float)
        direction = np.array(img.GetDirection(), float).reshape(3, 3)
        lps = np.eye(4)
        lps[:3, :3] = direction @ np.diag(spacing)
        lps[:3, 3] = img.GetOrigin()
        return cls(sitk.GetArrayFromImage(img), LPS_TO_RAS @ lps, name)


@contextlib.contextmanager
def _locale_kept():
    """GDCM (SimpleITK's DICOM reader) leaves the process locale at "C": every later text file
    opened without an encoding would then be ASCII (seen: the report test after a DICOM read).
    Restore whatever the process had."""
    saved = locale.setlocale(locale.LC_ALL)
    try:
        yield
    finally:
        locale.setlocale(locale.LC_ALL, saved)


def _dicom_series(folder: Path):
    with _locale_kept():
        return _read_dicom_series(folder)


def _read_dicom_series(folder: Path):
    import SimpleITK as sitk

    ids = sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(folder))
    if not ids:
        raise InputError(f"{folder}: folder holds no DICOM series")
    # The largest series is the scan (localisers and derived series are smaller).
    files = max((sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder), s) for s in ids),
                key=len)
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(files)
    reader.MetaDataDictionaryArrayUpdateOn()
    img = reader.Execute()
    meta = {}
    for tag, key in (("0008|103e", "SeriesDescription"), ("0010|0020", "PatientID"),
                     ("0008|0020", "StudyDate")):
        if reader.HasMetaDataKey(0, tag):
            meta[key] = reader.GetMetaData(0, tag).strip()
    return img, meta


def read_volume(path, name: str | None = None) -> Volume:
    """Read NIfTI, NRRD, MHA (any SimpleITK format) or a DICOM series folder.

    Raises :class:`InputError` with one line naming the file for anything unreadable.
    """
    import SimpleITK as sitk

    path = Path(path)
    label = name or stem(path)
    if not path.exists():
        raise InputError(f"{path}: no such file or folder")
    meta: dict = {}
    try:
        if path.is_dir():
            img, meta = _dicom_series(path)
        else:
            img = sitk.ReadImage(str(path))
    except InputError:
        raise
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()
        reason = next((ln for ln in first if "ERROR" in ln or "Unable" in ln), "unreadable")
        raise InputError(f"{path}: cannot read image ({reason.strip()[:160]})") from None
    if img.GetDimension() == 4 and img.GetSize()[3] == 1:
        img = img[:, :, :, 0]
    vol = Volume.from_sitk(img, name=str(path))
    vol.name = label
    vol.metadata.update(meta)
    vol.metadata["source"] = str(path)
    return vol


def write_volume(volume: Volume, path, compress: bool = True) -> None:
    """Write atomically: to a temporary name first, renamed when complete."""
    import SimpleITK as sitk

    path = Path(path)
    tmp = path.with_name(f".{path.name}.part{os.getpid()}{''.join(path.suffixes)}")
    try:
        sitk.WriteImage(volume.to_sitk(), str(tmp), compress)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def stem(path) -> str:
    """File name without the (double) extension: ``sub-01_swi.nii.gz`` -> ``sub-01_swi``."""
    name = Path(path).name
    for ext in (".nii.gz", ".mrk.json", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd", ".dcm"):
        if name.lower().endswith(ext):
            return name[: -len(ext)]
    return Path(name).stem


def resample(volume: Volume, spacing, interpolator: str = "linear",
             reference: Volume | None = None, default: float = 0.0) -> Volume:
    """Resample onto ``reference``'s grid, or onto a grid of ``spacing`` mm with the same
    orientation and field of view. ``interpolator``: ``linear``, ``nearest`` or ``bspline``."""
    import SimpleITK as sitk

    img = volume.to_sitk()
    if img.GetPixelID() not in (sitk.sitkFloat32, sitk.sitkFloat64) and interpolator != "nearest":
        img = sitk.Cast(img, sitk.sitkFloat32)
    interp = {"linear": sitk.sitkLinear, "nearest": sitk.sitkNearestNeighbor,
              "bspline": sitk.sitkBSpline}[interpolator]
    if reference is None:
        spacing = np.broadcast_to(np.asarray(spacing, float), (3,))
        old_size = np.array(img.GetSize())
        old_spacing = np.array(img.GetSpacing())
        extent = old_size * old_spacing
        size = np.maximum(1, np.round(extent / spacing)).astype(int)
        # Keep the same physical box: shift the origin by half the voxel-size change.
        d = np.array(img.GetDirection()).reshape(3, 3)
        origin = (np.array(img.GetOrigin()) + d @ ((spacing - old_spacing) / 2.0))
        ref = sitk.Image([int(s) for s in size], sitk.sitkUInt8)
        ref.SetSpacing([float(s) for s in spacing])
        ref.SetOrigin([float(v) for v in origin])
        ref.SetDirection(img.GetDirection())
    else:
        ref = reference.to_sitk()
    out = sitk.Resample(img, ref, sitk.Transform(), interp, default, img.GetPixelID())
    return Volume.from_sitk(out, volume.name)
