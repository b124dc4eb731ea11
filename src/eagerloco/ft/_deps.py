"""The optional dependency: torchft (``pip install eagerloco[ft]``)."""

from __future__ import annotations


def require_torchft() -> None:
    """Raise a one-line ImportError naming the extra when torchft is missing."""
    try:
        import torchft  # noqa: F401
    except ImportError as exc:
        raise ImportError(
            f"fault tolerance needs torchft: pip install 'eagerloco[ft]' (or torchft>=0.2) ({exc})"
        ) from exc
