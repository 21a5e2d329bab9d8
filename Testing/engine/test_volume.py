from __future__ import annotations

import numpy as np
import pytest

from CMBDetectorLib.errors import InputError
from CMBDetectorLib.engine.volume import Volume, read_volume, resample, stem, write_volume


def _oblique():
    a = np.deg2rad(20)
    rot = np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]])
    arr = np.random.default_rng(0).random((5, 6, 7)).astype(np.float32)
    return Volume.from_arrays(arr, spacing=(0.5, 0.7, 2.0), origin=(10, -20, 30), direction=rot)


def test_nifti_round_trip_keeps_ras_geometry(tmp_path):
    v = _oblique()
    write_volume(v, tmp_path / "x.nii.gz")
    r = read_volume(tmp_path / "x.nii.gz")
    np.testing.assert_allclose(r.ijk_to_ras, v.ijk_to_ras, atol=1e-4)
    np.testing.assert_allclose(r.array, v.array)
    assert r.name == "x"


def test_sitk_and_nibabel_agree_in_ras(tmp_path):
    nib = pytest.importorskip("nibabel")
    v = _oblique()
    write_volume(v, tmp_path / "x.nii.gz")
    img = nib.load(tmp_path / "x.nii.gz")
    # nibabel indexes [i, j, k]; the same voxel must land on the same RAS point.
    ras_nib = img.affine @ np.array([3, 4, 2, 1.0])
    ras_ours = v.ijk_to_ras_points([[3, 4, 2]])[0]
    np.testing.assert_allclose(ras_nib[:3], ras_ours, atol=1e-4)
    assert np.asarray(img.dataobj)[3, 4, 2] == pytest.approx(v.array[2, 4, 3])


def test_ras_ijk_inverse():
    v = _oblique()
    pts = np.array([[0, 0, 0], [1.5, 2.5, 3.5]])
    np.testing.assert_allclose(v.ras_to_ijk_points(v.ijk_to_ras_points(pts)), pts, atol=1e-9)


def test_nrrd_and_mha(tmp_path):
    v = _oblique()
    for ext in ("nrrd", "mha"):
        write_volume(v, tmp_path / f"x.{ext}")
        np.testing.assert_allclose(read_volume(tmp_path / f"x.{ext}").ijk_to_ras, v.ijk_to_ras,
                                   atol=1e-4)


def test_dicom_series_folder(tmp_path):
    import locale

    import SimpleITK as sitk

    saved = locale.setlocale(locale.LC_ALL)
    arr = (np.random.default_rng(1).random((6, 16, 16)) * 1000).astype(np.int16)
    img = sitk.GetImageFromArray(arr)
    img.SetSpacing((0.8, 0.8, 2.0))
    folder = tmp_path / "dcm"
    folder.mkdir()
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    for z in range(arr.shape[0]):
        sl = img[:, :, z]
        for tag, val in (("0020|000e", "1.2.826.0.1.3680043.2.1125.1"),
                         ("0020|0032", f"0\\0\\{2.0 * z}"), ("0020|0013", str(z + 1)),
                         ("0020|0037", "1\\0\\0\\0\\1\\0"), ("0008|103e", "SWI_Images"),
                         ("0008|0060", "MR"), ("0028|0030", "0.8\\0.8")):
            sl.SetMetaData(tag, val)
        writer.SetFileName(str(folder / f"{z:03d}.dcm"))
        writer.Execute(sl)
    locale.setlocale(locale.LC_ALL, saved)  # GDCM's writer may change it too (the test's)
    v = read_volume(folder)
    # GDCM's reader leaves the locale at "C" (ASCII text files from then on): read_volume
    # restores it
    assert locale.setlocale(locale.LC_ALL) == saved
    assert v.array.shape == (6, 16, 16)
    np.testing.assert_allclose(v.spacing, [0.8, 0.8, 2.0], atol=1e-3)
    assert v.metadata.get("SeriesDescription") == "SWI_Images"


def test_unreadable_and_missing_files_raise_one_line(tmp_path):
    bad = tmp_path / "bad.nii.gz"
    bad.write_bytes(b"not an image")
    for p in (bad, tmp_path / "missing.nii.gz"):
        with pytest.raises(InputError) as e:
            read_volume(p)
        assert "\n" not in str(e.value) and str(p) in str(e.value)


def test_vector_image_refused(tmp_path):
    import SimpleITK as sitk

    img = sitk.Image([30, 30, 30], sitk.sitkVectorFloat32, 3)
    sitk.WriteImage(img, str(tmp_path / "rgb.nii.gz"))
    with pytest.raises(InputError, match="scalar"):
        read_volume(tmp_path / "rgb.nii.gz")


def test_resample_keeps_physical_box():
    v = _oblique()
    r = resample(v, 1.0)
    # centre of the field of view is preserved
    c_old = v.ijk_to_ras_points([(np.array(v.shape_ijk) - 1) / 2])[0]
    c_new = r.ijk_to_ras_points([(np.array(r.shape_ijk) - 1) / 2])[0]
    np.testing.assert_allclose(c_old, c_new, atol=0.6)
    np.testing.assert_allclose(r.direction, v.direction, atol=1e-6)


def test_stem():
    assert stem("a/sub-01_swi.nii.gz") == "sub-01_swi"
    assert stem("x.mrk.json") == "x"
    assert stem("scan.nrrd") == "scan"
