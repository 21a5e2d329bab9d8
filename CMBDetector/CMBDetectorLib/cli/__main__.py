"""``python -m CMBDetectorLib.cli``: the same as the ``cmbdetector`` command."""
import sys

from .main import main

sys.exit(main())
