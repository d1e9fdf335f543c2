"""rollbackd: watches a staged production rollout and rolls it back when it goes bad."""

from functools import cache


@cache
def _version() -> str:
    # Read on first use: importlib.metadata pulls in email and socket, which the pure engine
    # (``import rollbackd.engine``) must not load.
    from importlib.metadata import PackageNotFoundError, version  # noqa: PLC0415

    try:
        return version("rollbackd")
    except PackageNotFoundError:  # running from a source tree that was never installed
        return "0.0.0+unknown"


def __getattr__(name: str) -> str:
    if name == "__version__":
        return _version()
    raise AttributeError(f"module 'rollbackd' has no attribute {name!r}")


__all__ = ["__version__"]
