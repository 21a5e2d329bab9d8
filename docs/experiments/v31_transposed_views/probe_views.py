"""probe_views.py PRED SCANS OUT: re-score every stored candidate of PRED (detection.json files
of the bundled models on the simulated SCANS) over sixteen views (the eight mirror images and
their in-plane transposes) into OUT/, checking that the eight mirrors reproduce the stored
confidences (the eight-view one is kept as ``confidence_extra``). Run from the
repository root."""
import sys

import numpy as np

sys.path.insert(0, "docs/experiments")
from rescore import rescore  # noqa: E402
from CMBDetectorLib.engine.inference import MIRRORS, _student_probabilities  # noqa: E402


def mirrors(models, x):
    return _student_probabilities(models.student, x, 64, MIRRORS)


def sixteen(models, x):
    """The sixteen-view confidence, and the eight-view one beside (``confidence_extra``)."""
    eight = mirrors(models, x)
    transposed = np.ascontiguousarray(x.swapaxes(3, 4))  # j and i swapped
    return (eight + _student_probabilities(models.student, transposed, 64, MIRRORS)) / 2, eight


worst = rescore("CMBDetector/Resources/Models", *sys.argv[1:4], sixteen, mirrors)
print(f"largest difference of the 8-view re-score to the stored confidence: {worst:.2e}")
