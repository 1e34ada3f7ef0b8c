"""Split names as the common data-set libraries write them: ``train``, ``test[:9000]``,
``train[:90%]``."""

import re

from dgm.errors import DgmError

__all__ = ["parse_split", "slice_of"]


def parse_split(spec: str) -> tuple[str, int | float | None, int | float | None]:
    """Parse ``train``, ``test[:9000]``, ``test[9000:]``, ``train[:90%]`` into (base, start, stop).

    Integer bounds are counts; bounds ending in % are fractions of the split, as a float in [0, 1].
    """
    m = re.fullmatch(r"\s*(train|test)\s*(?:\[\s*(-?\d+%?)?\s*:\s*(-?\d+%?)?\s*\])?\s*", spec)
    if not m:
        raise DgmError(f"bad split {spec!r}: use 'train' or 'test', optionally sliced, "
                       "e.g. 'test[:9000]', 'test[9000:]', 'train[:90%]'")

    def bound(s: str | None) -> int | float | None:
        if s is None:
            return None
        if s.endswith("%"):
            pct = int(s[:-1])
            if not -100 <= pct <= 100:
                raise DgmError(f"bad split {spec!r}: percentages must lie in [-100%, 100%]")
            return pct / 100
        return int(s)

    return m.group(1), bound(m.group(2)), bound(m.group(3))


def slice_of(n: int, start: int | float | None, stop: int | float | None) -> slice:
    def index(b: int | float | None) -> int | None:
        return round(b * n) if isinstance(b, float) else b

    return slice(index(start), index(stop))
