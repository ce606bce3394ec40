"""Settings of a fit, validated once, before any work.

:class:`Settings` holds every numerical parameter of :func:`xadapter.engine.pipeline.fit`
(the constructor parameters of :class:`~xadapter.SpatialAdapter` minus the labels).
Building it checks all of them, so a bad value fails at once with a message naming the
parameter, not minutes into a fit.
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass

import numpy as np

from ..exceptions import InputError
from .checks import nonnegative
from .penalty import PENALTY_KINDS
from .progress import progress_enabled

FINE_SCALE_KINDS = (None, "exponential", "matern32")
EXTENSION_METHODS = ("auto", "global", "local")
TASKS = ("gaussian", "binary")
BINARY_RESIDUALS = ("working", "logit")
PREDICTION_SCALES = ("probability", "logit")


def _integer(name, value, minimum, *, allow_none=False):
    if value is None and allow_none:
        return None
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Integral) or value < minimum:
        suffix = " or None" if allow_none else ""
        raise InputError(f"{name} must be an integer >= {minimum}{suffix}, got {value!r}.")
    return int(value)


def _choice(name, value, choices):
    if value not in choices:
        raise InputError(f"unknown {name} {value!r}; choose one of {choices}.")
    return value


@dataclass(frozen=True)
class Settings:
    """Numerical parameters of a fit (see :class:`~xadapter.SpatialAdapter` for each).

    Construction validates every field; fields keep the user's spelling ("auto",
    "cv") where a value is chosen by the fit.
    """

    rank: object = 10
    tau1: object = 0.0
    tau2: float = 0.0
    gamma: float | None = None
    penalty: str = "auto"
    neighbors: int = 8
    penalty_order: int = 2
    fine_scale: str | None = "exponential"
    ridge: float = 1e-6
    rho: float = 1.0
    batch_size: int | str | None = None
    phi_every: int = 1
    phi_freeze: int | None = None
    momentum: float = 0.0
    min_iter: int = 5
    max_iter: int = 500
    tol: float = 1e-4
    extension: str = "auto"
    extension_neighbors: int = 50
    extension_smoothing: float = 0.3
    seed: int = 0
    progress: object = None
    fine_neighbors: int = 30
    site_folds: int | None = 5
    cv_max_times: int | None = 200
    cv_time_blocks: int = 3
    task: str = "gaussian"
    binary_residual: str = "working"
    binary_clip: float = 0.01
    prediction_scale: str = "probability"
    var_order: int = 1
    var_ridge: float = 1e-3
    streaming: bool = False

    def __post_init__(self):
        fix = object.__setattr__
        if self.rank != "auto":
            fix(self, "rank", _integer("rank (or 'auto')", self.rank, 1))
        if self.tau1 != "cv":
            fix(self, "tau1", nonnegative("tau1 (or 'cv')", self.tau1))
        fix(self, "tau2", nonnegative("tau2", self.tau2))
        if self.gamma is not None:
            fix(self, "gamma", nonnegative("gamma (None or a number)", self.gamma))
        _choice("penalty", self.penalty, PENALTY_KINDS)
        fix(self, "neighbors", _integer("neighbors", self.neighbors, 1))
        _choice("penalty_order", self.penalty_order, (1, 2))
        _choice("fine_scale", self.fine_scale, FINE_SCALE_KINDS)
        fix(self, "ridge", nonnegative("ridge", self.ridge))
        fix(self, "rho", nonnegative("rho", self.rho, strict=True))
        if self.batch_size != "chunks":
            fix(self, "batch_size", _integer("batch_size (or 'chunks')", self.batch_size, 1, allow_none=True))
        fix(self, "phi_every", _integer("phi_every", self.phi_every, 1))
        fix(self, "phi_freeze", _integer("phi_freeze", self.phi_freeze, 0, allow_none=True))
        fix(self, "momentum", nonnegative("momentum", self.momentum, below=1.0))
        fix(self, "min_iter", _integer("min_iter", self.min_iter, 0))
        fix(self, "max_iter", _integer("max_iter", self.max_iter, 1))
        fix(self, "tol", nonnegative("tol", self.tol))
        _choice("extension", self.extension, EXTENSION_METHODS)
        fix(self, "extension_neighbors", _integer("extension_neighbors", self.extension_neighbors, 1))
        fix(self, "extension_smoothing", nonnegative("extension_smoothing", self.extension_smoothing))
        fix(self, "seed", _integer("seed", self.seed, 0))
        if not callable(self.progress):
            progress_enabled(self.progress)  # raises on anything but True, False or None
        fix(self, "fine_neighbors", _integer("fine_neighbors", self.fine_neighbors, 1))
        if self.site_folds in (None, 0):
            fix(self, "site_folds", None)
        else:
            fix(self, "site_folds", _integer("site_folds (None or 0 to switch off)", self.site_folds, 2))
        fix(self, "cv_max_times", _integer("cv_max_times", self.cv_max_times, 1, allow_none=True))
        fix(self, "cv_time_blocks", _integer("cv_time_blocks", self.cv_time_blocks, 1))
        _choice("task", self.task, TASKS)
        _choice("binary_residual", self.binary_residual, BINARY_RESIDUALS)
        fix(self, "binary_clip", nonnegative("binary_clip", self.binary_clip, strict=True, below=0.5))
        _choice("prediction_scale", self.prediction_scale, PREDICTION_SCALES)
        fix(self, "var_order", _integer("var_order", self.var_order, 1))
        fix(self, "var_ridge", nonnegative("var_ridge", self.var_ridge))
        if not isinstance(self.streaming, (bool, np.bool_)):
            raise InputError(f"streaming must be True or False, got {self.streaming!r}.")
        fix(self, "streaming", bool(self.streaming))
        if self.tau1 == "cv" and self.site_folds is None:
            raise InputError("tau1='cv' needs the cross-validation over sites: set site_folds >= 2.")
        if self.rank == "auto" and self.site_folds is None:
            raise InputError("rank='auto' needs the cross-validation over sites: set site_folds >= 2.")

    @property
    def searching(self):
        """Whether the fit chooses the rank and/or tau1 by cross-validation."""
        return self.rank == "auto" or self.tau1 == "cv"

    @property
    def extension_options(self):
        """Keyword arguments of :func:`xadapter.engine.extend.extend_basis`."""
        return {"method": self.extension, "neighbors": self.extension_neighbors,
                "smoothing": self.extension_smoothing}
