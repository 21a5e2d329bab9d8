"""score_student.py BUNDLE PRED SCANS OUT [WEIGHTS BASE HIDDEN]: re-score every stored
candidate of PRED (detection.json files of BUNDLE on the simulated SCANS) with BUNDLE's student,
or with the student WEIGHTS of width BASE / HIDDEN, over the eight mirror images, into OUT/.
Run from the repository root."""
import sys

import torch

sys.path.insert(0, "docs/experiments")
from rescore import rescore  # noqa: E402
from CMBDetectorLib.engine.inference import MIRRORS, _student_probabilities  # noqa: E402
from CMBDetectorLib.engine.networks import Student  # noqa: E402

net = None
if len(sys.argv) > 5:
    net = Student(in_channels=2, base=int(sys.argv[6]), hidden=int(sys.argv[7]), patch_norm=True)
    net.load_state_dict(torch.load(sys.argv[5], map_location="cpu", weights_only=True))
    net.eval()


def bundled(models, x):
    return _student_probabilities(models.student, x, 64, MIRRORS)


def score(models, x):
    return _student_probabilities(net or models.student, x, 64, MIRRORS)


worst = rescore(*sys.argv[1:5], score, bundled)
print(f"largest difference of the bundle's student to the stored confidences: {worst:.2e}")
