"""probe_teacher.py RUN PRED SCANS ROWS.json: the student's and the teacher's confidence (eight
mirrors) on the stored candidate nearest each CMB listed in ROWS ([{"stem", "mod", "vis"}]:
the subject, the modality and the CMB's visible diameter on it), with the bundled models'
preprocessing and RUN's teacher. Run from the repository root."""
import json
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, "CMBDetector")
from CMBDetectorLib.engine.detection import _preprocess, default_settings  # noqa: E402
from CMBDetectorLib.engine.inference import MIRRORS, _student_probabilities, extract_patches  # noqa: E402
from CMBDetectorLib.engine.models import load_bundle  # noqa: E402
from CMBDetectorLib.engine.networks import Teacher  # noqa: E402
from CMBDetectorLib.engine.volume import read_volume  # noqa: E402

run, pred, scans = Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3])
models = load_bundle("CMBDetector/Resources/Models", device="cpu")
settings = default_settings(models)
cfg = json.loads((run / "config.json").read_text())
teacher = Teacher(in_channels=2, base=cfg["teacher_base"], hidden=cfg["teacher_hidden"],
                  patch_norm=cfg.get("patch_norm", False))
teacher.load_state_dict(torch.load(run / "weights" / "teacher.pt", weights_only=True))
teacher.eval()


class Classifier(torch.nn.Module):
    """The teacher's classification head alone (it also returns the segmentation)."""

    def __init__(self, net):
        super().__init__()
        self.net = net

    def forward(self, x):
        return self.net(x)[0]


head = Classifier(teacher).eval()
for row in json.loads(Path(sys.argv[4]).read_text()):
    stem, mod = row["stem"], row["mod"]
    det = json.loads((pred / f"{stem}_{mod}_detection.json").read_text())
    truth = json.loads((scans / f"{stem}_truth.json").read_text())
    key = f"{mod}_visible_diameter_mm"
    cmb = min(truth["cmbs"], key=lambda c: abs(c.get(key, c["visible_diameter_mm"]) - row["vis"]))
    prep, ch = _preprocess(read_volume(scans / f"{stem}_{mod}.nii.gz"), mod, None, settings)
    ras = np.array([c["centroid_ras"] for c in det["candidates"]])
    near = ras[[int(np.linalg.norm(ras - np.array(cmb["centre_ras"]), axis=1).argmin())]]
    x = extract_patches(ch, prep.grid.ras_to_ijk_points(near)[:, ::-1], 24)
    s = _student_probabilities(models.student, x, 64, MIRRORS)[0]
    t = _student_probabilities(head, x, 64, MIRRORS)[0]
    print(f"{stem} {mod} {row['vis']:.1f} mm: student {s:.3f} teacher {t:.3f}", flush=True)
