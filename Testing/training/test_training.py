from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest
from scipy import ndimage as ndi

torch = pytest.importorskip("torch")

from CMBDetectorLib.errors import InputError
from CMBDetectorLib.training.train import (ENVIRONMENT_PACKAGES, TrainConfig, Run, cosine_factor,
                                     data_version, dice_ce_loss, fit, kd_loss,
                                     lesion_size_weights, run_training, subject_seeds)


def test_voxel_weights_apply_before_reduction():
    torch.manual_seed(0)
    logits = torch.randn(1, 2, 4, 4, 4)
    target = torch.zeros(1, 4, 4, 4, dtype=torch.long)
    target[0, 1, 1, 1] = 1
    loss = dice_ce_loss(logits, target, pos_weight=10.0)
    prob = torch.softmax(logits, 1)[:, 1]
    dice = 1 - (2 * (prob * target).sum() + 1) / (prob.sum() + target.sum() + 1)
    ce = torch.nn.functional.cross_entropy(logits, target, reduction="none")
    w = 1 + 9 * target.float()
    assert torch.isclose(loss, dice + (ce * w).sum() / w.sum())
    # The reference's bug (mean CE times mean weight) gives a different, much smaller CE term.
    assert not torch.isclose(loss, dice + ce.mean() * (10 * target.float()).mean())


def test_lesion_size_weights_favour_small_lesions():
    lab = np.zeros((12, 12, 12), np.uint8)
    lab[2, 2, 2] = 1                      # one voxel
    lab[6:9, 6:9, 6:9] = 1                # 27 voxels
    lab[2, 9:11, 9] = 1                   # two voxels
    w = lesion_size_weights(lab, ref_voxels=8.0, max_factor=4.0)
    assert w[2, 2, 2] == 4.0              # capped
    assert w[2, 9, 9] == w[2, 10, 9] == 4.0
    assert np.all(w[6:9, 6:9, 6:9] == 1.0)  # larger than the reference size
    assert w[0, 0, 0] == 1.0 and w.dtype == np.float32
    lab[2, 3:6, 2] = 1                    # the one-voxel lesion grows to four voxels
    assert lesion_size_weights(lab, 8.0, 4.0)[2, 2, 2] == 2.0
    assert np.all(lesion_size_weights(lab, 8.0, 1.0) == 1.0)  # switched off


def test_size_weight_makes_a_missed_small_lesion_cost_more():
    target = torch.zeros(1, 8, 8, 8, dtype=torch.long)
    target[0, 1, 1, 1] = 1
    target[0, 4:7, 4:7, 4:7] = 1
    logits = torch.zeros(1, 2, 8, 8, 8)
    logits[:, 0] = 3.0                    # background everywhere ...
    logits[0, :, 4:7, 4:7, 4:7] = torch.tensor([-3.0, 3.0])[:, None, None, None]  # ... big found
    w = torch.from_numpy(lesion_size_weights(target[0].numpy(), 8.0, 4.0))[None]
    assert dice_ce_loss(logits, target, size_weight=w) > dice_ce_loss(logits, target)
    ones = torch.ones_like(w)
    assert torch.isclose(dice_ce_loss(logits, target, size_weight=ones),
                         dice_ce_loss(logits, target))


def test_kd_loss_reduces_to_ce_and_to_kl():
    s = torch.tensor([[2.0, -1.0], [0.5, 0.2]])
    y = torch.tensor([0, 1])
    ce = torch.nn.functional.cross_entropy(s, y)
    assert torch.isclose(kd_loss(s, None, y, 0.0, 4.0), ce)
    # identical teacher: KL term is zero
    assert torch.isclose(kd_loss(s, s.clone(), y, 0.3, 4.0), 0.7 * ce)
    t = torch.tensor([[-2.0, 3.0], [1.0, 0.0]])
    assert kd_loss(s, t, y, 1.0, 4.0) > 0


def test_fit_resumes_identically_after_interruption(tmp_path):
    def make():
        torch.manual_seed(0)
        return torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Dropout(0.5),
                                   torch.nn.Linear(4, 1))

    def batches(rng):
        return torch.from_numpy(rng.normal(size=(8, 3)).astype(np.float32))

    def loss(m, x):
        return (m(x) ** 2).mean()

    a = make()
    fit(a, batches, 6, tmp_path / "a.ckpt", 0.01, 2, "a", loss, 1)

    calls = {"n": 0}

    def interrupting(m, x):
        calls["n"] += 1
        if calls["n"] == 5:
            raise KeyboardInterrupt
        return loss(m, x)

    b = make()
    with pytest.raises(KeyboardInterrupt):
        fit(b, batches, 6, tmp_path / "b.ckpt", 0.01, 2, "b", interrupting, 1)
    b2 = make()
    fit(b2, batches, 6, tmp_path / "b.ckpt", 0.01, 2, "b", loss, 1)
    for pa, pb in zip(a.parameters(), b2.parameters()):
        assert torch.allclose(pa, pb)


def test_cosine_schedule_restarts_at_the_listed_steps():
    assert cosine_factor(0, 10) == pytest.approx(1.0)
    assert cosine_factor(10, 10) == pytest.approx(0.05)
    # Without restarts the first cycle of a restarted schedule is the plain schedule.
    assert [cosine_factor(s, 4, ()) for s in range(4)] == \
        pytest.approx([cosine_factor(s, 10, (4,)) for s in range(4)])
    assert cosine_factor(4, 10, (4,)) == pytest.approx(1.0)
    assert cosine_factor(7, 10, (4,)) == pytest.approx(0.525)
    assert cosine_factor(10, 10, (4,)) == pytest.approx(0.05)


def test_extending_a_finished_run_with_a_restart_equals_one_long_run(tmp_path):
    """Train 4 steps, then resume the finished checkpoint as 4 + 4 steps with a restart at 4:
    the result equals training 8 steps with the restart from scratch (how the bundled detector
    was extended)."""
    def make():
        torch.manual_seed(0)
        return torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 1))

    def batches(rng):
        return torch.from_numpy(rng.normal(size=(8, 3)).astype(np.float32))

    def loss(m, x):
        return ((m(x) - 1) ** 2).mean()

    a = make()
    fit(a, batches, 8, tmp_path / "a.ckpt", 0.05, 2, "a", loss, 1, restarts=(4,))
    b = make()
    fit(b, batches, 4, tmp_path / "b.ckpt", 0.05, 2, "b", loss, 1)
    b2 = make()
    fit(b2, batches, 8, tmp_path / "b.ckpt", 0.05, 2, "b", loss, 1, restarts=(4,))
    for pa, pb in zip(a.parameters(), b2.parameters()):
        assert torch.allclose(pa, pb)
    # and the restart mattered: without it the extension ends elsewhere
    c = make()
    fit(c, batches, 4, tmp_path / "c.ckpt", 0.05, 2, "c", loss, 1)
    c2 = make()
    fit(c2, batches, 8, tmp_path / "c.ckpt", 0.05, 2, "c", loss, 1)
    assert not all(torch.allclose(pa, pc) for pa, pc in zip(a.parameters(), c2.parameters()))


def test_tiny_run_exports_manifest_with_real_hashes(tiny_run):
    from CMBDetectorLib.engine.models import sha256, verify

    run, models = tiny_run
    m = verify(models)
    assert m["models"]["student"]["parameters"] <= m["teacher"]["parameters"] / 3
    assert m["models"]["detector"]["sha256"] == sha256(models / "detector.pt")
    assert {"candidate_threshold", "threshold"} <= set(m["inference"])
    for name in ("detector", "teacher", "student", "student_nokd"):
        assert (run / "weights" / f"{name}.pt").exists()
    op = json.loads((run / "operating_point.json").read_text())
    assert 0 <= op["threshold"] <= 1
    # The recorded command reproduces the run: defaults plus exactly these overrides.
    tr = m["training"]
    assert "--config" in tr["command"] and tr["overrides"]["n_pool_a"] == 2
    assert "choose_edge_distance" not in tr["overrides"]  # the tiny run keeps that default
    cfg = asdict(TrainConfig())
    cfg.update(tr["overrides"])
    assert json.loads(json.dumps(cfg)) == json.loads(json.dumps(tr["config"]))
    # The code and package versions that made its cases travel with it.
    assert tr["data_version"] == json.loads((run / "data_version.json").read_text())
    assert tr["data_version"]["anatomies"] == data_version()["anatomies"]
    assert tr["environment"]["packages"]["numpy"] == np.__version__
    assert set(tr["environment"]["packages"]) == set(ENVIRONMENT_PACKAGES)


def test_splits_are_by_subject():
    s = subject_seeds(TrainConfig())
    all_ = [x for v in s.values() for x in v]
    assert len(all_) == len(set(all_))
    assert len(s["test"]) >= 30


def test_rerun_resumes_without_retraining(tiny_run):
    run, models = tiny_run
    before = (run / "weights" / "detector.pt").stat().st_mtime_ns
    t = run_training(run, TrainConfig.tiny(), None, phases=("detector", "teacher"))
    assert (run / "weights" / "detector.pt").stat().st_mtime_ns == before
    assert t["total"] < 5


def test_other_config_in_same_folder_refused(tiny_run):
    cfg = TrainConfig.tiny()
    cfg.detector_steps += 1
    with pytest.raises(InputError, match="another configuration"):
        Run(tiny_run[0], cfg)


def test_a_larger_test_split_scores_the_new_scans_and_reuses_the_old(tiny_run, tmp_path):
    """n_test / n_cross may grow on a resumed run (they choose no training subject): the
    evaluate phase simulates and scores the new subjects only; shrinking is refused."""
    import shutil

    run = tmp_path / "run"
    shutil.copytree(tiny_run[0], run)
    models = tmp_path / "models"
    shutil.copytree(tiny_run[1], models)
    cfg = TrainConfig.tiny()
    run_training(run, cfg, models, phases=("evaluate",))
    old = sorted((run / "eval" / "pred").glob("*_detection.json"))
    assert len(old) == cfg.n_test * len(cfg.modalities)
    stamps = {p.name: p.stat().st_mtime_ns for p in old}
    cfg.n_test += 1
    run_training(run, cfg, models, phases=("evaluate",))
    now = sorted((run / "eval" / "pred").glob("*_detection.json"))
    assert len(now) == cfg.n_test * len(cfg.modalities)
    assert all(p.stat().st_mtime_ns == stamps[p.name] for p in now if p.name in stamps)
    ev = json.loads((run / "eval" / "student" / "evaluation.json").read_text())
    assert ev["overall"]["scans"] == cfg.n_test * len(cfg.modalities)
    assert json.loads((run / "config.json").read_text())["n_test"] == cfg.n_test
    cfg.n_test -= 1
    with pytest.raises(InputError, match="n_test below the run's"):
        Run(run, cfg)
    cfg.n_test += 1
    cfg.teacher_steps += 1
    with pytest.raises(InputError, match="another configuration"):
        Run(run, cfg)


def test_cases_from_another_simulator_version_refused(tiny_run, tmp_path):
    import shutil

    run = tmp_path / "copy"
    shutil.copytree(tiny_run[0], run)
    version = json.loads((run / "data_version.json").read_text())
    assert set(version) >= {"simulation", "preprocessing"}
    Run(run, TrainConfig.tiny())  # same code: accepted
    version["simulation"] = "0" * 16
    (run / "data_version.json").write_text(json.dumps(version))
    with pytest.raises(InputError, match="another version of simulation"):
        Run(run, TrainConfig.tiny())


def test_operating_point_is_chosen_on_validation_with_min_volume(tiny_run):
    from CMBDetectorLib.training.train import (EDGE_DISTANCE_CHOICES_MM, MIN_VOLUME_CHOICES_MM3,
                                         STUDENT_THRESHOLDS)

    op = json.loads((tiny_run[0] / "operating_point.json").read_text())
    assert op["min_volume_mm3"] in MIN_VOLUME_CHOICES_MM3
    assert op["min_edge_distance_mm"] in EDGE_DISTANCE_CHOICES_MM
    assert len(op["grid"]) == (len(STUDENT_THRESHOLDS) * len(MIN_VOLUME_CHOICES_MM3)
                               * len(EDGE_DISTANCE_CHOICES_MM))
    assert {g["threshold"] for g in op["grid"]} >= {0.05, 0.5, 0.9, 0.94, 0.99}
    # the chosen point is the best feasible one of the whole grid
    feasible = [g for g in op["grid"] if g["fp_per_scan"] <= TrainConfig.tiny().max_fp_per_subject]
    if feasible:
        assert op["validation_tpr_estimate"] == max(g["tpr"] for g in feasible)
    assert op["validation_scans"] >= 1
    chosen = [g for g in op["grid"] if g["threshold"] == op["threshold"]
              and g["min_volume_mm3"] == op["min_volume_mm3"]]
    assert chosen
    manifest = json.loads((tiny_run[1] / "manifest.json").read_text())
    assert manifest["inference"]["min_volume_mm3"] == op["min_volume_mm3"]
    assert manifest["inference"]["min_edge_distance_mm"] == op["min_edge_distance_mm"]
    from CMBDetectorLib.engine.detection import default_settings
    from CMBDetectorLib.engine.models import load_bundle
    settings = default_settings(load_bundle(tiny_run[1], device="cpu"))
    assert settings.min_edge_distance_mm == op["min_edge_distance_mm"]  # detect() applies it
    # one threshold per modality (the tiny run's default), each taken from the grid
    assert set(op["modality_thresholds"]) == set(TrainConfig.tiny().modalities)
    assert manifest["inference"]["modality_thresholds"] == op["modality_thresholds"]
    assert set(op["modality_thresholds"].values()) <= set(STUDENT_THRESHOLDS)


def _row(modality, cmb_probs, fp_probs):
    n = len(cmb_probs) + len(fp_probs)
    return {"modality": modality, "pmax": [0.9] * n, "volume_mm3": [10.0] * n,
            "elongation": [0.0] * n, "voxels": [10] * n, "edge_mm": [10.0] * n,
            "is_cmb": [True] * len(cmb_probs) + [False] * len(fp_probs),
            "n_truth": len(cmb_probs)}, list(cmb_probs) + list(fp_probs)


def test_per_modality_thresholds_keep_more_cmbs_within_each_budget(tmp_path):
    from CMBDetectorLib.training.train import grid_point, operating_counts

    # GRE: a faint CMB (0.6) and no confident false positive; SWI: confident false positives.
    rows, probs = zip(_row("gre", [0.6, 0.97], [0.3]), _row("swi", [0.85, 0.99], [0.6, 0.7, 0.9]))
    counts = operating_counts(list(rows), list(probs), cand_t=0.1)
    grid = [grid_point(c, v, t) for (v, t, m), c in counts.items() if m is None]
    run = Run(tmp_path, TrainConfig.tiny())
    one = run._best(grid)
    assert one["tpr"] == 0.75                 # one threshold must drop GRE's faint CMB
    op = run._per_modality(counts, grid)
    assert op["modality_thresholds"]["gre"] <= 0.6 < 0.7 < op["modality_thresholds"]["swi"] <= 0.85
    assert op["validation_tpr_estimate"] == 1.0
    assert op["validation_by_modality"]["swi"]["fp_per_scan"] == 1.0
    assert op["validation_by_modality"]["gre"]["fp_per_scan"] == 0.0
    assert op["validation_fp_per_scan_estimate"] == 0.5


def test_validation_doc_reads_its_numbers_from_the_evaluation(tiny_run, tmp_path):
    from CMBDetectorLib.evaluation.validation_doc import build

    run, _ = tiny_run
    run_training(run, TrainConfig.tiny(), tiny_run[1], phases=("evaluate",))
    docs = tmp_path / "docs"  # made by build()
    text = build(run, docs)
    ev = json.loads((run / "eval" / "student" / "evaluation.json").read_text())
    row = next(ln for ln in text.splitlines() if ln.startswith("| all |"))
    assert f"| {ev['overall']['truth_cmbs']} |" in row
    lo, hi = ev["overall"]["cluster"]["tpr_ci"]
    assert lo <= ev["overall"]["cluster"]["tpr"] <= hi
    assert f"({100 * lo:.1f}–{100 * hi:.1f})" in row
    paired = json.loads((run / "eval" / "paired_froc.json").read_text())
    r = paired["student_vs_student_nokd"]
    assert r["difference_ci"][0] <= r["difference"] <= r["difference_ci"][1]
    assert f"{100 * r['difference']:+.1f} points" in text
    assert "Not for diagnostic use" in text and (docs / "froc.png").exists()
    op = json.loads((run / "operating_point.json").read_text())
    assert f"{op['modality_thresholds']['gre']} (GRE)" in text
    assert (docs / "VALIDATION.md").read_text(encoding="utf-8") == text
    rated = ev["overall"]["cluster_rated"]
    row = next(ln for ln in text.splitlines() if ln.startswith("| all | ") and "smaller" in ln)
    assert row.startswith(f"| all | {rated['n_ref']} ({rated['below_criterion']} smaller) |")
    assert rated["n_ref"] + rated["below_criterion"] == ev["overall"]["truth_cmbs"]


def test_score_tap_records_other_classifiers_as_the_engine_scores_them():
    """Evaluation compares the teacher and the no-distillation student on the shipped
    student's own (mirrored, batched) patches; their recorded probabilities must equal what
    score_candidates gives each of them directly."""
    torch = pytest.importorskip("torch")
    from CMBDetectorLib.engine.inference import MIRRORS, score_candidates
    from CMBDetectorLib.engine.networks import Student, Teacher
    from CMBDetectorLib.training.train import ScoreTap

    torch.manual_seed(3)
    nets = {"a": Student(base=4, hidden=8).eval(), "b": Student(base=4, hidden=8).eval(),
            "t": Teacher(base=4, hidden=8).eval()}
    vol = np.random.default_rng(3).normal(0, 3, (2, 32, 32, 32)).astype(np.float32)
    centres = np.array([[8.0, 9, 10], [16, 16, 16], [20, 12, 25], [25, 25, 5], [5, 28, 18]])
    for mirrored, views in ((True, len(MIRRORS)), (False, 1)):
        tap = ScoreTap(nets["a"], {"b": nets["b"], "t": nets["t"]})
        shipped = score_candidates(tap, vol, centres, 24, batch_size=2, mirrored=mirrored)
        np.testing.assert_allclose(shipped, score_candidates(nets["a"], vol, centres, 24,
                                                             mirrored=mirrored), atol=1e-6)
        direct_b = score_candidates(nets["b"], vol, centres, 24, mirrored=mirrored)
        assert np.ptp(direct_b) > 1e-6  # distinct per candidate, so misalignment would show
        np.testing.assert_allclose(tap.probabilities("b", views), direct_b, atol=1e-6)

        class TeacherCls(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.t = nets["t"]

            def forward(self, x):
                return self.t(x)[0]
        np.testing.assert_allclose(tap.probabilities("t", views),
                                   score_candidates(TeacherCls().eval(), vol, centres, 24,
                                                    mirrored=mirrored), atol=1e-6)


def test_extra_validation_subjects_join_the_operating_point_only(tiny_run, tmp_path):
    import shutil

    run = tmp_path / "extra"
    shutil.copytree(tiny_run[0], run)
    (run / "config.json").unlink()
    bank = (run / "banks" / "candidates.npz").read_bytes()
    cfg = TrainConfig.tiny()
    cfg.n_val_extra = 1
    run_training(run, cfg, tmp_path / "models", phases=("data", "candidates", "export"))
    extra = json.loads((run / "banks" / "val_extra.json").read_text())
    assert [r["case"].split("_")[0] for r in extra] == ["sub-2023800"] * len(cfg.modalities)
    assert all(r["val"] == 1 for r in extra)
    assert (run / "banks" / "candidates.npz").read_bytes() == bank  # no training patch added
    op = json.loads((run / "operating_point.json").read_text())
    assert op["validation_scans"] == (cfg.n_val + cfg.n_val_extra) * len(cfg.modalities)
    (run / "banks" / "val_extra.json").unlink()
    with pytest.raises(InputError, match="val_extra.json is missing"):
        Run(run, cfg).validation_rows()


def test_bank_is_rebuilt_from_the_tables_at_another_patch_size(tiny_run, tmp_path):
    """A run that changes only the patch size reuses another run's cases and candidate
    tables: same patches, same draws, without the detector."""
    import shutil

    src = np.load(tiny_run[0] / "banks" / "candidates.npz")
    for grow in (0, 8):
        run = tmp_path / f"grow{grow}"
        shutil.copytree(tiny_run[0], run)
        for stale in ("config.json", "banks/candidates.npz", "weights/detector.pt"):
            (run / stale).unlink()
        cfg = TrainConfig.tiny()
        cfg.disc_patch += grow
        run_training(run, cfg, phases=("candidates",))  # no detector: it must not run
        assert not (run / "weights" / "detector.pt").exists()
        new = np.load(run / "banks" / "candidates.npz")
        for k in ("cls", "kind", "subj"):
            np.testing.assert_array_equal(new[k], src[k])
        h = grow // 2
        inner = (slice(None),) * 2 + (slice(h, h + TrainConfig.tiny().disc_patch),) * 3
        assert new["x"].shape[-1] == cfg.disc_patch
        np.testing.assert_array_equal(new["x"][inner], src["x"])
        np.testing.assert_array_equal(new["seg"][inner[1:]], src["seg"])
    (run / "banks" / "candidates.npz").unlink()
    first = json.loads((run / "banks" / "candidates.json").read_text())[0]["case"]
    (run / "cases" / f"{first}.npz").unlink()
    with pytest.raises(InputError, match="need their cases"):
        run_training(run, cfg, phases=("candidates",))


def test_settings_added_later_take_their_legacy_value(tmp_path):
    from CMBDetectorLib.training.train import LEGACY_SETTINGS

    cfg = TrainConfig.tiny()
    assert cfg.n_val_extra == LEGACY_SETTINGS["n_val_extra"] == 0
    cfg.per_modality_thresholds = False
    Run(tmp_path, cfg)
    saved = json.loads((tmp_path / "config.json").read_text())
    del saved["n_val_extra"], saved["per_modality_thresholds"]  # made before they existed
    (tmp_path / "config.json").write_text(json.dumps(saved))
    Run(tmp_path, cfg)  # accepted: the folder was made without extra validation subjects
    cfg.n_val_extra = 2
    with pytest.raises(InputError, match="another configuration"):
        Run(tmp_path, cfg)
    cfg.n_val_extra, cfg.per_modality_thresholds = 0, True
    with pytest.raises(InputError, match="another configuration"):
        Run(tmp_path, cfg)  # it was made with one threshold for all modalities


def test_tube_touches_the_lesion_keeps_labels_and_the_outside():
    from CMBDetectorLib.training.train import add_tube

    img = np.full((32, 32, 32), 0.05, np.float32)
    img[:, :, :6] = 0.0                     # outside the brain
    lab = np.zeros(img.shape, np.uint8)
    lab[15:18, 15:18, 15:18] = 1
    near = 0
    for seed in range(10):
        out = add_tube(img, lab, np.random.default_rng(seed))
        added = out - img
        assert added.min() >= 0 and added.max() > 0.2
        assert np.all(added[:, :, :6] == 0)
        # The tube's axis passes within 3 voxels of a lesion voxel: strong signal nearby.
        dist = ndi.distance_transform_edt(lab == 0)
        near += int(added[dist <= 4.5].max() > 0.5 * added.max())
    assert near >= 9


def test_tube_probability_zero_leaves_augmentation_unchanged():
    from CMBDetectorLib.training.train import augment_detector

    img = np.random.default_rng(1).normal(size=(40, 40, 40)).astype(np.float32)
    lab = np.zeros(img.shape, np.uint8)
    lab[20, 20, 20] = 1
    a, _ = augment_detector(img, lab, np.random.default_rng(5), 32)
    b, _ = augment_detector(img, lab, np.random.default_rng(5), 32, tube_prob=0.0)
    c, _ = augment_detector(img, lab, np.random.default_rng(5), 32, tube_prob=1.0)
    assert np.array_equal(a, b)
    assert not np.array_equal(a, c)


def test_detector_sim_config_reaches_pool_a_only(tmp_path, monkeypatch):
    from types import SimpleNamespace

    from CMBDetectorLib.simulation import simulator as simulation

    from CMBDetectorLib.training import data as training_data

    seen = {}

    def fake_simulate(seed, config):
        seen[seed] = config
        return SimpleNamespace(images=dict.fromkeys(cfg.modalities), cmb_labels=None,
                               mimic_labels=None, truth={})

    def fake_case(name, *args):
        return SimpleNamespace(save=lambda path: Path(path).write_bytes(b""))

    monkeypatch.setattr(simulation, "simulate_subject", fake_simulate)
    monkeypatch.setattr(training_data, "make_case", fake_case)
    cfg = TrainConfig.tiny()
    cfg.detector_sim_config = {"cmb_dark_context": 0.5}
    run = Run(tmp_path, cfg)
    run.build_cases()
    seeds = subject_seeds(cfg)
    assert sorted(seen) == sorted(seeds["pool_a"] + seeds["pool_b_train"] + seeds["pool_b_val"])
    for seed, sim in seen.items():
        assert sim.cmb_dark_context == (0.5 if seed in seeds["pool_a"] else 0.0)
        assert sim.roi_mm == 64.0 and tuple(sim.n_cmbs) == (3, 4)  # shared overrides kept


def test_extra_discriminator_subjects_join_training_only():
    base = subject_seeds(TrainConfig(n_pool_b_extra=0))
    cfg = TrainConfig(n_pool_b_extra=5)
    s = subject_seeds(cfg)
    extra = s["pool_b_train"][len(base["pool_b_train"]):]
    assert len(extra) == 5 and s["pool_b_train"][:len(base["pool_b_train"])] == base["pool_b_train"]
    for split in ("pool_a", "pool_b_val", "val_extra", "test"):
        assert s[split] == base[split]  # validation and test unchanged
    all_ = [x for v in s.values() for x in v]
    assert len(all_) == len(set(all_))
    with pytest.raises(InputError, match="n_pool_b_extra"):
        subject_seeds(TrainConfig(n_pool_b_extra=201))  # would run into the validation seeds


def test_reused_detector_is_copied_checked_and_skips_pool_a(tiny_run, tmp_path):
    import hashlib

    src = tiny_run[0] / "weights" / "detector.pt"
    cfg = TrainConfig.tiny()
    cfg.detector_weights = str(src)
    run = Run(tmp_path / "reuse", cfg)
    assert "pool_a" not in run.data_splits()
    resumed = Run(tmp_path / "resume", TrainConfig.tiny())
    assert "pool_a" in resumed.data_splits()  # its detector is still to be trained
    (tmp_path / "resume" / "weights").mkdir(parents=True, exist_ok=True)
    (tmp_path / "resume" / "weights" / "detector.pt").write_bytes(src.read_bytes())
    assert "pool_a" not in resumed.data_splits()  # trained before it resumed: no pool A
    run.train_detector()
    copied = tmp_path / "reuse" / "weights" / "detector.pt"
    assert copied.read_bytes() == src.read_bytes()
    log = json.loads((tmp_path / "reuse" / "logs" / "detector_source.json").read_text())
    assert log["sha256"] == hashlib.sha256(src.read_bytes()).hexdigest()
    other = TrainConfig.tiny()
    other.detector_base = 6  # another architecture: refused with one line
    other.detector_weights = str(src)
    with pytest.raises(InputError, match="does not fit a UNet3D"):
        Run(tmp_path / "bad", other).train_detector()
    other.detector_weights = str(tmp_path / "missing.pt")
    with pytest.raises(InputError, match="not a file"):
        Run(tmp_path / "bad2", other).train_detector()


def test_student_without_distillation_needs_no_teacher(tiny_run, tmp_path):
    import shutil

    run = tmp_path / "noteacher"
    shutil.copytree(tiny_run[0], run)
    for name in ("teacher", "student_nokd"):
        (run / "weights" / f"{name}.pt").unlink()
    shutil.rmtree(run / "ckpt")
    r = Run(run, TrainConfig.tiny())
    threads = torch.get_num_threads()  # other tests may have changed it since tiny_run
    torch.set_num_threads(int((tiny_run[0] / "torch_threads.txt").read_text()))
    try:
        r.train_student(False)  # may run beside the teacher's training
    finally:
        torch.set_num_threads(threads)
    a = torch.load(run / "weights" / "student_nokd.pt", weights_only=True)
    b = torch.load(tiny_run[0] / "weights" / "student_nokd.pt", weights_only=True)
    assert all(torch.equal(a[k], b[k]) for k in a)  # same init and batches as before
    (run / "weights" / "student.pt").unlink()
    with pytest.raises(FileNotFoundError):
        r.train_student(True)  # distillation does need the teacher


def test_edge_distance_is_chosen_on_validation_when_it_keeps_more_cmbs(tmp_path):
    from CMBDetectorLib.training.train import EDGE_DISTANCE_CHOICES_MM, grid_point, operating_counts

    # QSM: one confident CMB 2.2 mm from the mask edge, which the 3 mm rule removes.
    row, probs = _row("qsm", [0.97, 0.95], [0.3])
    row["edge_mm"] = [10.0, 2.2, 10.0]
    for choose, edge, tpr in ((True, 2.0, 1.0), (False, 3.0, 0.5)):
        edges = EDGE_DISTANCE_CHOICES_MM if choose else (3.0,)
        counts = operating_counts([row], [probs], cand_t=0.1, edges=edges)
        grid = [grid_point(c, cl, t) for (cl, t, m), c in counts.items() if m is None]
        cfg = TrainConfig.tiny()
        cfg.choose_edge_distance = choose
        run = Run(tmp_path / str(choose), cfg)
        op = run._per_modality(counts, grid)
        # the largest distance that keeps it (ties prefer the stricter rule)
        assert op["min_edge_distance_mm"] == edge
        assert op["validation_tpr_estimate"] == tpr
        assert run._best(grid)["min_edge_distance_mm"] == edge


def test_parallel_data_phase_writes_the_same_cases(tmp_path):
    cfg = TrainConfig.tiny()
    seeds = subject_seeds(cfg)["pool_b_train"] + subject_seeds(cfg)["pool_b_val"]
    made = {}
    for jobs in (1, 2):
        run = Run(tmp_path / f"jobs{jobs}", cfg)
        run.jobs = jobs
        run.seeds = {**run.seeds, "pool_b_train": seeds}  # two subjects, two processes
        run.build_cases(("pool_b_train",))
        made[jobs] = sorted((tmp_path / f"jobs{jobs}" / "cases").glob("*.npz"))
    assert [p.name for p in made[1]] == [p.name for p in made[2]]
    assert len(made[1]) == 2 * len(cfg.modalities)
    for a, b in zip(made[1], made[2]):
        za, zb = np.load(a), np.load(b)
        assert za.files == zb.files
        assert all(np.array_equal(za[k], zb[k]) for k in za.files)


def test_mask_closing_reaches_the_cases_the_manifest_and_detect(tiny_run, tmp_path, monkeypatch):
    import shutil
    from types import SimpleNamespace

    from CMBDetectorLib.simulation import simulator as simulation

    from CMBDetectorLib.training import data as training_data
    from CMBDetectorLib.engine.detection import default_settings
    from CMBDetectorLib.engine.models import load_bundle

    seen = []

    def fake_case(name, image, modality, cmb, mimics, truth, settings, *rest):
        seen.append(settings.mask_closing_mm)
        return SimpleNamespace(save=lambda path: Path(path).write_bytes(b""))

    monkeypatch.setattr(simulation, "simulate_subject", lambda seed, config: SimpleNamespace(
        images=dict.fromkeys(("swi", "gre", "qsm")), cmb_labels=None, mimic_labels=None,
        truth={}))
    monkeypatch.setattr(training_data, "make_case", fake_case)
    cfg = TrainConfig.tiny()
    cfg.mask_closing_mm = 3.0
    Run(tmp_path / "data", cfg).build_subject("pool_a", subject_seeds(cfg)["pool_a"][0])
    assert seen == [3.0] * len(cfg.modalities)  # every case is prepared with the closed mask
    # export: the bundle tells detect() which mask its networks were trained with
    run_dir = tmp_path / "run"
    shutil.copytree(tiny_run[0], run_dir)
    saved = json.loads((run_dir / "config.json").read_text())
    (run_dir / "config.json").write_text(json.dumps({**saved, "mask_closing_mm": 3.0}))
    Run(run_dir, cfg).export(tmp_path / "models")
    manifest = json.loads((tmp_path / "models" / "manifest.json").read_text())
    assert manifest["inference"]["mask_closing_mm"] == 3.0
    assert manifest["training"]["overrides"]["mask_closing_mm"] == 3.0
    assert default_settings(load_bundle(tmp_path / "models", device="cpu")).mask_closing_mm == 3.0
    # the bundled set (and the tiny one) keep the mask they were trained with: no closing
    assert "mask_closing_mm" not in json.loads((tiny_run[1] / "manifest.json").read_text())[
        "inference"]
    assert default_settings(load_bundle(tiny_run[1], device="cpu")).mask_closing_mm == 0.0


@pytest.mark.parametrize("flag", [False, True])
def test_swi_cases_take_the_swi_footprint_labels_when_asked(tmp_path, monkeypatch, flag):
    from types import SimpleNamespace

    from CMBDetectorLib.simulation import simulator as simulation

    from CMBDetectorLib.training import data as training_data

    seen = {}

    def fake_case(name, image, modality, cmb, *rest):
        seen[modality] = cmb
        return SimpleNamespace(save=lambda path: Path(path).write_bytes(b""))

    monkeypatch.setattr(simulation, "simulate_subject", lambda seed, config: SimpleNamespace(
        images=dict.fromkeys(("swi", "gre", "qsm")), cmb_labels="gre label",
        swi_cmb_labels="swi label", mimic_labels=None, truth={}))
    monkeypatch.setattr(training_data, "make_case", fake_case)
    cfg = TrainConfig.tiny()
    cfg.swi_footprint_labels = flag
    Run(tmp_path, cfg).build_subject("pool_b_train", subject_seeds(cfg)["pool_b_train"][0])
    assert seen == {"swi": "swi label" if flag else "gre label", "gre": "gre label",
                    "qsm": "gre label"}


def test_negative_weights_set_the_share_of_each_kind(tmp_path):
    from CMBDetectorLib.training.data import PATCH_KINDS

    calc, other = PATCH_KINDS.index("calcification"), PATCH_KINDS.index("other")
    kind = np.array([0] * 5 + [other] * 90 + [calc] * 10, np.int8)
    neg = np.flatnonzero(kind != 0)
    assert Run(tmp_path / "u", TrainConfig.tiny()).negative_probabilities(kind, neg) is None
    cfg = TrainConfig.tiny()
    cfg.negative_weights = {"calcification": 9.0}
    run = Run(tmp_path / "w", cfg)
    p = run.negative_probabilities(kind, neg)
    assert p.sum() == pytest.approx(1.0)
    assert p[kind[neg] == calc].sum() == pytest.approx(0.5)  # 10 x 9 against 90 x 1
    with pytest.raises(InputError, match="candidates phase"):
        run.negative_probabilities(None, neg)  # a bank made before patches had kinds
    cfg.negative_weights = {"calcifications": 2.0}
    with pytest.raises(InputError, match="unknown patch kind"):
        Run(tmp_path / "x", cfg).negative_probabilities(kind, neg)


def test_negative_weights_per_modality_override_the_plain_weight(tmp_path):
    from CMBDetectorLib.training.data import PATCH_KINDS

    calc, other = PATCH_KINDS.index("calcification"), PATCH_KINDS.index("other")
    kind = np.array(([other] * 45 + [calc] * 5) * 2, np.int8)
    modality = np.array(["gre"] * 50 + ["swi"] * 50)
    neg = np.arange(len(kind))
    cfg = TrainConfig.tiny()
    cfg.negative_weights = {"calcification": 9.0, "swi:calcification": 1.0}
    run = Run(tmp_path / "m", cfg)
    p = run.negative_probabilities(kind, neg, modality)
    assert p.sum() == pytest.approx(1.0)
    gre_calc = p[(modality == "gre") & (kind == calc)].sum()
    swi_calc = p[(modality == "swi") & (kind == calc)].sum()
    assert gre_calc == pytest.approx(45 / 140) and swi_calc == pytest.approx(5 / 140)
    with pytest.raises(InputError, match="modality"):
        run.negative_probabilities(kind, neg)  # per-modality keys without the modalities
    cfg.negative_weights = {"t1:calcification": 1.0}
    with pytest.raises(InputError, match="not one of this run"):
        Run(tmp_path / "t1", cfg).negative_probabilities(kind, neg, modality)


def test_patch_modalities_follow_the_bank(tiny_run):
    run = Run(tiny_run[0], TrainConfig.tiny())
    rows = json.loads((tiny_run[0] / "banks" / "candidates.json").read_text())
    subj = np.load(tiny_run[0] / "banks" / "candidates.npz")["subj"]
    for val in (False, True):
        mods = run.patch_modalities(val)
        assert len(mods) == len(run.disc_bank(val)[2])
        keep = subj[(subj % 2 == 1) if val else (subj % 2 == 0)]
        # the case each patch came from (its file name's suffix) is of that modality
        assert list(mods) == [rows[i // 2]["case"].rsplit("_", 1)[1] for i in keep]
        assert set(mods) == set(TrainConfig.tiny().modalities)


def test_tiny_run_bank_records_patch_kinds(tiny_run):
    z = np.load(tiny_run[0] / "banks" / "candidates.npz")
    assert len(z["kind"]) == len(z["cls"])
    assert np.array_equal(z["kind"] == 0, z["cls"] == 1)


def test_patch_norm_reaches_the_networks_and_the_exported_manifest(tiny_run, tmp_path):
    import shutil

    from CMBDetectorLib.engine.models import load_bundle
    from CMBDetectorLib.engine.networks import PatchStandardise

    run = tmp_path / "patchnorm"
    shutil.copytree(tiny_run[0], run)
    for name in ("teacher", "student", "student_nokd"):
        (run / "weights" / f"{name}.pt").unlink()
    shutil.rmtree(run / "ckpt")
    cfg = TrainConfig.tiny()
    cfg.patch_norm = True
    saved = json.loads((run / "config.json").read_text())
    saved["patch_norm"] = True
    (run / "config.json").write_text(json.dumps(saved))
    r = Run(run, cfg)
    assert r.student_config()["patch_norm"] and r.teacher_config()["patch_norm"]
    r.train_teacher()
    r.train_students()
    r.choose_operating_point()
    manifest = json.loads(r.export(tmp_path / "models").read_text())
    assert manifest["models"]["student"]["config"]["patch_norm"] is True
    assert manifest["teacher"]["config"]["patch_norm"] is True
    bundle = load_bundle(tmp_path / "models", device="cpu")
    assert any(isinstance(m, PatchStandardise) for m in bundle.student.modules())


def test_swi_mask_is_the_one_the_simulator_drew(tmp_path):
    from CMBDetectorLib.simulation.simulator import run_stages

    cfg = TrainConfig.tiny()
    cfg.sim_config = dict(cfg.sim_config, swi_mask="random")
    run = Run(tmp_path / "m", cfg)
    seeds = run.seeds["pool_b_train"] + run.seeds["pool_b_val"]
    drawn = [run.swi_mask(f"sub-{s}_swi") for s in seeds]
    for seed, mask in zip(seeds, drawn):
        st = run_stages(seed, run.sim_config("pool_b_train", seed), until="swi")
        assert st.params["appearance"]["swi"]["mask"] == mask
    # without the random knob every SWI gets the simulator's negative mask
    assert Run(tmp_path / "plain", TrainConfig.tiny()).swi_mask(f"sub-{seeds[0]}_swi") == \
        "negative"
    with pytest.raises(InputError, match="none of this run's splits"):
        run.swi_mask("sub-1_swi")


def test_projection_axis_is_the_grids_k_on_the_simulators_mip_swi_only(tmp_path):
    """The candidate tables measure elongation as ``detect()`` does: across the slice axis on
    the SWI scans the simulator made as an mIP when they were prepared unreversed, and as
    before everywhere else (a reversed mIP is measured in 3D, like any scan)."""
    from types import SimpleNamespace

    from CMBDetectorLib.simulation.simulator import run_stages

    cfg = TrainConfig.tiny()
    cfg.sim_config = dict(cfg.sim_config, swi_mip="random")
    cfg.reverse_projection = True
    reversed_run = Run(tmp_path / "r", cfg)
    cfg = TrainConfig.tiny()
    cfg.sim_config = dict(cfg.sim_config, swi_mip="random")
    run = Run(tmp_path / "m", cfg)  # the default: the mIP prepared as it is (v31's cases)
    seeds = run.seeds["pool_b_train"] + run.seeds["pool_b_val"]
    mips = []
    for seed in seeds:
        mip = run_stages(seed, run.sim_config("pool_b_train", seed),
                         until="swi").params["appearance"]["swi"]["mip"]
        mips.append(mip)
        swi = SimpleNamespace(name=f"sub-{seed}_swi", modality="swi")
        gre = SimpleNamespace(name=f"sub-{seed}_gre", modality="gre")
        assert run.projection_axis(swi) == ((1.0, 0.0, 0.0) if mip > 1 else None)
        assert run.projection_axis(gre) is None
        assert reversed_run.projection_axis(swi) is None
    assert any(m > 1 for m in mips) and any(m < 2 for m in mips), mips  # both kinds seen
    plain = Run(tmp_path / "plain", TrainConfig.tiny())  # the simulator's default: no mIP
    assert plain.projection_axis(SimpleNamespace(name=f"sub-{seeds[0]}_swi",
                                                 modality="swi")) is None


def test_a_case_of_an_mip_is_prepared_on_its_reversal_as_detect_does():
    """``make_case`` with ``reverse_projection`` prepares the reversed image, exactly what
    ``detect()`` gives the networks; without it, the mIP itself."""
    from dataclasses import replace

    from CMBDetectorLib.engine.projection import find_projection, reverse_projection
    from CMBDetectorLib.engine.settings import DetectionSettings
    from CMBDetectorLib.simulation.simulator import SimulationConfig, simulate_subject
    from CMBDetectorLib.training.data import make_case

    sub = simulate_subject(4244, SimulationConfig(roi_mm=48.0, spacing_mm=(0.9, 0.9, 1.6),
                                                  n_cmbs=1, swi_mip=3))
    swi = sub.images["swi"]
    p = find_projection(swi)
    assert p is not None and p.reversible

    def case(image, reverse):
        return make_case("sub-4244_swi", image, "swi", sub.swi_cmb_labels, sub.mimic_labels,
                         sub.truth, replace(DetectionSettings(), reverse_projection=reverse))

    on, off = case(swi, True), case(swi, False)
    np.testing.assert_array_equal(on.image, case(reverse_projection(swi, p), False).image)
    assert not np.array_equal(on.image, off.image)
    assert not TrainConfig().prep_settings().reverse_projection  # v31's recorded overrides
    assert TrainConfig(reverse_projection=True).prep_settings().reverse_projection


def _copy_run_with(tiny_run, folder, **settings):
    """A copy of the tiny run whose stored configuration has ``settings``, and its config."""
    import shutil

    shutil.copytree(tiny_run[0], folder)
    cfg = TrainConfig.tiny()
    saved = json.loads((folder / "config.json").read_text())
    for k, v in settings.items():
        setattr(cfg, k, v)
        saved[k] = v
    (folder / "config.json").write_text(json.dumps(saved))
    return cfg


def test_swi_masks_keep_other_swi_scans_out_of_training_and_validation(tiny_run, tmp_path,
                                                                       monkeypatch):
    everything = Run(tiny_run[0], TrainConfig.tiny())
    assert everything.patch_scope(False).all()
    # the tiny run's SWI scans all have the simulator's negative mask
    cfg = _copy_run_with(tiny_run, tmp_path / "positive", swi_masks=["positive"])
    run = Run(tmp_path / "positive", cfg)
    mods = run.patch_modalities(False)
    scope = run.patch_scope(False)
    assert (mods == "swi").any() and not scope[mods == "swi"].any() and scope[mods != "swi"].all()
    # the batches draw no out-of-scope patch (recovered from each drawn view's address)
    import CMBDetectorLib.training.train as train_module

    x, seg, cls, kind = run.disc_bank(False)
    drawn = []

    def record(patch, label, *args):
        drawn.append((patch.ctypes.data - x.ctypes.data) // x.strides[0])
        return patch, label

    monkeypatch.setattr(train_module, "augment_patch", record)
    batches = run._disc_batches(x, seg, cls, kind)
    rng = np.random.default_rng(0)
    for _ in range(20):
        batches(rng)
    assert len(drawn) == 20 * cfg.disc_batch and scope[drawn].all()
    rows = run.validation_rows()
    assert rows and all(r["modality"] != "swi" for r in rows)
    assert len(rows) == len(everything.validation_rows()) - 1
    cfg = _copy_run_with(tiny_run, tmp_path / "odd", swi_masks=["negative", "upside-down"])
    with pytest.raises(InputError, match="unknown phase mask"):
        Run(tmp_path / "odd", cfg).validation_rows()
