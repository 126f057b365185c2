"""`CannotCache`: a fit the feature cache must leave to plain `model.fit`, and why.

The checks (`eligibility`), the split (`plan`) and the feature computation (`extract`) raise it;
`executor` catches it and trains without the cache under `cache="auto"`, or raises the user's
`ConfigError` under `cache=True`. Private to the cache: users only ever see the `ConfigError`
or, when the fallback deserves one, a `RuntimeWarning`.
"""

from __future__ import annotations

__all__ = ["CannotCache"]


class CannotCache(Exception):
    """This fit cannot use the feature cache.

    Args:
        reason: why, worded to follow "this fit cannot use the feature cache: ".
        warn: whether falling back under `cache="auto"` deserves a warning: something failed
            unexpectedly (the prefix raised while computing the features), as opposed to a
            known limit of the cache, which falls back silently.

    Example:

    >>> str(CannotCache("the model has no trainable weights"))
    'the model has no trainable weights'
    """

    def __init__(self, reason: str, *, warn: bool = False) -> None:
        super().__init__(reason)
        self.reason = reason
        self.warn = warn
