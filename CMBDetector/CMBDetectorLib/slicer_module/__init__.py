"""What the 3D Slicer module runs besides the engine: the MRML adapter (``mrml``), the headless
logic (``logic``), the panel's Qt-free controller (``panel``), the worker process that detects
(``worker``, started and killed by ``process``), the dependency installer (``dependencies``)
and the in-Slicer test's scenarios (``selftest``, with the ``standins``).

Only ``mrml``, ``logic`` and what uses them import ``slicer`` (the MRML classes, which the
slicer-core wheel also provides); nothing here imports Qt, so all of it is tested headless.
"""
