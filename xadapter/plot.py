"""Quick-look figures of a fitted :class:`~xadapter.SpatialAdapter` and its outputs.

Every function returns a matplotlib ``Figure`` (several panels) or ``Axes`` (one
panel) and never calls ``plt.show()``; pass ``ax=``/``axes=`` to draw into an
existing figure. Maps are plain longitude/latitude (or projected x/y) plots without a
map projection or coastlines:

* gridded fields (``lat``/``lon`` dims, or 2-D ``lat``/``lon`` coordinates) are drawn
  with ``pcolormesh``, one cell per grid point;
* station fields (one site dim with ``lat``/``lon`` or ``x``/``y`` coordinates) with
  ``scatter``, coloured by value.

Longitudes are shown in whichever convention (-180..180 or 0..360) gives the
narrower domain, so a domain across the dateline is drawn in one piece.

matplotlib is a dependency of the package; this module imports it on first use.
"""

from __future__ import annotations

import numpy as np
import xarray as xr

from .exceptions import InputError
from .labelled.labels import LATITUDE_RULES, LONGITUDE_RULES, X_RULES, Y_RULES, find_coordinate, find_time_dim

#: Nominal coverage of the intervals scored by the site cross-validation.
NOMINAL_COVERAGE = 0.9

_HISTORY_CURVES = (
    ("primal_residual", "primal residual"),
    ("dual_residual", "dual residual"),
    ("basis_change", "basis change $\\|\\Delta\\Phi\\|_F$"),
)


def _pyplot():
    try:
        import matplotlib.pyplot as plt
    except ImportError as error:
        raise ImportError(
            "xadapter.plot needs matplotlib, which is missing from this environment: pip install matplotlib (or reinstall xadapter)"
        ) from error
    return plt


def _new_axes(ax, figsize=None):
    """``ax`` and its figure, or a fresh single-panel figure."""
    if ax is not None:
        return ax.figure, ax
    fig, ax = _pyplot().subplots(figsize=figsize, layout="constrained")
    return fig, ax


def _integer_locator():
    from matplotlib.ticker import MaxNLocator

    return MaxNLocator(integer=True)


# ---------------------------------------------------------------------- map layout
def _display_lon(lon, reference=None):
    """Longitudes for display, in one continuous range.

    Without ``reference``: -180..180, unless the domain crosses the dateline there
    (span over 180 degrees) and 0..360 is narrower. With ``reference`` (degrees, e.g.
    the centre of an existing map): within 180 degrees of it.
    """
    lon = np.asarray(lon, dtype=np.float64)
    if reference is not None:
        return (lon - reference + 180.0) % 360.0 - 180.0 + reference
    west = (lon + 180.0) % 360.0 - 180.0
    if np.ptp(west) <= 180.0:
        return west
    east = lon % 360.0
    return east if np.ptp(east) < np.ptp(west) else west


def _map_layout(field):
    """How to draw ``field``: a 1-D grid, a 2-D (curvilinear) grid or scattered points.

    Returns
    -------
    kind : {"grid", "curvilinear", "points"}
    x, y : DataArray
        The horizontal and vertical coordinates.
    geographic : bool
    """
    lat, lon = find_coordinate(field, LATITUDE_RULES), find_coordinate(field, LONGITUDE_RULES)
    geographic = lat is not None and lon is not None
    if geographic:
        x, y = field[lon], field[lat]
    else:
        xn, yn = find_coordinate(field, X_RULES), find_coordinate(field, Y_RULES)
        if xn is None or yn is None:
            raise InputError(
                f"cannot map {field.name or 'the field'}: no lat/lon or x/y coordinates found "
                f"(coords: {list(field.coords)}); attach site coordinates first."
            )
        x, y = field[xn], field[yn]
    if field.ndim == 2 and x.dims == (x.name,) and y.dims == (y.name,) and {x.name, y.name} == set(field.dims):
        return "grid", x, y, geographic
    if field.ndim == 2 and x.ndim == 2 and set(x.dims) == set(field.dims) and set(y.dims) == set(field.dims):
        return "curvilinear", x, y, geographic
    if field.ndim == 1 and x.dims == field.dims and y.dims == field.dims:
        return "points", x, y, geographic
    raise InputError(
        f"cannot map a field with dims {field.dims}: give a (lat, lon) grid or one station dim "
        "with lat/lon coordinates; select other dims first (e.g. .isel(time=0))."
    )


def _squeeze_to_map(field):
    """``field`` itself if it can be mapped, else with its length-1 dims dropped."""
    try:
        _map_layout(field)
    except InputError:
        single = [d for d in field.dims if field.sizes[d] == 1]
        if not single:
            raise
        field = field.isel({d: 0 for d in single})
        _map_layout(field)
    return field


def _draw_map(ax, field, *, cmap, vmin, vmax, marker_size=None, **kwargs):
    """Draw ``field`` on ``ax`` and return the artist (QuadMesh or PathCollection)."""
    kind, x, y, geographic = _map_layout(field)
    if kind == "grid":
        values = field.transpose(y.name, x.name).values
        xv = _display_lon(x.values) if geographic else x.values
        order = np.argsort(xv, kind="stable")
        artist = ax.pcolormesh(xv[order], y.values, values[:, order], cmap=cmap, vmin=vmin, vmax=vmax,
                               shading="nearest", **kwargs)
    elif kind == "curvilinear":
        dims = x.dims
        values = field.transpose(*dims).values
        xv = _display_lon(x.values) if geographic else x.values
        artist = ax.pcolormesh(xv, y.transpose(*dims).values, values, cmap=cmap, vmin=vmin, vmax=vmax,
                               shading="nearest", **kwargs)
    else:
        xv = _display_lon(x.values) if geographic else x.values
        size = marker_size if marker_size is not None else float(np.clip(4000.0 / max(field.size, 1), 8, 80))
        # a thin grey edge keeps near-zero (white) stations visible
        style = {"edgecolors": "0.55", "linewidths": 0.3, **kwargs}
        artist = ax.scatter(xv, y.values, c=field.values, s=size, cmap=cmap, vmin=vmin, vmax=vmax, **style)
    _label_map_axes(ax, x, y, geographic)
    return artist


def _label_map_axes(ax, x, y, geographic):
    if geographic:
        ax.set_xlabel("longitude (°E)")
        ax.set_ylabel("latitude (°N)")
        mid_lat = float(np.nanmean(y.values))
        # degrees of longitude shrink with cos(latitude): keep distances roughly true
        ax.set_aspect(1.0 / max(np.cos(np.deg2rad(mid_lat)), 0.1), adjustable="box")
    else:
        ax.set_xlabel(f"{x.name} ({x.attrs.get('units', '')})".replace(" ()", ""))
        ax.set_ylabel(f"{y.name} ({y.attrs.get('units', '')})".replace(" ()", ""))
        ax.set_aspect("equal", adjustable="box")


def _colour_label(field, label=None):
    if label is not None:
        return label
    name = field.attrs.get("long_name", field.name or "")
    units = field.attrs.get("units", "")
    return f"{name} [{units}]" if units else str(name)


def _symmetric_limit(values):
    limit = float(np.nanmax(np.abs(values))) if np.isfinite(values).any() else 1.0
    return limit if limit > 0 else 1.0


# ---------------------------------------------------------------------- maps
def field_map(dataarray, ax=None, *, cmap=None, vmin=None, vmax=None, symmetric=None, colorbar=True,
              label=None, title=None, marker_size=None, figsize=None, **kwargs):
    """Map one spatial field: a (lat, lon) grid or a station field.

    Parameters
    ----------
    dataarray : xarray.DataArray
        ``(lat, lon)`` (any order), 2-D curvilinear with ``lat``/``lon`` coordinates,
        or ``(station,)`` with ``lat``/``lon`` (or ``x``/``y``) coordinates. Length-1
        extra dims (e.g. one selected time) are dropped.
    ax : matplotlib.axes.Axes, optional
        Axes to draw into; default a new figure.
    cmap : str or Colormap, optional
        Default ``"RdBu_r"`` for a symmetric scale, else ``"viridis"``.
    vmin, vmax : float, optional
        Colour limits (override ``symmetric``).
    symmetric : bool, optional
        Colour limits ``(-m, m)`` with ``m = max |value|``. Default: True when the
        values take both signs (a residual), False otherwise (a variance).
    colorbar : bool
        Add a colour bar labelled with ``long_name [units]`` from the attributes
        (or ``label``).
    title : str, optional
    marker_size : float, optional
        Marker area of station fields (points^2); default depends on the number of
        stations.
    **kwargs
        Passed to ``pcolormesh`` or ``scatter``.

    Returns
    -------
    matplotlib.axes.Axes
    """
    if not isinstance(dataarray, xr.DataArray):
        raise InputError(f"field_map needs an xarray.DataArray, got {type(dataarray).__name__}.")
    field = _squeeze_to_map(dataarray)
    values = np.asarray(field.values, dtype=np.float64)
    if symmetric is None:
        finite = values[np.isfinite(values)]
        symmetric = finite.size > 0 and finite.min() < 0 < finite.max()
    if symmetric and vmin is None and vmax is None:
        limit = _symmetric_limit(values)
        vmin, vmax = -limit, limit
    if cmap is None:
        cmap = "RdBu_r" if symmetric else "viridis"
    _, ax = _new_axes(ax, figsize)
    artist = _draw_map(ax, field, cmap=cmap, vmin=vmin, vmax=vmax, marker_size=marker_size, **kwargs)
    if colorbar:
        ax.figure.colorbar(artist, ax=ax, label=_colour_label(field, label), shrink=0.9)
    if title is not None:
        ax.set_title(title)
    return ax


def _oriented_basis(adapter, rotated):
    """Basis (space dims..., mode), or the covariance eigenvectors ``Phi V`` when rotated."""
    basis = adapter.basis
    if not rotated:
        return basis
    rotation = adapter.state["rotation"]
    loadings = xr.dot(basis, rotation, dim="mode").rename(component="mode")
    loadings = loadings.assign_coords(mode=basis["mode"].values)
    # same sign convention as the basis: entry of largest magnitude positive
    space = [d for d in loadings.dims if d != "mode"]
    flat = loadings.stack(_site=space).transpose("_site", "mode").values
    signs = np.sign(flat[np.abs(flat).argmax(axis=0), np.arange(flat.shape[1])])
    signs[signs == 0] = 1.0
    return (loadings * xr.DataArray(signs, dims="mode")).assign_attrs(basis.attrs)


def basis_maps(adapter, modes=None, *, rotated=False, axes=None, ncols=3, cmap="RdBu_r", figsize=None,
               colorbar=True, marker_size=None):
    """Map the spatial basis, one panel per mode.

    Parameters
    ----------
    adapter : SpatialAdapter or xarray.DataArray
        A fitted adapter, or a basis DataArray ``(space dims..., mode)``.
    modes : int or sequence of int, optional
        Mode labels to draw (default all; an int ``n`` draws the first ``n``).
    rotated : bool, default False
        Draw the covariance eigenvectors ``B = Phi V`` instead of ``Phi``. The
        eigenvalue in a panel title is that of ``B``'s column; ``Phi`` and ``B``
        coincide when ``V`` is the identity (the exact eigen-solution, ``tau2 = 0``).
    axes : sequence of Axes, optional
        One per mode; default a new figure with ``ncols`` columns.
    cmap : str, default "RdBu_r"
        A diverging colour map; each panel's limits are symmetric about 0.
    figsize : (float, float), optional
    colorbar : bool
    marker_size : float, optional
        Marker area of station fields.

    Returns
    -------
    matplotlib.figure.Figure
    """
    if isinstance(adapter, xr.DataArray):
        basis, eigenvalues, units = adapter, None, ""
    else:
        basis = _oriented_basis(adapter, rotated)
        eigenvalues = adapter.eigenvalues
        units = eigenvalues.attrs.get("units", "")
    if "mode" not in basis.dims:
        raise InputError(f"the basis needs a 'mode' dim (dims: {basis.dims}).")
    all_modes = list(basis["mode"].values) if "mode" in basis.coords else list(range(basis.sizes["mode"]))
    if modes is None:
        modes = all_modes
    elif isinstance(modes, (int, np.integer)):
        modes = all_modes[: int(modes)]
    modes = list(modes)
    unknown = [m for m in modes if m not in all_modes]
    if unknown or not modes:
        raise InputError(f"modes {unknown or modes} are not modes of the basis (modes: {all_modes}).")
    if axes is None:
        ncols = max(1, min(int(ncols), len(modes)))
        nrows = -(-len(modes) // ncols)
        figsize = figsize or (4.2 * ncols, 3.4 * nrows)
        fig, grid = _pyplot().subplots(nrows, ncols, figsize=figsize, layout="constrained", squeeze=False)
        flat = list(grid.ravel())
        for extra in flat[len(modes):]:
            extra.remove()
        axes = flat[: len(modes)]
    else:
        axes = list(np.ravel(axes))
        if len(axes) != len(modes):
            raise InputError(f"got {len(axes)} axes for {len(modes)} modes; give one Axes per mode.")
        fig = axes[0].figure
    for ax, mode in zip(axes, modes):
        column = basis.sel(mode=mode) if "mode" in basis.coords else basis.isel(mode=mode)
        limit = _symmetric_limit(column.values)
        artist = _draw_map(ax, column, cmap=cmap, vmin=-limit, vmax=limit, marker_size=marker_size)
        title = f"mode {mode}"
        if eigenvalues is not None:
            value = float(eigenvalues.sel(mode=mode))
            title += f"   $\\lambda$ = {value:.3g} {units}".rstrip()
        ax.set_title(title)
        if colorbar:
            fig.colorbar(artist, ax=ax, shrink=0.9)
    return fig


def kriging_maps(result, time=None, *, axes=None, sites=None, figsize=None, marker_size=None,
                 mean_kwargs=None, variance_kwargs=None):
    """Kriged mean and variance side by side for one time.

    Parameters
    ----------
    result : xarray.Dataset
        Output of :meth:`SpatialAdapter.krige` (``mean``, ``variance``, ...), on a
        grid or at stations.
    time : label, optional
        Time to show (nearest match); default the first time.
    axes : pair of Axes, optional
    sites : xarray.DataArray or Dataset, optional
        Locations to overlay as black dots (e.g. the observed stations): anything
        with ``lat``/``lon`` or ``x``/``y`` coordinates.
    figsize : (float, float), optional
    marker_size : float, optional
        Marker area of station fields.
    mean_kwargs, variance_kwargs : dict, optional
        Passed to :func:`field_map` for each panel (e.g. ``vmax``, ``cmap``).

    Returns
    -------
    matplotlib.figure.Figure
        Colour bars carry ``long_name [units]`` (variance in units squared).
    """
    if not isinstance(result, xr.Dataset) or not {"mean", "variance"} <= set(result.data_vars):
        raise InputError("kriging_maps needs the Dataset returned by SpatialAdapter.krige (mean, variance).")
    mean, variance = result["mean"], result["variance"]
    time_label = None
    try:
        time_dim = find_time_dim(mean)
    except InputError:
        time_dim = None
    if time_dim is None and time is not None:
        raise InputError(f"time={time!r} was given but the kriging result has no time dim (dims: {mean.dims}).")
    if time_dim is not None:
        if time is None:
            mean, variance = mean.isel({time_dim: 0}), variance.isel({time_dim: 0})
        else:
            mean = mean.sel({time_dim: time}, method="nearest")
            variance = variance.sel({time_dim: time}, method="nearest")
        time_label = mean[time_dim].values if time_dim in mean.coords else None
    if axes is None:
        fig, axes = _pyplot().subplots(1, 2, figsize=figsize or (10.5, 4.2), layout="constrained")
    else:
        axes = list(np.ravel(axes))
        if len(axes) != 2:
            raise InputError(f"kriging_maps draws two panels; got {len(axes)} axes.")
        fig = axes[0].figure
    field_map(mean, axes[0], marker_size=marker_size, title="kriged mean", **(mean_kwargs or {}))
    field_map(variance, axes[1], marker_size=marker_size, title="kriging variance",
              **{"symmetric": False, **(variance_kwargs or {})})
    if sites is not None:
        for ax in axes:
            _overlay_sites(ax, sites)
    if time_label is not None:
        fig.suptitle(f"{time_dim} = {_time_text(time_label)}")
    return fig


def _time_text(value):
    value = np.asarray(value)
    if np.issubdtype(value.dtype, np.datetime64):
        return np.datetime_as_string(value, unit="D")
    return str(value)


def _overlay_sites(ax, sites):
    """Black dots at the locations of ``sites`` (stations, or every point of a grid)."""
    lat, lon = find_coordinate(sites, LATITUDE_RULES), find_coordinate(sites, LONGITUDE_RULES)
    geographic = lat is not None and lon is not None
    xn, yn = (lon, lat) if geographic else (find_coordinate(sites, X_RULES), find_coordinate(sites, Y_RULES))
    if xn is None or yn is None:
        raise InputError("sites need lat/lon or x/y coordinates to be overlaid.")
    x, y = xr.broadcast(sites[xn], sites[yn])
    x, y = np.ravel(x.values), np.ravel(y.values)
    if geographic:
        # the same longitude range as the map underneath
        x = _display_lon(x, reference=float(np.mean(ax.get_xlim())))
    ax.scatter(x, y, s=6, c="k", marker=".", label="observed sites")


# ---------------------------------------------------------------------- diagnostics
def convergence(adapter, ax=None, *, figsize=None):
    """Convergence of the fit: primal and dual residuals and basis change per iteration.

    With a trend the loop is the ADMM (its primal and dual residuals); without one,
    the alternation of gap fill and basis step (the fill's distance from its
    conditional minimiser, and the length of its step).

    Parameters
    ----------
    adapter : SpatialAdapter
        A fitted adapter.
    ax : matplotlib.axes.Axes, optional

    Returns
    -------
    matplotlib.axes.Axes
        One line per quantity on a log scale (non-positive values are not drawn).
        When the loop was skipped (no trend, no missing data: the exact solution in
        one basis step) the axes carry a note instead.
    """
    state = adapter.state
    _, ax = _new_axes(ax, figsize)
    skipped = bool(state.attrs.get("skipped_loop", False))
    if skipped:
        ax.text(0.5, 0.5, "fit loop skipped:\nexact solution in one basis step\n(no trend, no missing values)",
                ha="center", va="center", transform=ax.transAxes)
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_title("fit convergence")
        return ax
    iteration = state["history_iteration"].values if "history_iteration" in state else None
    for key, label in _HISTORY_CURVES:
        name = f"history_{key}"
        if name not in state:
            continue
        values = np.asarray(state[name].values, dtype=np.float64)
        x = iteration if iteration is not None else np.arange(1, values.size + 1)
        ax.plot(x, np.where(values > 0, values, np.nan), marker=".", label=label)
    ax.set_yscale("log")
    ax.set_xlabel("iteration")
    ax.set_ylabel("residual / change")
    ax.legend()
    status = "converged" if state.attrs.get("converged", True) else "NOT converged"
    ax.set_title(f"fit convergence ({status}, {int(state.attrs.get('n_iter', 0))} iterations)")
    return ax


def eigenvalue_spectrum(adapter, ax=None, *, figsize=None):
    """Sample eigenvalues of ``Phi^T S Phi`` against the thresholded ones.

    Parameters
    ----------
    adapter : SpatialAdapter
        A fitted adapter.
    ax : matplotlib.axes.Axes, optional

    Returns
    -------
    matplotlib.axes.Axes
        Sample eigenvalues ``d_k`` (all modes), thresholded eigenvalues ``lambda_k``
        (positive ones only, log scale), the noise variance of the spectral rule
        and, with a fine-scale component, its nugget; a dotted line after the
        effective rank.
    """
    state = adapter.state
    _, ax = _new_axes(ax, figsize)
    modes = state["mode"].values
    sample = np.asarray(state["sample_eigenvalues"].values, dtype=np.float64)
    kept = np.asarray(state["eigenvalues"].values, dtype=np.float64)
    units = state["eigenvalues"].attrs.get("units", "")
    ax.plot(modes, np.where(sample > 0, sample, np.nan), "o-", color="0.5", label="sample $d_k$")
    positive = kept > 0
    ax.plot(modes[positive], kept[positive], "s", color="C0", label="thresholded $\\lambda_k$")
    spectral = float(state["low_rank_noise_variance"]) if "low_rank_noise_variance" in state \
        else float(state["noise_variance"])
    ax.axhline(spectral, color="C3", ls="--", label=f"noise variance $\\sigma^2$ = {spectral:.3g}")
    nugget = float(state["noise_variance"])
    if state.attrs.get("fine_scale", "none") != "none" and not np.isclose(nugget, spectral):
        ax.axhline(nugget, color="C1", ls=":", label=f"fine-scale nugget $\\tau^2$ = {nugget:.3g}")
    # the view follows the spectrum: a nugget near 0 (smooth fields) would stretch a log
    # axis over many decades, so a line outside the spectrum's range stays off-axis
    shown = np.r_[sample[sample > 0], kept[positive], spectral if spectral > 0 else np.nan]
    if np.isfinite(shown).any():
        ax.set_ylim(np.nanmin(shown) / 2.0, np.nanmax(shown) * 2.0)
    rank = int(positive.sum())
    if 0 < rank < len(modes):
        ax.axvline(modes[rank - 1] + 0.5, color="k", ls=":", lw=1)
    ax.set_yscale("log")
    ax.xaxis.set_major_locator(_integer_locator())
    ax.set_xlabel("mode")
    ax.set_ylabel(f"eigenvalue [{units}]" if units else "eigenvalue")
    ax.set_title(f"eigenvalue spectrum (effective rank {rank} of {len(modes)})")
    ax.legend()
    return ax


def calibration_plot(adapter, ax=None, *, figsize=None):
    """Coverage of 90 % intervals at held-out sites by distance to the nearest kept site.

    Parameters
    ----------
    adapter : SpatialAdapter
        A fitted adapter with the site cross-validation on (``site_folds >= 2``).
    ax : matplotlib.axes.Axes, optional

    Returns
    -------
    matplotlib.axes.Axes
        Coverage with the model variance alone and with the calibrated variance,
        against the upper edge of each distance bin, and the nominal 0.9 line.
    """
    calibration = adapter.calibration
    if calibration is None:
        raise InputError(
            "the adapter has no calibration: it was fitted without the cross-validation over sites; "
            "fit with site_folds >= 2 (and at least twice as many sites)."
        )
    _, ax = _new_axes(ax, figsize)
    distance = calibration["distance"].values
    ax.plot(distance, calibration["coverage_model"].values, "o-", label="model variance")
    ax.plot(distance, calibration["coverage_calibrated"].values, "s-", label="calibrated variance")
    ax.axhline(NOMINAL_COVERAGE, color="k", ls="--", lw=1, label=f"nominal {NOMINAL_COVERAGE:g}")
    lowest = np.nanmin(np.r_[calibration["coverage_model"].values, calibration["coverage_calibrated"].values, 1.0])
    ax.set_ylim(min(0.5, float(lowest) - 0.05), 1.0)
    ax.set_xlabel("distance to nearest kept site, bin upper edge (km)")
    ax.set_ylabel("coverage of 90 % intervals")
    ax.set_title("calibration at held-out sites")
    ax.legend()
    return ax


def selection_plot(adapter, ax=None, *, figsize=None):
    """Cross-validated CRPS of the ``rank="auto"`` / ``tau1="cv"`` candidates.

    Parameters
    ----------
    adapter : SpatialAdapter
        Fitted with ``rank="auto"`` and/or ``tau1="cv"``.
    ax : matplotlib.axes.Axes, optional

    Returns
    -------
    matplotlib.axes.Axes
        CRPS against the effective rank, one line per ``tau1`` (or against ``tau1``
        when each has a single rank), the chosen candidate (lowest CRPS) starred.
    """
    selection = adapter.selection
    if selection is None:
        raise InputError("the adapter has no selection record: fit with rank='auto' and/or tau1='cv'.")
    _, ax = _new_axes(ax, figsize)
    tau1 = selection["tau1"].values
    rank = selection["rank"].values
    crps = selection["crps"].values
    units = selection["crps"].attrs.get("units", "")
    best = int(np.nanargmin(crps))
    tau_values = np.unique(tau1)
    one_rank_each = all((tau1 == t).sum() == 1 for t in tau_values)
    if one_rank_each and len(tau_values) > 1:
        # tau1 alone was searched: CRPS along the tau1 grid (0 included, so not log-spaced)
        positions = np.searchsorted(tau_values, tau1)
        order = np.argsort(positions)
        ax.plot(positions[order], crps[order], "o-", label="candidates")
        for p, r, c in zip(positions, rank, crps):
            ax.annotate(f"L={int(r)}", (p, c), textcoords="offset points", xytext=(0, 6), ha="center",
                        fontsize=8)
        ax.set_xticks(np.arange(len(tau_values)), [f"{t:.3g}" for t in tau_values])
        ax.set_xlabel("smoothness weight $\\tau_1$")
        best_x = positions[best]
    else:
        for t in tau_values:
            rows = np.flatnonzero(tau1 == t)
            rows = rows[np.argsort(rank[rows])]
            ax.plot(rank[rows], crps[rows], "o-", label=f"$\\tau_1$ = {t:.3g}")
        ax.xaxis.set_major_locator(_integer_locator())
        ax.set_xlabel("effective rank")
        best_x = rank[best]
    ax.plot([best_x], [crps[best]], "*", color="k", ms=14, label="chosen", zorder=5)
    ax.set_ylabel(f"site cross-validated CRPS [{units}]" if units else "site cross-validated CRPS")
    ax.set_title(f"selection: rank {int(rank[best])}, $\\tau_1$ = {tau1[best]:.3g}")
    ax.legend()
    return ax
