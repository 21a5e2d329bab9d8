"""Training on the domain data: seeds, simulator configs, preparation settings the manifest
carries, and the monotone intensity change of the augmentation."""
from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

pytest.importorskip("torch")

from CMBDetectorLib.errors import InputError
from CMBDetectorLib.simulation import domains
from CMBDetectorLib.training.train import (Run, TrainConfig, augment_detector, augment_patch,
                                           intensity_change, subject_seeds)


def _domain_cfg(**extra) -> TrainConfig:
    cfg = TrainConfig.tiny()
    cfg.domains, cfg.n_cross = True, 1
    for k, v in extra.items():
        setattr(cfg, k, v)
    return cfg


def test_domain_seeds_come_from_each_splits_own_range():
    cfg = _domain_cfg(n_pool_a=3, n_pool_b=4, n_val=2, n_pool_b_extra=2, n_val_extra=2,
                      n_test=2, n_cross=2)
    s = subject_seeds(cfg)
    base = domains.SEED_BASE
    assert s["pool_a"] == [base["train"] + i for i in range(3)]
    assert s["pool_b_train"] == [base["train"] + 500, base["train"] + 501,
                                 base["train"] + 600, base["train"] + 601]
    assert s["pool_b_val"] == [base["validation"], base["validation"] + 1]
    assert s["val_extra"] == [base["validation"] + 100, base["validation"] + 101]
    assert s["test"] == [base["test"], base["test"] + 1]
    assert s["cross_domain"] == [base["cross_domain"], base["cross_domain"] + 1]
    every = [x for v in s.values() for x in v]
    assert len(every) == len(set(every))  # no subject in two splits
    # the legacy layout has no cross-domain split and refuses one
    with pytest.raises(InputError, match="n_cross needs domains"):
        subject_seeds(TrainConfig(n_cross=1))


def test_each_run_split_draws_its_own_domain_and_sim_config_stays_on_top(tmp_path):
    cfg = _domain_cfg()
    cfg.sim_config = {"roi_mm": 64.0}
    run = Run(tmp_path, cfg)
    seeds = subject_seeds(cfg)
    held = domains.HELD_OUT
    for split in ("pool_a", "pool_b_train", "pool_b_val", "val_extra", "test"):
        for seed in seeds[split]:
            sim = run.sim_config(split, seed)
            assert sim.roi_mm == 64.0
            assert sim.gre_weighting not in held["gre_weighting"]
            assert sim.qsm_recon not in held["qsm_recon"]
            assert sim.swi_filter not in held["swi_filter"]
    prior = {"pool_a": "training", "pool_b_val": "training", "test": "real"}
    for split, p in prior.items():
        assert run.sim_config(split, seeds[split][0]).cmb_size_prior == p
    cross = run.sim_config("cross_domain", seeds["cross_domain"][0])
    assert (cross.gre_weighting, cross.swi_filter, cross.qsm_recon) == (
        "2d_long_tr", "hann", "tkd")
    assert cross.anatomy in held["anatomy"]
    # training pools get the pool's CMB count, test splits the simulator's natural one
    assert tuple(run.sim_config("pool_a", seeds["pool_a"][0]).n_cmbs) == tuple(cfg.pool_n_cmbs)
    assert run.sim_config("test", seeds["test"][0]).n_cmbs != tuple(cfg.pool_n_cmbs)


def test_test_splits_are_written_to_their_own_folders(tmp_path, monkeypatch):
    from CMBDetectorLib.simulation import simulator

    written = []
    monkeypatch.setattr(simulator, "simulate_subject", lambda seed, config: seed)
    monkeypatch.setattr(simulator, "write_subject",
                        lambda subj, folder, name, modalities: written.append((Path(folder).name,
                                                                               name)))
    cfg = _domain_cfg()
    run = Run(tmp_path, cfg)
    assert run.test_splits() == ("test", "cross_domain")
    run.build_test_scans()
    seeds = subject_seeds(cfg)
    assert sorted(written) == sorted([("test_scans", f"sub-{seeds['test'][0]}"),
                                      ("cross_domain_scans", f"sub-{seeds['cross_domain'][0]}")])


def test_preparation_settings_reach_the_cases_and_the_manifest_only_when_changed(tmp_path,
                                                                                 monkeypatch):
    from CMBDetectorLib.simulation import simulator
    from CMBDetectorLib.training import data as training_data

    seen = []
    monkeypatch.setattr(simulator, "simulate_subject", lambda seed, config: SimpleNamespace(
        images=dict.fromkeys(("swi", "gre", "qsm")), cmb_labels=None, mimic_labels=None,
        truth={}))

    def fake_case(name, image, modality, cmb, mimics, truth, settings, *rest):
        seen.append((settings.normalisation, settings.frst_radii_mm, settings.split_candidates,
                     settings.mask_threshold))
        return SimpleNamespace(save=lambda path: Path(path).write_bytes(b""))

    monkeypatch.setattr(training_data, "make_case", fake_case)
    cfg = _domain_cfg(normalisation="iqr", frst_radii_mm=(1.0, 2.0, 3.0, 4.0, 5.0),
                      split_candidates=True, mask_threshold="log")
    Run(tmp_path, cfg).build_subject("pool_a", subject_seeds(cfg)["pool_a"][0])
    assert seen == [("iqr", (1.0, 2.0, 3.0, 4.0, 5.0), True, "log")] * 3
    assert cfg.preparation_manifest() == {"mask_threshold": "log", "normalisation": "iqr",
                                          "frst_radii_mm": [1.0, 2.0, 3.0, 4.0, 5.0],
                                          "split_candidates": True}
    assert TrainConfig().preparation_manifest() == {}  # the first bundle's manifest unchanged


def test_a_run_folder_made_before_the_new_settings_still_resumes(tmp_path):
    cfg = TrainConfig.tiny()
    Run(tmp_path, cfg)
    saved = json.loads((tmp_path / "config.json").read_text())
    for k in ("domains", "n_cross", "normalisation", "frst_radii_mm", "split_candidates",
              "intensity_aug_prob"):
        saved.pop(k)
    (tmp_path / "config.json").write_text(json.dumps(saved))
    Run(tmp_path, cfg)  # no "another configuration" error
    with pytest.raises(InputError, match="another configuration"):
        Run(tmp_path, _domain_cfg())


def _normalised_scan(rng, shape=(24, 24, 24)):
    img = np.clip(rng.normal(0.0, 0.14, shape), -3, 3).astype(np.float32)
    img[:, :, :3] = 0.0  # outside the brain
    img[10:14, 10:14, 10:14] = 1.0  # a focus
    img[4:6, 4:20, 18] = -0.8  # something dark (diamagnetic / bright on GRE)
    return img


def test_intensity_change_is_monotone_keeps_median_iqr_and_outside_and_varies_foci():
    rng = np.random.default_rng(0)
    img = _normalised_scan(rng)
    brain = img != 0
    order = np.argsort(img[brain], kind="stable")
    foci = []
    for _ in range(20):
        out = intensity_change(img, rng)
        assert out.dtype == np.float32 and np.all(out[~brain] == 0)
        assert np.all(np.diff(out[brain][order]) >= -1e-6)  # monotone: ranks kept
        q25, q50, q75 = np.percentile(out[brain], [25, 50, 75])
        r25, r50, r75 = np.percentile(img[brain], [25, 50, 75])
        assert abs(q50 - r50) < 0.01
        assert abs((q75 - q25) - (r75 - r25)) < 0.25 * (r75 - r25)
        foci.append(float(out[12, 12, 12]))
    assert min(foci) < 0.85 and max(foci) > 1.15  # the focus's contrast really changes


def test_augmentation_uses_the_run_radii_and_changes_intensity_only_when_asked():
    from CMBDetectorLib.engine.radial_symmetry import frst

    rng = np.random.default_rng(1)
    img = _normalised_scan(rng, (32, 32, 32))
    lab = np.zeros(img.shape, np.uint8)
    lab[14:18, 14:18, 14:18] = 1
    radii = (1.0, 2.0, 3.0, 4.0, 5.0)
    x, _ = augment_detector(img, lab, np.random.default_rng(2), 24, radii_mm=radii)
    np.testing.assert_allclose(x[1], frst(np.ascontiguousarray(x[0]), radii_mm=radii),
                               atol=1e-5)
    # off: the discriminator patch keeps its FRST channel (up to the shared contrast factor)
    patch = np.stack([img, frst(img)])
    y, _ = augment_patch(patch, lab, np.random.default_rng(3), radii, intensity_prob=0.0)
    ratio = np.abs(y[1]).sum() / np.abs(patch[1]).sum()
    assert 0.74 < ratio < 1.26
    # on: the image changed monotonically and its FRST was recomputed with the run's radii
    z, _ = augment_patch(patch, lab, np.random.default_rng(3), radii, intensity_prob=1.0)
    assert not np.allclose(z[0] / np.abs(z[0]).max(), y[0] / np.abs(y[0]).max(), atol=1e-3)


def test_level_shift_moves_the_tissue_level_as_a_local_gain_would():
    """With ``level_shift`` the contrast factor g acts on the raw scan: the normalised tissue
    moves to (g - 1) * m, m <= level_shift; outside the brain stays 0; off, tissue stays near 0
    whatever the gain."""
    patch = np.zeros((2, 16, 16, 16), np.float32)
    patch[0, 2:-2, 2:-2, 2:-2] = 1e-3  # tissue at the median (0), inside the brain
    lab = np.zeros(patch.shape[1:], np.uint8)
    inside = patch[0] != 0

    def levels(shift):
        out = []
        for seed in range(40):
            y, _ = augment_patch(patch, lab, np.random.default_rng(seed), (1.0,), 0.0, shift)
            out.append((y[0][inside].mean(), y[0][~inside].mean()))
        return np.array(out)

    off, on = levels(0.0), levels(1.5)
    assert np.abs(off[:, 0]).max() < 0.01
    assert np.abs(on[:, 0]).max() <= 0.25 * 1.5 + 0.01   # |g - 1| <= 0.25, m <= 1.5
    assert (on[:, 0] > 0.05).any() and (on[:, 0] < -0.05).any()
    assert np.abs(on[:, 1]).max() < 0.01                 # outside: noise only


def test_intensity_max_factor_widens_the_curve_change_where_the_config_asks():
    from CMBDetectorLib.training.train import detector_batch

    img = _normalised_scan(np.random.default_rng(0))
    focus = []
    for factor in (1.6, 2.5):
        rng = np.random.default_rng(3)
        focus.append([float(intensity_change(img, rng, factor)[12, 12, 12]) for _ in range(200)])
    assert np.ptp(focus[1]) > 1.3 * np.ptp(focus[0])  # the focus's contrast varies more
    cfg = TrainConfig.tiny()
    cfg.intensity_aug_prob, cfg.intensity_max_factor = 1.0, 2.5
    lab = np.zeros((1,) + img.shape, np.uint8)
    lab[0, 10:14, 10:14, 10:14] = 1
    runs = []
    for factor in (1.6, 2.5):
        cfg.intensity_max_factor = factor
        runs.append(detector_batch(img[None], lab, [0], np.random.default_rng(5), 16, cfg)[0])
    assert not np.allclose(runs[0].numpy(), runs[1].numpy())  # the setting reaches the batch


def test_runs_made_before_patch_norm_and_intensity_max_factor_resume(tmp_path):
    import json

    from CMBDetectorLib.training.train import Run

    Run(tmp_path, TrainConfig.tiny())
    saved = json.loads((tmp_path / "config.json").read_text())
    del saved["patch_norm"], saved["intensity_max_factor"]
    (tmp_path / "config.json").write_text(json.dumps(saved))
    Run(tmp_path, TrainConfig.tiny())  # accepted: their legacy values are the defaults


def test_augment_patch_returns_the_unchanged_view_with_the_same_draws():
    """``with_clean``: the changed patch is the one without it (same random draws), and the
    extra view has the same flips, gain and noise but not the intensity change."""
    from CMBDetectorLib.engine.radial_symmetry import frst

    g = np.indices((24, 24, 24), np.float32) - 11.5  # symmetric under every flip and transpose
    img = (0.05 + 1.5 * np.exp(-(g ** 2).sum(0) / 8.0)).astype(np.float32)
    patch = np.stack([img, frst(img)])
    lab = np.zeros(img.shape, np.uint8)
    for seed in range(4):
        z, s = augment_patch(patch, lab, np.random.default_rng(seed), (1.0,), 1.0, 0.0, 2.0)
        z2, s2, clean = augment_patch(patch, lab, np.random.default_rng(seed), (1.0,), 1.0, 0.0,
                                      2.0, with_clean=True)
        np.testing.assert_array_equal(z, z2)
        np.testing.assert_array_equal(s, s2)
        gain = clean[1].sum() / patch[1].sum()  # the FRST channel carries no noise
        assert 0.74 < gain < 1.26
        np.testing.assert_allclose(clean[1], gain * patch[1], rtol=1e-4, atol=1e-6)
        assert np.abs(clean[0] - gain * patch[0]).std() < 0.06  # only the noise
        assert np.abs(z[0] - clean[0]).max() > 0.02  # the student's view was changed (same noise)


@pytest.mark.parametrize("clean_target", [False, True])
def test_distilled_student_sees_the_changed_patch_and_the_teacher_the_clean_one(
        tiny_run, tmp_path, monkeypatch, clean_target):
    import shutil

    import torch

    from CMBDetectorLib.training import train as T

    run = tmp_path / "kd"
    shutil.copytree(tiny_run[0], run)
    (run / "weights" / "student.pt").unlink()
    shutil.rmtree(run / "ckpt")
    (run / "config.json").unlink()  # another configuration in the same folder
    cfg = TrainConfig.tiny()
    cfg.intensity_aug_prob, cfg.kd_clean_target = 1.0, clean_target
    r = Run(run, cfg)
    seen = {}
    teacher = r.load("teacher", "Teacher", r.teacher_config())

    class Spy:  # the teacher, recording what it was shown
        def parameters(self):
            return teacher.parameters()

        def __call__(self, x):
            seen["teacher"] = x.clone()
            return teacher(x)

    spy = Spy()

    real_load = r.load
    monkeypatch.setattr(r, "load", lambda name, *a: spy if name == "teacher" else real_load(name, *a))

    def one_step(model, batches, steps, ckpt, lr, every, name, loss_fn, seed):
        batch = batches(np.random.default_rng(seed))
        seen["batch"] = batch
        seen["loss"] = float(loss_fn(model, batch).detach())

    monkeypatch.setattr(T, "fit", one_step)
    r.train_student(True)
    batch = seen["batch"]
    assert len(batch) == (4 if clean_target else 3)
    want = batch[3] if clean_target else batch[0]
    assert torch.equal(seen["teacher"], want)
    if clean_target:
        assert not torch.equal(batch[3], batch[0])
    assert np.isfinite(seen["loss"])


def test_a_run_keeps_the_anatomies_its_subjects_were_drawn_with(tmp_path, monkeypatch, capsys):
    import CMBDetectorLib.simulation.anatomies as A

    monkeypatch.setattr(A, "available_anatomies", lambda: ["robex_ref"])
    run = Run(tmp_path, _domain_cfg())
    seed = subject_seeds(run.cfg)["test"][0]
    first = run.sim_config("test", seed)
    assert json.loads((tmp_path / "anatomies.json").read_text()) == ["robex_ref"]
    assert "cat12_ixi555" in capsys.readouterr().err  # told what is missing
    assert first.anatomy == "mni152"  # robex_ref is held out of the in-distribution test
    # resumed where another set is installed: refused, never mixed
    monkeypatch.setattr(A, "available_anatomies", lambda: ["colin27", "robex_ref"])
    with pytest.raises(InputError, match="anatomies"):
        Run(tmp_path, _domain_cfg()).sim_config("test", seed)
