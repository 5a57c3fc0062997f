"""Typed errors. Each message names what is wrong, what was given and what to do."""


class CultureNeuronsError(Exception):
    """Base of every error this package raises on purpose (the CLI prints it as one line)."""


class UnsupportedModelError(CultureNeuronsError):
    """The model is not of a supported family, or has no gated MLP / an unknown activation."""


class StatsMismatchError(CultureNeuronsError):
    """Two statistics (or stats and masks) come from different models, cultures or options."""


class DataError(CultureNeuronsError):
    """Input data is missing, malformed or not CVQA-shaped."""


class UsageError(CultureNeuronsError):
    """An argument is out of range or inconsistent with another one."""


class KernelError(CultureNeuronsError):
    """The Triton kernel was forced but is unavailable, broken or wrong on this device."""


def first_line(e: BaseException) -> str:
    """The first line of an exception's message (its type's name if it has none): what a
    one-line error quotes of a library's multi-line one."""
    return (str(e).strip().splitlines() or [type(e).__name__])[0]
