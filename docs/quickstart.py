import xarray as xr
import xadapter                                          # registers the .sadapter accessors

ds = xadapter.datasets.ozone_residuals(n_train=48)       # ozone, first-stage prediction, residual (DU)
resid = ds["residual"]                                   # (time, lat, lon), the first stage's errors
adapter = resid.isel(time=slice(0, 48)).sadapter.fit(rank=10)
print(adapter)                                           # effective rank, noise, fine scale, site CV

month = resid.isel(time=[60]).where(resid["lon"] < -80)  # a later month, eastern cells unobserved
filled = adapter.krige(month, level=0.9)                 # fills the fitted cells missing in `month`
print(filled["mean"].sel(lon=-61.25).values)             # filled["mean"], not filled.mean (a method)

stations = xr.Dataset(coords={"lat": ("site", [10.0, 20.0]), "lon": ("site", [-90.0, -70.0])})
print(adapter.krige(month, at=stations)[["mean", "variance"]])   # new locations
adapter.to_netcdf("adapter.nc")
adapter = xadapter.load("adapter.nc")
