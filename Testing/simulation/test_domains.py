"""The training domains and the cross-domain split: held-out anatomy and processing families
are never drawn for training, and are the only ones drawn for the cross-domain split."""
from __future__ import annotations

import json

import pytest

from CMBDetectorLib.simulation import domains as D

INSTALLED = ["cat12_ixi555", "colin27", "icbm152_sym55", "pydeface_mean", "robex_ref"]


@pytest.mark.parametrize("split", ["train", "validation", "test"])
def test_training_and_test_splits_never_draw_a_held_out_value(split):
    seen = {k: set() for k in D.HELD_OUT}
    for seed in D.split_seeds(split, 300):
        dom = D.draw_domain(seed, split, INSTALLED)
        for knob, held in D.HELD_OUT.items():
            assert dom[knob] not in held, (seed, knob, dom[knob])
            seen[knob].add(dom[knob])
    # and they do vary: every allowed value turns up
    for knob in D.HELD_OUT:
        assert seen[knob] == set(D.allowed(knob, split, INSTALLED)), knob
    assert "mni152" in seen["anatomy"] and len(seen["anatomy"]) == 5


def test_cross_domain_draws_only_held_out_values_with_real_sizes():
    for seed in D.split_seeds("cross_domain", 50):
        dom = D.draw_domain(seed, "cross_domain", INSTALLED)
        assert all(dom[k] in D.HELD_OUT[k] for k in D.HELD_OUT)
        assert dom["cmb_size_prior"] == "real" and dom["swi_mask"] == "random"
    assert D.draw_domain(D.SEED_BASE["train"], "train", INSTALLED)["cmb_size_prior"] == "training"


def test_same_seed_same_domain_and_disjoint_seed_ranges():
    seed = D.split_seeds("test", 1, start=7)[0]
    assert D.draw_domain(seed, "test", INSTALLED) == D.draw_domain(seed, "test", INSTALLED)
    ranges = [set(D.split_seeds(s, 10_000)) for s in D.SPLITS]
    assert sum(len(r) for r in ranges) == len(set().union(*ranges))


def test_cross_domain_without_the_held_out_anatomy_is_a_clear_error():
    with pytest.raises(ValueError, match="make anatomies"):
        D.draw_domain(D.SEED_BASE["cross_domain"], "cross_domain", anatomies=[])


def test_synth_writes_a_split_with_its_domains(tmp_path, monkeypatch):
    import CMBDetectorLib.simulation.anatomies as A
    from CMBDetectorLib.cli.main import main

    monkeypatch.setattr(A, "available_anatomies", lambda: [])  # MNI152 only: fast, no builds
    rc = main(["synth", "--split", "train", "--n", "2", "--roi-mm", "40", "--modality", "swi",
               "--allow-missing-anatomies", "--out", str(tmp_path)])
    assert rc == 0
    doms = json.loads((tmp_path / "domains.json").read_text())
    assert sorted(doms) == [f"sub-{s:05d}" for s in D.split_seeds("train", 2)]
    for stem, dom in doms.items():
        assert (tmp_path / f"{stem}_swi.nii.gz").exists()
        assert dom["anatomy"] == "mni152" and dom["swi_filter"] not in D.HELD_OUT["swi_filter"]
    with pytest.raises(SystemExit):
        main(["synth", "--split", "nonsense", "--out", str(tmp_path)])
    assert main(["synth", "--split", "cross_domain", "--n", "1", "--out", str(tmp_path)]) != 0


def test_synth_size_prior_replaces_the_splits(tmp_path, monkeypatch):
    """Validation subjects with the test splits' (real) sizes: same anatomy and processing as
    the split draws, only the lesion size prior replaced, and recorded in domains.json."""
    import CMBDetectorLib.simulation.anatomies as A
    from CMBDetectorLib.cli.main import main
    from CMBDetectorLib.simulation.cli import _split_jobs
    from CMBDetectorLib.simulation.simulator import SimulationConfig

    monkeypatch.setattr(A, "available_anatomies", lambda: [])
    rc = main(["synth", "--split", "validation", "--n", "1", "--roi-mm", "40", "--modality",
               "gre", "--n-cmbs", "3", "--size-prior", "real", "--allow-missing-anatomies",
               "--out", str(tmp_path)])
    assert rc == 0
    (stem, dom), = json.loads((tmp_path / "domains.json").read_text()).items()
    seed = D.split_seeds("validation", 1)[0]
    drawn = D.draw_domain(seed, "validation", [])
    assert drawn["cmb_size_prior"] == "training"
    assert dom == {**drawn, "cmb_size_prior": "real", "calc_size_prior": "real"}
    assert (tmp_path / f"{stem}_gre.nii.gz").exists()
    (_, cfg, *_), = _split_jobs("validation", 1, 0, SimulationConfig(), tmp_path, ("gre",),
                                False, "real", allow_missing=True)
    assert (cfg.cmb_size_prior, cfg.calc_size_prior) == ("real", "real")
    assert cfg.anatomy == drawn["anatomy"] and cfg.gre_weighting == drawn["gre_weighting"]


def test_truth_records_the_drawn_domain_only_when_not_default():
    from CMBDetectorLib.simulation.simulator import SimulationConfig, simulate_subject

    plain = simulate_subject(11, SimulationConfig(roi_mm=40.0, n_cmbs=1))
    assert "anatomy" not in plain.truth["params"] and "appearance" not in plain.truth["params"]
    dom = D.domain_config(D.split_seeds("train", 1)[0], "train", SimulationConfig(roi_mm=40.0),
                          anatomies=[])
    sub = simulate_subject(11, dom)
    app = sub.truth["params"]["appearance"]
    assert app["gre_weighting"]["variant"] == dom.gre_weighting
    assert app["swi"]["filter"] == dom.swi_filter
    width = app["swi"]["sigma_mm"]  # drawn, not the 3 mm default every domain subject had
    assert 1.5 <= width <= 6.0 and width != 3.0
    assert sub.truth["params"]["homodyne_sigma_mm"] == width
    json.dumps(sub.truth)  # plain JSON


def test_synth_split_refuses_when_an_anatomy_is_missing(tmp_path, monkeypatch, capsys):
    """Without every anatomy a seed draws another subject, so a split would silently change
    (a session once ranked two bundles on 96 MNI152-only 'selection subjects')."""
    import CMBDetectorLib.simulation.anatomies as A
    from CMBDetectorLib.cli.main import main

    monkeypatch.setattr(A, "available_anatomies", lambda: ["colin27", "robex_ref"])
    assert D.missing_anatomies() == ["cat12_ixi555", "icbm152_sym55", "pydeface_mean"]
    rc = main(["synth", "--split", "validation", "--n", "1", "--out", str(tmp_path)])
    assert rc != 0
    err = capsys.readouterr().err
    assert "cat12_ixi555, icbm152_sym55, pydeface_mean" in err and "make anatomies" in err
    assert not list(tmp_path.glob("sub-*"))
    # with all installed the same seed draws from all five
    assert D.missing_anatomies(list(A.SOURCES)) == []
