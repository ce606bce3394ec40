"""Exception family of xadapter.

Every error raised on bad input derives from :class:`XAdapterError` and from the
built-in exception a caller would naturally catch (``ValueError`` for bad values,
``AttributeError`` for an unfitted model), so ``except ValueError`` keeps working.
Messages say what is wrong and how to fix it.
"""


class XAdapterError(Exception):
    """Base class of all xadapter errors."""


class InputError(XAdapterError, ValueError):
    """Input data or parameters that cannot be used as given."""


class CoordinateError(InputError):
    """Site coordinates that are missing, invalid, or duplicated."""


class MissingCoordinateError(CoordinateError):
    """No usable latitude/longitude or x/y coordinates were found."""


class DuplicateSiteError(CoordinateError):
    """Two or more sites share the same coordinates."""


class ProblemTooLargeError(InputError):
    """A dense computation was requested for a problem size it cannot handle."""


class WorkerLostError(XAdapterError, RuntimeError):
    """Part of the fit's iterative state (filled field, ADMM or alternation memory) held on
    ``dask.distributed`` workers was lost with a worker and cannot be recomputed: the fit
    cannot go on (run it again)."""


class NotFittedError(XAdapterError, AttributeError):
    """A fitted attribute or method was used before ``fit``."""


def warn(message, category=UserWarning):
    """Issue a warning attributed to the user's line: the first caller outside xadapter.

    A fixed ``stacklevel`` points at whichever internal module happens to call the
    engine (the accessor, the model, the pipeline); walking out of the package points
    at the user's code whatever the path.
    """
    import os
    import sys
    import warnings

    package = os.path.dirname(os.path.abspath(__file__)) + os.sep
    frame, level = sys._getframe(0), 1
    while frame is not None and os.path.abspath(frame.f_code.co_filename).startswith(package):
        frame, level = frame.f_back, level + 1
    warnings.warn(message, category, stacklevel=level)
