"""The ``xadapter`` command.

Subcommands:

``xadapter fit INPUT.nc VAR``
    fit an adapter on a residual variable (or ``VAR - PREDICTION``) of a NetCDF file
    and save it as one NetCDF file;
``xadapter krige ADAPTER.nc --observed OBS.nc --var NAME``
    krige observed residuals at the fitted sites, at the locations of a NetCDF file
    or on a regular lat/lon grid, and write mean, variance and interval bounds;
``xadapter forecast ADAPTER.nc --steps N``
    forecast the residual field the next N time steps after the last fitted time,
    at the fitted sites, the locations of a NetCDF file or on a grid;
``xadapter info ADAPTER.nc``
    print the model summary, the file format version, the parameters and the
    selection and calibration tables (``--quiet``: only check the file);
``xadapter plot ADAPTER.nc [KRIGED.nc]``
    write PNG maps of the basis, of the calibration and of a kriged field;
``xadapter demo``
    fit an adapter on the bundled real ozone residuals and krige held-out grid cells,
    printing skill against the first stage alone.

User mistakes (a missing file, an unknown variable, a bad option value, any
:class:`~xadapter.exceptions.XAdapterError`) end the command with one line
``error: ...`` on stderr and exit status 2, never a traceback. Output files are
written atomically, so a failed command leaves none behind.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as _dt
import shlex
import sys
import time
import warnings
from pathlib import Path

import numpy as np

#: Exit status of a command stopped by a user mistake (argparse's own convention).
USAGE_ERROR = 2

#: ``--scheduler`` values that pick a local dask scheduler instead of a cluster address.
LOCAL_SCHEDULERS = ("threads", "processes", "synchronous")

#: Attributes that make a lat/lon coordinate CF-compliant on written outputs.
CF_LATITUDE = {"standard_name": "latitude", "long_name": "latitude", "units": "degrees_north", "axis": "Y"}
CF_LONGITUDE = {"standard_name": "longitude", "long_name": "longitude", "units": "degrees_east", "axis": "X"}
#: Attributes of the time coordinate of written outputs; ``standard_name`` only when it
#: holds dates, since CF reads a ``time`` as units "since" an epoch, which xarray writes
#: for dates only.
CF_TIME = {"standard_name": "time", "axis": "T"}
#: The ``Conventions`` attribute of the kriged, forecast and demo NetCDF files.
CF_CONVENTIONS = "CF-1.8"

#: Seconds to wait for a dask.distributed scheduler before giving up.
CONNECT_TIMEOUT = "10s"


class CommandError(Exception):
    """A user mistake detected by the command itself (reported as one ``error:`` line)."""


class _Parser(argparse.ArgumentParser):
    """An ArgumentParser whose usage errors are one ``error:`` line, not the usage text.

    argparse creates the subcommand parsers with the class of their parent, so one
    override covers every subcommand.
    """

    def error(self, message):
        raise CommandError(f"{self.prog}: {message} (see '{self.prog} --help')")


# ---------------------------------------------------------------------- shared helpers
def _report_error(message):
    """Print ``message`` as one ``error:`` line on stderr and return the exit status."""
    # messages from xarray or netCDF4 may span lines; a script reading stderr wants one
    print("error: " + " ".join(str(message).split()), file=sys.stderr)
    return USAGE_ERROR


def _show_warning(message, category, filename, lineno, file=None, line=None):
    # a warning (e.g. the ADMM did not converge) is advice to the user, not a code location
    print("warning: " + " ".join(str(message).split()), file=sys.stderr)


def _say(args):
    """A print function that ``--quiet`` silences."""

    def say(text=""):
        if not getattr(args, "quiet", False):
            print(text, flush=True)

    return say


def _progress(args):
    """The model's ``progress=``: bars only on a terminal, never with ``--quiet``."""
    return False if getattr(args, "quiet", False) else None


def _existing_file(path):
    path = Path(path)
    if not path.exists():
        raise CommandError(f"{path}: no such file")
    if not path.is_file():
        raise CommandError(f"{path} is not a file")
    return path


def _output_path(path):
    """``path`` checked before any long computation: its folder must exist."""
    path = Path(path)
    folder = path.parent if str(path.parent) else Path(".")
    if not folder.is_dir():
        raise CommandError(f"cannot write {path}: folder {folder} does not exist")
    if path.is_dir():
        raise CommandError(f"cannot write {path}: it is a folder")
    return path


@contextlib.contextmanager
def _open_input(path, chunks=None):
    """Open a NetCDF file for the duration of a command, chunked along ``chunks`` if given.

    With ``chunks`` the variables are dask arrays read chunk by chunk when the fit
    or the write of a kriged file computes them, so the file stays open until the
    command is done; without, they are read into memory and the file is closed.
    """
    import xarray as xr

    path = _existing_file(path)
    try:
        ds = xr.open_dataset(path, chunks=chunks)
    except (OSError, ValueError) as error:
        raise CommandError(_unreadable(path, error)) from None
    with ds:
        if chunks:
            # xarray ignores chunk sizes of dims the file does not have: a typo would
            # silently load everything in memory
            unknown = [dim for dim in chunks if dim not in ds.dims]
            if unknown:
                raise CommandError(f"--chunks: {path} has no dim {unknown[0]!r} (dims: {list(ds.dims)})")
        else:
            ds.load()
        yield ds


def _unreadable(path, error):
    """The message for a file xarray cannot open: its first sentence is the useful part."""
    first = str(error).split(". ")[0].strip().rstrip(".")
    if "did not find a match" in first:  # xarray found no backend that reads the file
        first = "not a NetCDF file"
    return f"cannot read {path}: {first}"


def _variable(ds, name, path, what="variable"):
    if name not in ds.data_vars:
        raise CommandError(f"{what} {name!r} is not a variable of {path} (variables: {list(ds.data_vars)})")
    return ds[name]


@contextlib.contextmanager
def _scheduler(spec, say):
    """Run the body on the dask scheduler named by ``--scheduler``.

    ``None``: dask's default; ``threads``/``processes``/``synchronous``: that local
    scheduler; anything else is the address of a dask.distributed scheduler, to which
    a client is connected for the duration of the body (and becomes dask's default).
    """
    if spec is None:
        yield
        return
    import dask

    if spec in LOCAL_SCHEDULERS:
        with dask.config.set(scheduler=spec):
            yield
        return
    try:
        import distributed
    except ImportError:
        raise CommandError(f"--scheduler {spec}: dask.distributed is not installed (pip install distributed)") from None
    try:
        client = distributed.Client(spec, timeout=CONNECT_TIMEOUT)
    except (OSError, ValueError, TypeError) as error:
        _close_unconnected_default_client(distributed)
        raise CommandError(f"--scheduler: cannot connect to a dask scheduler at {spec!r}: {error}") from None
    with client:
        say(f"dask: connected to {spec} ({len(client.scheduler_info().get('workers', {}))} workers)")
        yield


def _close_unconnected_default_client(distributed):
    """Close the default dask client if it never connected.

    A ``Client`` whose constructor fails on an address it cannot parse stays registered
    as the default client and leaves dask's scheduler set to it: every later dask
    computation in the process (``main`` called from Python, a notebook) would go to an
    address that does not work. A running default client (the user's own) is left alone.
    """
    try:
        stale = distributed.default_client()
    except ValueError:
        return
    if stale.status != "running":
        stale.close()


def _load_adapter(path):
    """The adapter saved in ``path``; a file that is not one is a one-line error."""
    from . import load
    from .exceptions import XAdapterError

    path = _existing_file(path)
    try:
        return load(path)
    except XAdapterError:
        raise
    except (OSError, ValueError) as error:
        raise CommandError(_unreadable(path, error)) from None
    except (KeyError, TypeError) as error:
        # NetCDF with the 'parameters' attribute but not the rest of an adapter's state
        raise CommandError(f"{path} is not a complete xadapter file (missing {error})") from None


def _covariates(ds, names, path):
    """The variables ``names`` of ``ds`` stacked along ``feature``, as the model takes them."""
    import xarray as xr

    arrays = [_variable(ds, name, path, "covariate") for name in names]
    return xr.concat(arrays, dim="feature").assign_coords(feature=list(names))


def _cf_coordinates(dataset, *sources):
    """``dataset`` with coordinate attributes restored from ``sources`` and CF lat/lon.

    Kriging builds its output coordinates from plain values; this copies the
    attributes (units, long names) of the same coordinates in the inputs and makes
    sure latitude and longitude carry CF ``units`` and ``standard_name``.
    """
    from .labelled.labels import LATITUDE_RULES, LONGITUDE_RULES, find_coordinate

    for name in dataset.coords:
        for source in sources:
            if source is not None and name in source.coords and source[name].attrs:
                dataset[name].attrs = {**source[name].attrs, **dataset[name].attrs}
                break
    for rules, cf in ((LATITUDE_RULES, CF_LATITUDE), (LONGITUDE_RULES, CF_LONGITUDE)):
        name = find_coordinate(dataset, rules)
        if name is not None:
            attrs = dataset[name].attrs
            for key in ("standard_name", "units"):
                attrs.setdefault(key, cf[key])
            if name in dataset.dims:
                for key in ("long_name", "axis"):
                    attrs.setdefault(key, cf[key])
    return dataset


def _holds_dates(coordinate):
    """Whether ``coordinate`` holds dates (numpy datetime64 or cftime objects)."""
    if coordinate.dtype.kind == "M":
        return True
    return coordinate.dtype == object and coordinate.size > 0 and hasattr(coordinate.values.flat[0], "calendar")


def _cf_output(dataset, time_dim, *sources):
    """``dataset`` ready to be written as CF: coordinates, time axis and ``Conventions``.

    The lat/lon and source attributes are those of :func:`_cf_coordinates`; the time
    coordinate ``time_dim`` (when the dataset has one) gets ``axis="T"``, and
    ``standard_name="time"`` when it holds dates.
    """
    dataset = _cf_coordinates(dataset, *sources)
    if time_dim in dataset.coords:
        attrs = dataset[time_dim].attrs
        attrs.setdefault("axis", CF_TIME["axis"])
        if _holds_dates(dataset[time_dim]):
            attrs.setdefault("standard_name", CF_TIME["standard_name"])
    dataset.attrs["Conventions"] = CF_CONVENTIONS
    return dataset


def _save_figures(figures, out):
    """Write ``{file name: Figure}`` as PNG in ``out``, closing each; the paths written."""
    from . import plot

    plt = plot._pyplot()
    paths = []
    for name, figure in figures.items():
        figure.savefig(out / name, dpi=110, bbox_inches="tight")
        plt.close(figure)
        paths.append(out / name)
    return paths


def _write_maps(adapter, out, prefix="", kriged=None, sites=None, modes=6):
    """PNG maps of an adapter (and of a kriged Dataset) in ``out``: the paths written.

    Basis modes, the calibration at held-out sites when the adapter has one, and the
    kriged mean and variance of the first time when ``kriged`` is given, with
    ``sites`` (anything with lat/lon) overlaid. Raises ImportError without matplotlib.
    """
    from . import plot

    plot._pyplot().switch_backend("Agg")  # files only: never open a window
    figures = {f"{prefix}basis.png": plot.basis_maps(adapter, modes=min(modes, adapter.state.sizes["mode"]))}
    if kriged is not None:
        figures[f"{prefix}kriged_map.png"] = plot.kriging_maps(kriged, sites=sites)
    if adapter.calibration is not None:
        figures[f"{prefix}calibration.png"] = plot.calibration_plot(adapter).figure
    return _save_figures(figures, out)


def _table(ds, digits=4):
    """A Dataset over one dim as an aligned text table (coordinates first)."""
    dim = next(iter(ds.dims))
    columns = [name for name in ds.coords if ds[name].dims == (dim,)] + [
        name for name in ds.data_vars if ds[name].dims == (dim,)]

    def cell(value):
        if isinstance(value, (float, np.floating)):
            return f"{value:.{digits}g}"
        return str(value.item() if isinstance(value, np.generic) else value)

    rows = [[cell(v) for v in ds[name].values] for name in columns]
    widths = [max([len(name)] + [len(c) for c in column]) for name, column in zip(columns, rows)]
    lines = ["  ".join(name.rjust(w) for name, w in zip(columns, widths))]
    for i in range(ds.sizes[dim]):
        lines.append("  ".join(column[i].rjust(w) for column, w in zip(rows, widths)))
    return "\n".join(lines)


# ---------------------------------------------------------------------- option types
def _number(kind, minimum, strict, description):
    """An argparse type: ``kind`` (int or float) above ``minimum`` (strictly when ``strict``)."""

    def parse(text):
        try:
            value = kind(text)
        except ValueError:
            value = None
        if value is None or not np.isfinite(value) or value < minimum or (strict and value == minimum):
            raise argparse.ArgumentTypeError(f"must be {description}, got {text!r}")
        return value

    return parse


_positive_int = _number(int, 1, False, "a positive integer")
_non_negative_int = _number(int, 0, False, "an integer >= 0")
_positive_float = _number(float, 0.0, True, "a positive number")


def _rank(text):
    if text == "auto":
        return text
    try:
        return _positive_int(text)
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(f"must be a positive integer or 'auto', got {text!r}") from None


def _tau1(text):
    if text == "cv":
        return text
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not value >= 0 or not np.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a number >= 0 or 'cv', got {text!r}")
    return value


def _level(text):
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not 0 < value < 1:
        raise argparse.ArgumentTypeError(f"must be a probability strictly between 0 and 1, got {text!r}")
    return value


def _names(text):
    names = [name.strip() for name in text.split(",")]
    if not all(names):
        raise argparse.ArgumentTypeError(f"must be comma-separated variable names, got {text!r}")
    return names


def _chunks(text):
    """``time=N[,dim=N...]`` as the ``chunks`` dict of ``xr.open_dataset``."""
    chunks = {}
    for part in text.split(","):
        dim, sep, size = part.partition("=")
        try:
            chunks[dim.strip()] = _positive_int(size)
        except argparse.ArgumentTypeError:
            sep = ""
        if not sep or not dim.strip():
            raise argparse.ArgumentTypeError(f"must be DIM=SIZE with a positive SIZE (e.g. time=100), got {text!r}")
    return chunks


def _axis(text, name, limit):
    parts = text.split(":")
    try:
        start, stop, step = (float(p) for p in parts)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"the {name} part must be START:STOP:STEP in degrees, got {text!r}") from None
    if not step > 0 or stop < start or not np.isfinite([start, stop, step]).all():
        raise argparse.ArgumentTypeError(f"the {name} part {text!r} needs STEP > 0 and STOP >= START")
    if limit is not None and (start < -limit or stop > limit):
        raise argparse.ArgumentTypeError(f"the {name} part {text!r} leaves [-{limit}, {limit}] degrees")
    # STOP is included when it lies on the grid, whatever the rounding of STEP
    count = int(np.floor((stop - start) / step + 1e-9)) + 1
    return start + step * np.arange(count)


def _grid(text):
    """``LAT0:LAT1:DLAT,LON0:LON1:DLON`` as a Dataset of CF lat/lon coordinates."""
    import xarray as xr

    parts = text.split(",")
    if len(parts) != 2:
        raise argparse.ArgumentTypeError(f"must be LAT0:LAT1:DLAT,LON0:LON1:DLON, got {text!r}")
    lat = _axis(parts[0], "latitude", 90)
    lon = _axis(parts[1], "longitude", None)
    return xr.Dataset(coords={"lat": ("lat", lat, dict(CF_LATITUDE)), "lon": ("lon", lon, dict(CF_LONGITUDE))})


# ---------------------------------------------------------------------- subcommands
def _fit(args):
    say = _say(args)
    output = _output_path(args.output)
    params = dict(rank=args.rank, tau1=args.tau1, fine_scale=None if args.fine_scale == "none" else args.fine_scale,
                  max_iter=args.max_iter, tol=args.tol, site_folds=args.site_folds, seed=args.seed,
                  progress=_progress(args))
    with _open_input(args.input, args.chunks) as ds, _scheduler(args.scheduler, say):
        for name, what in ((args.variable, "variable"), (args.prediction, "prediction")):
            if name is not None:
                _variable(ds, name, args.input, what)
        for name in args.covariates or ():
            _variable(ds, name, args.input, "covariate")
        start = time.perf_counter()
        adapter = ds.sadapter.fit(target=args.variable, prediction=args.prediction, covariates=args.covariates,
                                  **params)
        elapsed = time.perf_counter() - start
    adapter.to_netcdf(output)
    say(repr(adapter))
    say(f"fitted in {elapsed:.2f} s; wrote {output}")
    return 0


def _record_command(dataset, args):
    """The CF ``history`` attribute: when and by which command ``dataset`` was written."""
    stamp = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    dataset.attrs["history"] = f"{stamp}: {shlex.join(['xadapter'] + args.argv)}"


def _add_targets(parser, verb, at_default, grid_note=""):
    """``--at`` / ``--grid`` (one or the other) and ``--level`` of the kriging and forecast commands."""
    where = parser.add_mutually_exclusive_group()
    separator = "" if at_default.startswith(";") else " "
    where.add_argument("--at", metavar="TARGETS.nc",
                       help=f"NetCDF file whose coordinates are the targets{separator}{at_default}")
    where.add_argument("--grid", type=_grid, metavar="LAT0:LAT1:DLAT,LON0:LON1:DLON",
                       help=f"{verb} on a regular lat/lon grid (degrees, ends included){grid_note}")
    parser.add_argument("--level", type=_level, default=0.9, help="central probability of the intervals")


def _targets(args):
    """The kriging or forecast targets: ``--at`` stations (loaded), else the ``--grid``."""
    if args.at is None:
        return args.grid
    with _open_input(args.at) as at:
        return at


def _trend_features(adapter):
    """The names of the residual trend's covariates, or None for an adapter without a trend."""
    if adapter.trend_coefficients is None:
        return None
    return [str(name) for name in adapter.trend_coefficients["feature"].values]


def _check_trend_options(adapter, args):
    """``--covariates`` and ``--grid`` of ``xadapter krige`` checked against the adapter's trend.

    Caught here rather than left to the model, whose messages name its keyword
    arguments (``covariates=...``), not the command's options.
    """
    features = _trend_features(adapter)
    if features is None:
        if args.covariates:
            raise CommandError(f"--covariates: {args.adapter} has no residual trend (it was fitted without "
                               "--covariates), so there is nothing to use them for; leave the option out")
        return
    names = ",".join(features)
    if args.grid is not None:
        raise CommandError(f"--grid cannot be used with {args.adapter}: it has a residual trend on {features}, "
                           f"which needs the covariates at every target and a grid has none; give the targets "
                           f"as --at TARGETS.nc with the variables {names}")
    if not args.covariates:
        where = f"variables of {args.observed}" + (
            "" if args.at is None else f", and the same variables in {args.at}")
        raise CommandError(f"this adapter has a residual trend on {features}: give --covariates {names} ({where})")


def _krige(args):
    import xarray as xr

    say = _say(args)
    output = _output_path(args.output)
    adapter = _load_adapter(args.adapter)
    _check_trend_options(adapter, args)
    targets = _targets(args)
    with _open_input(args.observed, args.chunks) as ds, _scheduler(args.scheduler, say):
        observed = _variable(ds, args.var, args.observed)
        if args.prediction is not None:
            _variable(ds, args.prediction, args.observed, "prediction")
            observed = ds.sadapter.residual(args.var, args.prediction)
        covariates = None
        if args.covariates:
            covariates = _covariates(ds, args.covariates, args.observed)
            if args.at is not None and all(name in targets.data_vars for name in args.covariates):
                # one covariate array must cover the observed and the target stations
                target_covariates = _covariates(targets, args.covariates, args.at)
                not_space = {"feature", adapter.state.attrs["time_dim"]}
                shared = (set(covariates.dims) & set(target_covariates.dims)) - not_space
                if len(shared) == 1:
                    covariates = xr.concat([covariates, target_covariates], dim=shared.pop(),
                                           coords="minimal", compat="override")
        start = time.perf_counter()
        kriged = adapter.krige(observed, at=targets, level=args.level, include_noise=not args.no_noise,
                               covariates=covariates)
        kriged = _cf_output(kriged, adapter.state.attrs["time_dim"], targets, observed, adapter.state)
        _record_command(kriged, args)
        from .io.netcdf import atomic_to_netcdf

        # a dask-backed result (--chunks) is computed chunk by chunk while it is written
        with _write_progress(args):
            atomic_to_netcdf(kriged, output)
        elapsed = time.perf_counter() - start
    sizes = ", ".join(f"{dim}: {size}" for dim, size in kriged["mean"].sizes.items())
    what = args.var if args.prediction is None else f"{args.var} - {args.prediction}"
    say(f"kriged {what} ({sizes}) in {elapsed:.2f} s; wrote {output}")
    return 0


def _forecast(args):
    say = _say(args)
    output = _output_path(args.output)
    adapter = _load_adapter(args.adapter)
    targets = _targets(args)
    start = time.perf_counter()
    forecast = adapter.forecast(args.steps, at=targets, level=args.level)
    forecast = _cf_output(forecast, adapter.state.attrs["time_dim"], targets, adapter.state)
    _record_command(forecast, args)
    from .io.netcdf import atomic_to_netcdf

    atomic_to_netcdf(forecast, output)
    sizes = ", ".join(f"{dim}: {size}" for dim, size in forecast["mean"].sizes.items())
    say(f"forecast {args.steps} step(s) after {forecast.attrs['start']} ({sizes}) in "
        f"{time.perf_counter() - start:.2f} s; wrote {output}")
    return 0


def _write_progress(args):
    """A dask progress bar for writing lazy results, on a terminal and without ``--quiet``."""
    if getattr(args, "quiet", False) or not sys.stderr.isatty() or args.scheduler not in (None,) + LOCAL_SCHEDULERS:
        return contextlib.nullcontext()
    from dask.diagnostics import ProgressBar

    return ProgressBar(out=sys.stderr)


def _info(args):
    adapter = _load_adapter(args.adapter)
    if args.quiet:
        # loading is the check: a file that is not a readable adapter has failed above
        return 0
    attrs = adapter.state.attrs
    print(repr(adapter))
    print(f"\nfile: {args.adapter}")
    # files without the attribute predate it and have format 1 (see labelled/state.py)
    print(f"  file format: {attrs.get('xadapter_format', 1)}")
    print(f"  xadapter version: {attrs.get('xadapter_version', 'unknown')}")
    print(f"  created: {attrs.get('created', 'unknown')}")
    print(f"  units: {attrs.get('units') or 'none'}")
    print("\nparameters:")
    params = adapter.get_params()
    width = max(len(name) for name in params)
    for name, value in params.items():
        print(f"  {name:<{width}}  {value!r}")
    for title, table in (("selection (rank / smoothness search)", adapter.selection),
                         ("calibration (90 % intervals at held-out sites, by distance in km)", adapter.calibration)):
        print(f"\n{title}:")
        print("  none" if table is None else "\n".join("  " + line for line in _table(table).splitlines()))
    return 0


def _plot(args):
    import xarray as xr

    say = _say(args)
    adapter = _load_adapter(args.adapter)
    kriged = None
    if args.kriged is not None:
        with _open_input(args.kriged) as ds:
            kriged = ds
        missing = [name for name in ("mean", "variance") if name not in kriged.data_vars]
        if missing:
            raise CommandError(f"{args.kriged} is not a kriged file of 'xadapter krige' (no {missing[0]!r})")
    try:
        from . import plot

        plot._pyplot()
    except ImportError:
        raise CommandError("plots need matplotlib, which is missing from this environment: pip install matplotlib") from None
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise CommandError(f"--out {out} is a file, not a folder")
    out.mkdir(parents=True, exist_ok=True)
    sites = xr.Dataset(coords=adapter.mean.coords) if kriged is not None else None
    written = _write_maps(adapter, out, kriged=kriged, sites=sites, modes=args.modes)
    say("wrote " + ", ".join(str(path) for path in written))
    return 0


def _demo(args):
    import xarray as xr

    from . import SpatialAdapter, datasets, metrics

    say = _say(args)
    n_train = 48
    ds = datasets.ozone_residuals(n_train=n_train)
    cells = datasets.grid_to_cells(ds["residual"])
    rng = np.random.default_rng(args.seed)
    n_cells = cells.sizes["cell"]
    held_out = np.zeros(n_cells, bool)
    held_out[rng.choice(n_cells, int(round(args.holdout * n_cells)), replace=False)] = True
    train_cells, test_cells = cells.isel(cell=~held_out), cells.isel(cell=held_out)
    say(f"ozone residuals: {n_cells} grid cells, {cells.sizes['time']} months; fitting on months 1-{n_train} "
        f"at {int((~held_out).sum())} cells, kriging the {int(held_out.sum())} unseen cells in months "
        f"{n_train + 1}-{cells.sizes['time']} from the others")

    start = time.perf_counter()
    adapter = SpatialAdapter(
        rank=args.rank, tau1=args.tau1, fine_scale=None if args.fine_scale == "none" else args.fine_scale,
        seed=args.seed, progress=_progress(args),
    ).fit(train_cells.isel(time=slice(0, n_train)))
    observed = train_cells.isel(time=slice(n_train, None))
    targets = test_cells.isel(time=0, drop=True)
    result = adapter.krige(observed, at=targets, level=0.9)
    elapsed = time.perf_counter() - start
    say(repr(adapter))

    truth = test_cells.isel(time=slice(n_train, None)).transpose("time", "cell").values
    pred = result.transpose("time", "cell")
    first_stage_rmse = metrics.rmse(truth, np.zeros_like(truth))
    rows = [
        ("first stage alone", first_stage_rmse, float("nan"), float("nan")),
        ("first stage + adapter", metrics.rmse(truth, pred["mean"].values),
         metrics.crps_gaussian(truth, pred["mean"].values, pred["variance"].values),
         metrics.coverage(truth, pred["lower"].values, pred["upper"].values)),
    ]
    say(f"\nunseen cells, months {n_train + 1}-{cells.sizes['time']} (DU); fit + krige {elapsed:.2f} s")
    say(f"{'model':<24}{'RMSE':>8}{'CRPS':>8}{'cover90':>9}")
    for name, rmse, crps, cover in rows:
        say(f"{name:<24}{rmse:>8.3f}{crps:>8.3f}{cover:>9.3f}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    adapter.to_netcdf(out / "ozone_adapter.nc")
    from .io.netcdf import atomic_to_netcdf

    # the whole grid for the first forecast month, as maps of mean and variance
    grid = xr.Dataset(coords={"lat": ds["lat"], "lon": ds["lon"]})
    maps = _cf_output(adapter.krige(observed.isel(time=slice(0, 1)), at=grid, level=0.9), "time", ds)
    atomic_to_netcdf(_cf_output(result, "time", cells), out / "ozone_kriged_cells.nc")
    atomic_to_netcdf(maps, out / "ozone_kriged_map.nc")
    written = [out / "ozone_adapter.nc", out / "ozone_kriged_cells.nc", out / "ozone_kriged_map.nc"]
    if not args.no_plot:
        try:
            written += _write_maps(adapter, out, prefix="ozone_", kriged=maps,
                                   sites=train_cells.isel(time=0, drop=True))
        except ImportError:
            # matplotlib is a dependency, but a trimmed environment may lack it; the
            # demo's numbers and NetCDF files stand without the maps
            say("(matplotlib is not importable: no PNG maps; pip install matplotlib)")
    say("\nwrote " + ", ".join(str(path) for path in written))
    return 0


# ---------------------------------------------------------------------- parser
def _add_dask_options(parser):
    parser.add_argument(
        "--chunks", type=_chunks, metavar="time=N",
        help="open the input lazily with dask chunks of N time steps (DIM=N[,DIM=N]; keep the space dims "
             "whole), so the work streams over time chunks")
    parser.add_argument(
        "--scheduler", metavar="ADDRESS",
        help="dask scheduler: the address of a dask.distributed scheduler (e.g. tcp://host:8786), or "
             f"one of {', '.join(LOCAL_SCHEDULERS)} for a local one")


def _add_quiet(parser):
    parser.add_argument("-q", "--quiet", action="store_true",
                        help="no progress bars or summaries (errors and warnings still go to stderr)")


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows defaults, except the uninformative ones of flags and unset options."""

    def _get_help_string(self, action):
        if action.default is None or action.default is False:
            return action.help
        return super()._get_help_string(action)


def build_parser():
    """The ``xadapter`` argument parser (one subparser per subcommand)."""
    from .engine.settings import Settings

    formatter = _HelpFormatter
    parser = _Parser(prog="xadapter", formatter_class=formatter,
                     description="Spatial adapters for the residuals of frozen forecast models: fit an adapter "
                                 "on a NetCDF file, krige with it, describe it and map it.",
                     epilog="Run 'xadapter COMMAND --help' for the options of a command.")
    from ._version import __version__

    parser.add_argument("--version", action="version", version=f"xadapter {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    fit = sub.add_parser("fit", formatter_class=formatter,
                         help="fit an adapter on a residual variable of a NetCDF file",
                         description="Fit a spatial adapter on VAR (or VAR - PREDICTION) of a NetCDF file of "
                                     "station or gridded data over time and save it as one NetCDF file.")
    fit.add_argument("input", metavar="INPUT.nc", help="NetCDF file with the residuals (time, space dims)")
    fit.add_argument("variable", metavar="VAR", help="variable to fit: the residual, or the target with --prediction")
    fit.add_argument("--prediction", metavar="NAME", help="first-stage prediction variable; the residual is VAR - NAME")
    fit.add_argument("--covariates", type=_names, metavar="A,B",
                     help="variables of the residual trend (comma-separated)")
    fit.add_argument("--rank", type=_rank, default=10, metavar="K|auto",
                     help="nominal rank, or 'auto' to choose it by cross-validation over sites")
    fit.add_argument("--tau1", type=_tau1, default=0.0, metavar="X|cv",
                     help="smoothness weight, or 'cv' to choose it by cross-validation over sites")
    fit.add_argument("--fine-scale", default="exponential", choices=["exponential", "matern32", "none"],
                     help="short-range covariance beyond the low rank ('none': the paper's model)")
    fit.add_argument("--max-iter", type=_positive_int, default=Settings.max_iter, metavar="N",
                     help="ADMM iteration limit")
    fit.add_argument("--tol", type=_positive_float, default=1e-4, metavar="X",
                     help="relative tolerance of the ADMM stopping rule")
    fit.add_argument("--site-folds", type=_non_negative_int, default=5, metavar="N",
                     help="folds of the cross-validation over sites that calibrates intervals at new sites "
                          "(0: off)")
    fit.add_argument("--seed", type=int, default=0, metavar="N", help="seed of every random choice")
    _add_dask_options(fit)
    fit.add_argument("-o", "--output", default="adapter.nc", metavar="ADAPTER.nc", help="adapter file to write")
    _add_quiet(fit)
    fit.set_defaults(run=_fit)

    krige = sub.add_parser("krige", formatter_class=formatter,
                           help="krige observed residuals with a fitted adapter",
                           description="Krige observed residuals with a fitted adapter: at the fitted sites "
                                       "(default), at the locations of --at, or on a --grid; writes mean, "
                                       "variance, lower and upper as CF-labelled NetCDF.")
    krige.add_argument("adapter", metavar="ADAPTER.nc", help="adapter file written by 'xadapter fit'")
    krige.add_argument("--observed", required=True, metavar="OBS.nc", help="NetCDF file of observed residuals")
    krige.add_argument("--var", required=True, metavar="NAME", help="variable of OBS.nc to krige")
    krige.add_argument("--prediction", metavar="NAME",
                       help="first-stage prediction variable of OBS.nc; kriges the residual --var minus NAME "
                            "(as fitted by 'xadapter fit --prediction')")
    _add_targets(krige, "krige", "(stations with lat/lon, or a lat/lon grid); default: fill the fitted sites",
                 "; not for an adapter with a residual trend, whose covariates a grid does not have (use --at)")
    krige.add_argument("--no-noise", action="store_true",
                       help="predict the latent field rather than a new observation (leave out the white noise)")
    krige.add_argument("--covariates", type=_names, metavar="A,B",
                       help="residual-trend covariates (the fitted features) in OBS.nc, and in TARGETS.nc "
                            "for targets elsewhere; required by an adapter fitted with a trend, an error "
                            "for one without")
    _add_dask_options(krige)
    krige.add_argument("-o", "--output", default="kriged.nc", metavar="KRIGED.nc", help="kriged file to write")
    _add_quiet(krige)
    krige.set_defaults(run=_krige)

    forecast = sub.add_parser("forecast", formatter_class=formatter,
                              help="forecast the residual field ahead with a fitted adapter",
                              description="Forecast the residual field the next --steps time steps after the last "
                                          "fitted time (VAR of the scores): at the fitted sites (default), at the "
                                          "locations of --at, or on a --grid; writes mean, variance, lower and "
                                          "upper as CF-labelled NetCDF.")
    forecast.add_argument("adapter", metavar="ADAPTER.nc", help="adapter file written by 'xadapter fit'")
    forecast.add_argument("--steps", type=_positive_int, default=1, metavar="N", help="time steps ahead")
    _add_targets(forecast, "forecast", "; default: the fitted sites")
    forecast.add_argument("-o", "--output", default="forecast.nc", metavar="FORECAST.nc",
                          help="forecast file to write")
    _add_quiet(forecast)
    forecast.set_defaults(run=_forecast)

    info = sub.add_parser("info", formatter_class=formatter, help="describe a saved adapter",
                          description="Print the model summary, file format and xadapter versions, parameters "
                                      "and the selection and calibration tables of an adapter file.")
    info.add_argument("adapter", metavar="ADAPTER.nc", help="adapter file written by 'xadapter fit'")
    # the printed description is what info is for, so --quiet leaves only the check
    info.add_argument("-q", "--quiet", action="store_true",
                      help="print nothing: only check that ADAPTER.nc is an adapter this version reads "
                           "(exit status 0, or 2 with one error line)")
    info.set_defaults(run=_info)

    plot = sub.add_parser("plot", formatter_class=formatter, help="PNG maps of an adapter and a kriged field",
                          description="Write PNG maps: the basis modes, the calibration at held-out sites (when "
                                      "the adapter has one), and the kriged mean and variance of KRIGED.nc "
                                      "(first time). Needs matplotlib.")
    plot.add_argument("adapter", metavar="ADAPTER.nc", help="adapter file written by 'xadapter fit'")
    plot.add_argument("kriged", nargs="?", metavar="KRIGED.nc", help="kriged file written by 'xadapter krige'")
    plot.add_argument("--out", default="xadapter-plots", metavar="DIR", help="folder for the PNG files")
    plot.add_argument("--modes", type=_positive_int, default=6, metavar="N", help="basis modes to draw")
    _add_quiet(plot)
    plot.set_defaults(run=_plot)

    demo = sub.add_parser("demo", formatter_class=formatter, help="fit and krige the bundled real ozone data",
                          description="Fit an adapter on the bundled ozone residuals and krige held-out grid "
                                      "cells; prints skill and writes NetCDF files and PNG maps.")
    demo.add_argument("--rank", type=_positive_int, default=10, metavar="K", help="nominal rank")
    demo.add_argument("--tau1", type=_tau1, default=0.0, metavar="X", help="smoothness weight")
    demo.add_argument("--fine-scale", default="exponential", choices=["exponential", "matern32", "none"],
                      help="short-range covariance beyond the low rank")
    demo.add_argument("--holdout", type=_level, default=0.2, metavar="FRACTION", help="fraction of cells held out")
    demo.add_argument("--seed", type=int, default=0, metavar="N", help="seed of the hold-out and of the fit")
    demo.add_argument("--out", "--output", dest="out", default="xadapter-demo", metavar="DIR",
                      help="folder for the NetCDF and PNG outputs")
    demo.add_argument("--no-plot", action="store_true", help="do not write PNG maps")
    _add_quiet(demo)
    demo.set_defaults(run=_demo)
    return parser


def main(argv=None):
    """Run the ``xadapter`` command with ``argv`` (default ``sys.argv[1:]``); the exit status."""
    from .exceptions import XAdapterError

    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        args = build_parser().parse_args(argv)
    except CommandError as error:
        return _report_error(error)
    except SystemExit as done:  # --help and --version
        return done.code if isinstance(done.code, int) else 0
    args.argv = argv
    with warnings.catch_warnings():
        warnings.showwarning = _show_warning
        try:
            return args.run(args)
        except (CommandError, XAdapterError) as error:
            return _report_error(error)
        except KeyboardInterrupt:
            _report_error("interrupted")
            return 130


if __name__ == "__main__":
    sys.exit(main())
