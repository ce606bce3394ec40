"""The labelled face: xarray in, engine, xarray out.

:class:`~xadapter.labelled.model.SpatialAdapter` turns labelled residuals into engine
arrays and the engine's results back into DataArrays and Datasets;
:mod:`~xadapter.labelled.labels` finds dims and coordinates and owns stacking;
:mod:`~xadapter.labelled.accessor` registers the thin ``.sadapter`` accessors.
"""
