"""The numerical engine: arrays in, arrays out; knows no xarray.

Every array is ``(time, site)`` (numpy or dask, chunked along time only) or a per-site
or per-mode vector. :mod:`~xadapter.engine.pipeline` is the one seam the labelled face
calls: :func:`~xadapter.engine.pipeline.fit` and
:func:`~xadapter.engine.pipeline.krige`.
"""
