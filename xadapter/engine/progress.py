"""Progress bars for the long Python loops of the engine (ADMM iterations, CV folds).

dask's diagnostics see only the execution of dask graphs, not these loops, so the
engine reports them itself with ``tqdm`` (``tqdm.auto``: a text bar in a terminal, a
widget in a notebook when ``ipywidgets`` is installed).

Every function that reports progress takes the same ``progress`` argument:

* ``True``: always show a bar (on ``sys.stderr``);
* ``False``: never;
* ``None``: show it only when ``sys.stderr`` is a terminal, so scripts, batch jobs and
  logs redirected to files stay clean while an interactive shell gets a bar.
"""

from __future__ import annotations

import sys

import numpy as np

from ..exceptions import InputError


def progress_enabled(progress):
    """Whether a bar should be shown for ``progress`` (True, False or None).

    Raises
    ------
    InputError
        ``progress`` is anything else.
    """
    if progress is None:
        stream = sys.stderr
        isatty = getattr(stream, "isatty", None)
        try:
            return bool(isatty()) if isatty is not None else False
        except (ValueError, OSError):  # a closed or detached stream is not a terminal
            return False
    if isinstance(progress, (bool, np.bool_)):
        return bool(progress)
    raise InputError(f"progress must be True (always show), False (never) or None (only when stderr is a "
                     f"terminal), got {progress!r}.")


class _Silent:
    """Stand-in for a bar when progress is off: every call does nothing."""

    def update(self, n=1):
        pass

    def set_postfix(self, **values):
        pass

    def set_description(self, text):
        pass

    def close(self):
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False


def progress_bar(progress, total, description, unit="it"):
    """A bar over ``total`` steps, or a silent stand-in when ``progress`` says no.

    Parameters
    ----------
    progress : bool or None
        See the module docstring.
    total : int or None
        Number of steps (the bar may close earlier, e.g. when a loop converges).
    description : str
        Label shown before the bar.
    unit : str
        Name of one step.

    Returns
    -------
    object
        ``tqdm`` bar or silent stand-in, with ``update``, ``set_postfix``,
        ``set_description`` and ``close``, usable as a context manager.
    """
    if not progress_enabled(progress):
        return _Silent()
    from tqdm.auto import tqdm

    # file is looked up now, not at import, so redirections of sys.stderr are honoured;
    # leave=True keeps the final state (iterations, last residuals) on screen.
    return tqdm(total=total, desc=description, unit=unit, file=sys.stderr, leave=True, dynamic_ncols=True)
