"""The data stage: tasks in the storage root, how they get there, and how they are read back.

- ``tasks``: the task format (``tasks/<task>/task.json`` plus train/test Parquet parts).
- ``ingest``: an ImageFolder (local or ``s3://``) -> a task.
- ``reader``: a task split -> tensor batches (decode, resize, ``to_float``).
- ``image_limits``: the pixel bound applied before decoding untrusted images.
- ``builtin/``: the offline built-in corpus (sources, catalog, their Debian and pip package lists).
"""
