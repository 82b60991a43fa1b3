"""Data section of a run config: defined in :mod:`fundus_lab.config` (a leaf module
that imports nothing of the package), re-exported here for existing imports."""

from fundus_lab.config import DataConfig  # noqa: F401

__all__ = ['DataConfig']
