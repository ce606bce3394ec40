"""Site geometry of a fitted or target set of sites: coordinates, projections, distances.

Pure geometry on arrays (degrees or planar km); the labelled face finds the
coordinates on the data and hands them over as a :class:`Sites`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .geometry import domain_centre, great_circle_km, planar_coords_km


@dataclass(frozen=True)
class Sites:
    """Coordinates of a set of sites.

    Attributes
    ----------
    geographic : bool
        Whether the sites are given by latitude/longitude (else planar x/y).
    lat, lon : ndarray or None, shape (N,)
        Degrees.
    xy_km : ndarray or None, shape (N, d)
        Projected coordinates in km (planar input).
    """

    geographic: bool
    lat: np.ndarray | None = None
    lon: np.ndarray | None = None
    xy_km: np.ndarray | None = None

    @property
    def size(self):
        return len(self.lat) if self.geographic else len(self.xy_km)

    def graph_coords(self):
        """Coordinates for neighbour graphs, with the matching ``geographic`` flag."""
        if self.geographic:
            return np.column_stack([self.lat, self.lon]), True
        return self.xy_km, False

    def planar_km(self, centre=None):
        """Planar km coordinates for thin-plate work (projection centred on ``centre``)."""
        if self.geographic:
            return planar_coords_km(self.lat, self.lon, centre)
        return self.xy_km

    def pairwise_km(self):
        """Dense (N, N) distances in km (small N only): great-circle or planar."""
        if self.geographic:
            return great_circle_km(self.lat[:, None], self.lon[:, None], self.lat[None, :], self.lon[None, :])
        diff = self.xy_km[:, None, :] - self.xy_km[None, :, :]
        return np.sqrt((diff**2).sum(-1))

    def centre(self):
        """Centre (lat, lon) of the local projection, None for planar sites."""
        return domain_centre(self.lat, self.lon) if self.geographic else None
