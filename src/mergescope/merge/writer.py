"""The merge engine's writer is the package's one sharded writer, ``io.writer.PlannedWriter``.

It lives in ``io`` (``ms.save`` streams through it too; ``io`` must not import ``merge``): the
output layout is fixed from the planned names, dtypes and shapes before any tensor is merged, each
merged tensor is ``pwrite``n at its offset and freed, and finished shards go to the resume log.
"""

from __future__ import annotations

from ..io.writer import Layout, PlannedWriter, split_shards

__all__ = ["Layout", "PlannedWriter", "split_shards"]
