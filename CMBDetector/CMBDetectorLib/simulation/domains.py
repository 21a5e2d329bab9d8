"""Which brains and which processing the models may learn from, and the split that judges them.

The bundled models were trained and tested on one simulator built on one template, and lost up
to 25 points of sensitivity on other anatomy and processing. So the data is drawn from several
*domains*, and one combination is held out of all training:

- ``train`` / ``validation``: every installed anatomy but the held-out one (MNI152 included),
  every processing family but the held-out ones, CMB sizes from the *training* prior (large
  CMBs over-represented), irregular shapes, clusters and CMBs touching veins or the cortex;
- ``test`` (in-distribution): the same domains, CMB sizes from the *real* prior;
- ``cross_domain``: the held-out anatomy crossed with the held-out family of each modality
  (2D long-TR GRE, a 2D Hann SWI filter, TKD QSM), real CMB sizes. Models and thresholds are
  chosen on ``validation`` only; ``cross_domain`` is looked at last.

Each split has its own seed range, and a subject's domain is drawn from its seed alone (same
seed, same subject). ``cmbdetector synth --split cross_domain --n 24 --out DIR`` writes one.
"""
from __future__ import annotations

import numpy as np

from . import appearance

SPLITS = ("train", "validation", "test", "cross_domain")

#: Held out of all training: the anatomy (a real subject's brain) and one processing family per
#: modality. Training never draws these values; the cross-domain split draws only these.
HELD_OUT = {"anatomy": ("robex_ref",), "gre_weighting": ("2d_long_tr",),
            "swi_filter": ("hann",), "qsm_recon": ("tkd",)}

#: First seed of each split (ranges do not overlap the earlier training runs' seeds).
SEED_BASE = {"train": 3_000_000, "validation": 3_100_000, "test": 3_200_000,
             "cross_domain": 3_300_000}

#: Lesion knobs per split: training over-represents what must be learnt (large, touching,
#: clustered CMBs); the test splits use the real size prior.
LESIONS = {
    "train": dict(cmb_size_prior="training", cmb_shape="random", cmb_cluster_prob=0.15,
                  cmb_touch_prob=0.25, calc_size_prior="training"),
    "test": dict(cmb_size_prior="real", cmb_shape="random", cmb_cluster_prob=0.1,
                 cmb_touch_prob=0.2, calc_size_prior="real"),
}
LESIONS["validation"] = LESIONS["train"]
LESIONS["cross_domain"] = LESIONS["test"]

#: The categorical choices a split may draw, before removing the held-out values.
CHOICES = {"gre_weighting": appearance.GRE_WEIGHTINGS, "swi_filter": appearance.SWI_FILTERS,
           "qsm_recon": appearance.QSM_RECONS}


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; use one of {', '.join(SPLITS)}")


def allowed(knob: str, split: str, anatomies=None) -> tuple:
    """The values of ``knob`` that ``split`` may draw (``anatomies``: those installed)."""
    _check_split(split)
    if knob == "anatomy":
        if anatomies is None:
            from .anatomies import available_anatomies

            anatomies = available_anatomies()
        pool = ("mni152",) + tuple(anatomies)
    else:
        pool = CHOICES[knob]
    held = HELD_OUT[knob]
    if split == "cross_domain":
        return tuple(v for v in pool if v in held)
    return tuple(v for v in pool if v not in held)


def missing_anatomies(installed=None) -> list:
    """The known anatomies that are not installed here. A subject's anatomy is drawn from the
    installed ones, so with any missing, a seed of a split is *another* subject than on a
    machine that has them all (`make anatomies` installs them)."""
    from .anatomies import SOURCES, available_anatomies

    installed = available_anatomies() if installed is None else installed
    return sorted(set(SOURCES) - set(installed))


def split_seeds(split: str, n: int, start: int = 0) -> list:
    """Seeds of subjects ``start .. start + n - 1`` of a split."""
    _check_split(split)
    return [SEED_BASE[split] + start + i for i in range(n)]


def draw_domain(seed: int, split: str, anatomies=None) -> dict:
    """The :class:`SimulationConfig` overrides of one subject of ``split`` (seeded choices:
    a held-out value is never drawn outside ``cross_domain``)."""
    rng = np.random.default_rng([int(seed), 2025])
    out = {}
    for knob in ("anatomy",) + tuple(CHOICES):
        values = allowed(knob, split, anatomies)
        if not values:
            raise ValueError(f"split {split!r}: no {knob} available (the held-out anatomy "
                             "needs `make anatomies`)")
        out[knob] = str(values[int(rng.integers(len(values)))])
    for knob in appearance.KNOBS:  # the continuous knobs and the SWI mask: drawn per subject
        out.setdefault(knob, "random")
    out.update(LESIONS[split])
    return out


def domain_config(seed: int, split: str, base=None, anatomies=None):
    """``base`` (a SimulationConfig, default the simulator's) with the subject's domain."""
    from dataclasses import replace

    from .simulator import SimulationConfig

    return replace(base or SimulationConfig(), **draw_domain(seed, split, anatomies))
