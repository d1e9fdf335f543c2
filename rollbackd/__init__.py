"""rollbackd: watches a staged production rollout and rolls it back when it goes bad."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("rollbackd")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.0.0+unknown"

__all__ = ["__version__"]
