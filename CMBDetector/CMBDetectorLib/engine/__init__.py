"""The engine that runs on one scan: reading and geometry (``volume``), preprocessing, the
radial symmetry transform, the networks and their inference, clean-up, results, settings, the
bundled models and the output files; ``detection.detect`` is the one entry point.

Runs inside Slicer (in the worker process), on the command line and in cohort processing;
numpy, scipy and SimpleITK only, torch imported lazily, no Qt.
"""
