"""The ``credbroker`` command line: the parser in ``main``, commands in
``up``, ``procs``, ``admin``, ``users`` and ``events``, their shared helpers in
``common``, the process supervision of ``credbroker up`` in ``supervisor`` and
the demo's seed data in ``demo``. The outermost layer: it may import every
other ``workers`` subpackage and ``broker``; nothing imports it.
"""
