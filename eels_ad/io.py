"""Reading and writing datacubes.

Microscope formats (.dm3, .dm4, .hspy, .msa, .emd) are read with RosettaSciIO; NetCDF (.nc) with
xarray (h5netcdf engine). Every reader returns a validated ``(y, x, energy)`` datacube, whatever
axis order the file stores. Writes are atomic: a temporary file in the target folder, then a
rename, so an interrupted write never leaves a half-written file under the final name.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import xarray as xr

from .datacube import DIMS, DatacubeReadError, NegativePolicy, as_datacube, axis_scale, validate

MICROSCOPE_FORMATS: dict[str, str] = {
    ".dm3": "digitalmicrograph",
    ".dm4": "digitalmicrograph",
    ".hspy": "hspy",
    ".msa": "msa",
    ".emd": "emd",
    ".zspy": "zspy",
}
NETCDF_FORMATS = (".nc", ".nc4", ".netcdf")
#: formats read lazily (chunk by chunk) with ``lazy=True``; DM files are memory-mapped by RosettaSciIO
LAZY_FORMATS: tuple[str, ...] = (".hspy", ".zspy", ".emd", ".dm3", ".dm4", *NETCDF_FORMATS)
#: default size of a lazy cube's chunk of whole rows, in MiB (counting at least 4 bytes a value)
DEFAULT_CHUNK_MB = 64
SUPPORTED_SUFFIXES: tuple[str, ...] = tuple(MICROSCOPE_FORMATS) + NETCDF_FORMATS


def load(
    path: str | os.PathLike,
    *,
    negative: NegativePolicy = "clip",
    signal_index: int | None = None,
    variable: str = "counts",
    lazy: bool = False,
    chunks: dict[str, int] | None = None,
) -> xr.DataArray:
    """Read a spectrum image into a validated datacube.

    Parameters
    ----------
    path
        A .dm3, .dm4, .hspy, .msa, .emd or NetCDF (.nc) file.
    negative
        Negative counts (dark-reference-corrected data has a few): ``"clip"`` them to 0 (default;
        the number clipped is kept in ``attrs["clipped_negative_voxels"]``), ``"raise"`` or
        ``"allow"``.
    signal_index
        For files holding several signals (some .emd and .dm4): which one. By default the first
        signal whose signal axis is in eV.
    variable
        For NetCDF files holding a Dataset: the variable to read.
    lazy
        Read lazily (a dask-backed cube) instead of into memory: .hspy, .zspy, .emd and NetCDF through
        their chunked HDF5/Zarr storage, .dm3/.dm4 memory-mapped (RosettaSciIO). Every stage of
        eels-ad then reads the cube a chunk of rows at a time, so a cube larger than memory can be
        processed; the values are checked (and negatives clipped) inside each chunk as it is read.
        .msa files (single spectra) are always read into memory.
    chunks
        Chunk sizes of a lazy cube (e.g. ``{"y": 32}``; implies ``lazy=True``). Default: whole rows
        (all columns and channels), as many as make about 64 MiB. A chunk whose two float64 copies would
        take more than 1/16 of the memory available is made smaller, and a warning says so.

    Returns
    -------
    xarray.DataArray
        Dims ``("y", "x", "energy")``; line scans and single spectra have size-1 spatial dims.
        ``attrs`` hold the source file, the title and the acquisition metadata found.

    Raises
    ------
    FileNotFoundError
        The file does not exist.
    DatacubeReadError
        Unsupported suffix, or unreadable, truncated or wrong-format file; the message names the file.

    Examples
    --------
    >>> import eels_ad
    >>> cube = eels_ad.load(eels_ad.data.sample_path())
    >>> cube.dims
    ('y', 'x', 'energy')
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such file")
    if path.is_dir() and path.suffix.lower() != ".zspy":  # a .zspy datacube is a Zarr folder
        raise DatacubeReadError(path, "is a folder; use find_datacubes() to list the datacubes in it")
    suffix = path.suffix.lower()
    lazy = lazy or chunks is not None
    if lazy and suffix not in LAZY_FORMATS:
        lazy = False  # .msa: a single spectrum, read into memory
    if suffix in NETCDF_FORMATS:
        cube = _load_netcdf(path, variable, lazy)
    elif suffix in MICROSCOPE_FORMATS:
        cube = _load_microscope_file(path, MICROSCOPE_FORMATS[suffix], signal_index, lazy)
    else:
        raise DatacubeReadError(
            path, f"unsupported file type {suffix or '(no suffix)'}; supported: {', '.join(SUPPORTED_SUFFIXES)}"
        )
    if lazy:
        cube = cube.chunk(_row_chunks(path, cube, chunks))
    try:
        return validate(cube, negative=negative)
    except (ValueError, TypeError) as error:
        raise DatacubeReadError(path, str(error)) from error


def _available_memory() -> int:
    """Bytes of memory available to this process (psutil)."""
    import psutil

    return int(psutil.virtual_memory().available)


def _row_chunks(path: Path, cube: xr.DataArray, chunks: dict[str, int] | None) -> dict[str, int]:
    """Chunks of whole rows (all columns and channels), checked against the memory available."""
    import logging

    ny, nx, ne = cube.shape
    row_bytes = nx * ne * max(cube.dtype.itemsize, 4)
    if chunks:
        unknown = set(chunks) - set(DIMS)
        if unknown:
            raise DatacubeReadError(path, f"chunks names unknown dims {sorted(unknown)}; the dims are {DIMS}")
        rows = int(chunks.get("y", ny))
        if rows < 1 or any(int(v) < 1 for v in chunks.values()):
            raise DatacubeReadError(path, f"chunk sizes must be >= 1, got {chunks}")
    else:
        rows = max(1, DEFAULT_CHUNK_MB * 2**20 // row_bytes)
    rows = min(rows, ny)
    # a stage holds up to ~10 chunk-sized float64 arrays at once (benchmarks/README.md): two float64 copies of a
    # chunk within 1/16 of the memory free keep those under a third of it
    limit = max(1, _available_memory() // 16 // (2 * row_bytes))
    if rows > limit:
        message = (f"{path}: chunks of {rows} rows ({rows * row_bytes / 2**30:.1f} GiB as float64 work arrays) "
                   f"would not fit in the memory available; using {limit} rows per chunk")
        logging.getLogger("eels_ad").warning(message)
        import warnings

        warnings.warn(message, ResourceWarning, stacklevel=3)
        rows = limit
    return {"y": rows, "x": -1, "energy": -1}


def _load_netcdf(path: Path, variable: str, lazy: bool = False) -> xr.DataArray:
    try:
        # lazy: xarray's lazily indexed variables (no dask yet): load() chunks them by rows, so that a
        # chunk of rows reads only those rows from the file
        dataset = xr.open_dataset(path, engine="h5netcdf")
        with contextlib.ExitStack() if lazy else dataset:  # a lazy cube keeps its file open
            if variable in dataset.data_vars:
                cube = dataset[variable] if lazy else dataset[variable].load()
            elif len(dataset.data_vars) == 1:
                only = next(iter(dataset.data_vars.values()))
                cube = only if lazy else only.load()
            else:
                raise DatacubeReadError(
                    path, f"has no variable {variable!r}; variables: {', '.join(map(str, dataset.data_vars))}"
                )
    except DatacubeReadError:
        raise
    except Exception as error:  # h5py/h5netcdf raise many types for broken files
        raise DatacubeReadError(path, f"cannot be read as NetCDF ({type(error).__name__}: {error})") from error
    missing = [d for d in DIMS if d not in cube.dims]
    if missing or cube.ndim != 3:
        raise DatacubeReadError(path, f"variable {cube.name!r} has dims {cube.dims}; a datacube needs {DIMS}")
    cube = cube.transpose(*DIMS)
    for key, value in dataset.attrs.items():  # provenance of the file (simulator parameters ...)
        cube.attrs.setdefault(key, value)
    cube.attrs.setdefault("units", "counts")
    cube.attrs["source_file"] = str(path)
    return cube


def _reader(format_name: str) -> Callable[..., list[dict[str, Any]]]:
    import importlib

    return importlib.import_module(f"rsciio.{format_name}").file_reader


def _load_microscope_file(path: Path, format_name: str, signal_index: int | None,
                          lazy: bool = False) -> xr.DataArray:
    import struct

    size = path.stat().st_size
    if size == 0 and not path.is_dir():
        raise DatacubeReadError(path, "is an empty file (0 bytes)")
    try:
        signals = _reader(format_name)(str(path), lazy=True) if lazy else _reader(format_name)(str(path))
    except (struct.error, EOFError) as error:  # the reader ran out of bytes
        raise DatacubeReadError(
            path, f"is truncated or not a {path.suffix.lower()} file: its {size} bytes end before the data does "
            f"({type(error).__name__}: {error})"
        ) from error
    except Exception as error:  # the readers raise anything from ValueError to KeyError on bad files
        raise DatacubeReadError(
            path, f"cannot be read as {path.suffix.lower()} ({type(error).__name__}: {error})"
        ) from error
    if not signals:
        raise DatacubeReadError(path, "holds no signal")
    if format_name == "zspy":
        _check_zarr_chunks(path)
    if signal_index is not None:
        if not 0 <= signal_index < len(signals):
            raise DatacubeReadError(path, f"signal_index {signal_index} out of range: the file holds {len(signals)}")
        chosen = signals[signal_index]
    else:
        spectral = [s for s in signals if _energy_axis_index(s["axes"]) is not None]
        if not spectral:
            names = [[a.get("name") for a in s["axes"]] for s in signals]
            raise DatacubeReadError(path, f"holds no signal with an energy axis in eV (axes: {names})")
        chosen = spectral[0]
    return signal_dict_to_cube(chosen, source=path)


def _check_zarr_chunks(path: Path) -> None:
    """Refuse a .zspy store with chunk files missing (a partial copy), naming the file and the first rows.

    Zarr reads a missing chunk as its fill value (zeros) without a word; RosettaSciIO writes every chunk
    (Zarr's ``write_empty_chunks=True``), so one that is absent was lost.
    """
    import itertools

    import zarr

    arrays: list = []
    zarr.open(str(path), mode="r").visititems(
        lambda _, item: arrays.append(item) if isinstance(item, zarr.Array) and item.ndim >= 2 else None)
    for array in arrays:
        prefix = f"{array.path}/" if array.path else ""
        separator = getattr(array, "_dimension_separator", None) or "."
        present = {key[len(prefix):] for key in array.store.keys() if key.startswith(prefix)}
        expected = [separator.join(map(str, index)) for index in itertools.product(*map(range, array.cdata_shape))]
        missing = [key for key in expected if key not in present]
        if not missing:
            continue
        first = tuple(int(i) for i in missing[0].split(separator))
        rows = f"{first[0] * array.chunks[0]}-{min(array.shape[0], (first[0] + 1) * array.chunks[0]) - 1}"
        raise DatacubeReadError(path, f"{len(missing)} of {len(expected)} chunks of '{array.path}' are missing from "
                                f"the Zarr store (a partial copy?): they would read as zeros; the first is chunk "
                                f"{first}, rows {rows} of its first axis")


def _energy_axis_index(axes: list[dict[str, Any]]) -> int | None:
    """Index of the energy-loss axis: the one in eV, else the only non-navigation axis."""
    for index, axis in enumerate(axes):
        if str(axis.get("units", "")).strip() == "eV":
            return index
    signal_axes = [i for i, a in enumerate(axes) if not a.get("navigate", True)]
    if len(signal_axes) == 1 and "energy" in str(axes[signal_axes[0]].get("name", "")).lower():
        return signal_axes[0]
    return None


def signal_dict_to_cube(signal: dict[str, Any], source: str | os.PathLike | None = None) -> xr.DataArray:
    """Turn a RosettaSciIO signal dictionary into a datacube.

    The energy axis is found by its units (eV), not by the ``navigate`` flags, which some DM
    spectrum images get wrong (energy first and flagged as navigation); it is moved last.
    """
    data = signal["data"] if hasattr(signal["data"], "dask") else np.asarray(signal["data"])  # lazy stays lazy
    axes = list(signal["axes"])
    where = f"{source}: " if source else ""
    if data.ndim != len(axes):
        raise ValueError(f"{where}data has {data.ndim} dims but {len(axes)} axes are described")
    energy_index = _energy_axis_index(axes)
    if energy_index is None:
        raise ValueError(f"{where}no energy axis in eV among {[a.get('name') for a in axes]}")
    if data.ndim > 3:
        raise ValueError(f"{where}a datacube has at most 2 spatial dims; this signal has shape {data.shape}")
    energy_axis = axes[energy_index]
    spatial = [a for i, a in enumerate(axes) if i != energy_index]
    data = np.moveaxis(data, energy_index, -1)
    energy = float(energy_axis.get("offset", 0.0)) + float(energy_axis.get("scale", 1.0)) * np.arange(data.shape[-1])
    spatial_coords: dict[str, np.ndarray | None] = {"y": None, "x": None}
    units = "px"
    if len(spatial) == 2:
        names = ("y", "x")
    elif len(spatial) == 1:
        names = ("x",)
    else:
        names = ()
    for name, axis in zip(names, spatial, strict=True):
        size = int(axis["size"])
        spatial_coords[name] = float(axis.get("offset", 0.0)) + float(axis.get("scale", 1.0)) * np.arange(size)
        axis_units = str(axis.get("units", "") or "")
        units = axis_units if axis_units and axis_units != "<undefined>" else units
    if units == "px":
        spatial_coords = {k: None for k in spatial_coords}
    attrs = _acquisition_attrs(signal.get("metadata", {}))
    if source is not None:
        attrs["source_file"] = str(source)
    return as_datacube(
        data, energy, y=spatial_coords["y"], x=spatial_coords["x"], spatial_units=units,
        attrs=attrs, negative="allow",
    )


_METADATA_KEYS = {
    ("General", "title"): "title",
    ("Acquisition_instrument", "TEM", "beam_energy"): "beam_energy_keV",
    ("Acquisition_instrument", "TEM", "convergence_angle"): "convergence_angle_mrad",
    ("Acquisition_instrument", "TEM", "Detector", "EELS", "collection_angle"): "collection_angle_mrad",
    ("Acquisition_instrument", "TEM", "Detector", "EELS", "dwell_time"): "dwell_time_s",
    ("Acquisition_instrument", "TEM", "Detector", "EELS", "exposure"): "exposure_s",
    ("Acquisition_instrument", "TEM", "Detector", "EELS", "aperture_size"): "aperture_size_mm",
    ("Acquisition_instrument", "TEM", "Detector", "EELS", "spectrometer"): "spectrometer",
    ("Acquisition_instrument", "TEM", "microscope"): "microscope",
    ("Acquisition_instrument", "TEM", "magnification"): "magnification",
}


def _acquisition_attrs(metadata: dict[str, Any]) -> dict[str, Any]:
    """Pick the acquisition metadata a microscopist needs, as NetCDF-friendly attrs."""
    attrs: dict[str, Any] = {}
    for keys, name in _METADATA_KEYS.items():
        node: Any = metadata
        for key in keys:
            node = node.get(key) if isinstance(node, dict) else None
        if isinstance(node, (str, int, float, np.number)) and not isinstance(node, bool):
            attrs[name] = node.item() if isinstance(node, np.number) else node
    return attrs


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, *, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it to ``path`` only if the block succeeds.

    Raises
    ------
    FileExistsError
        ``path`` exists and ``overwrite`` is False.
    """
    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(f"{path} is a folder, not a file name")
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} exists; pass overwrite=True (--overwrite on the command line) to replace it")
    if not path.parent.is_dir():
        raise FileNotFoundError(f"{path}: the folder {path.parent} does not exist; create it first")
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(handle)
    temporary_path = Path(temporary)
    try:
        yield temporary_path
        os.chmod(temporary_path, 0o666 & ~_current_umask())
        if path.exists() and not overwrite:
            raise FileExistsError(f"{path} appeared while writing; pass overwrite=True to replace it")
        os.replace(temporary_path, path)
    finally:
        temporary_path.unlink(missing_ok=True)


def _current_umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def save(obj: xr.DataArray | xr.Dataset, path: str | os.PathLike, *, overwrite: bool = False,
         compress: bool = True) -> Path:
    """Write a datacube or a result Dataset to NetCDF, atomically.

    Parameters
    ----------
    obj
        A datacube, a score map or a Dataset of results.
    path
        Target file (``.nc``).
    overwrite
        Replace an existing file (default: refuse with :class:`FileExistsError`).
    compress
        zlib-compress the variables (lossless).

    Returns
    -------
    pathlib.Path
        The written path.
    """
    path = Path(path)
    if path.suffix.lower() not in NETCDF_FORMATS:
        raise ValueError(f"{path}: save writes NetCDF; use a .nc suffix")
    dataset = obj.to_dataset(name=obj.name or "counts") if isinstance(obj, xr.DataArray) else obj
    dataset = dataset.copy()
    dataset.attrs = _netcdf_attrs(dataset.attrs)
    for name in dataset.variables:
        dataset[name].attrs = _netcdf_attrs(dataset[name].attrs)
    encoding = {}
    for name in list(dataset.variables):  # variables and coordinates (masks such as 'vacuum')
        variable = dataset[name]
        if variable.dtype == bool:
            attrs = {**variable.attrs, "dtype": "bool"}
            dataset[name] = variable.astype("u1")
            dataset[name].attrs = attrs
        if compress and variable.ndim > 0:
            encoding[name] = {"zlib": True, "complevel": 4}
    with atomic_path(path, overwrite=overwrite) as temporary:
        dataset.to_netcdf(temporary, engine="h5netcdf", encoding=encoding)
    return path


def _netcdf_attrs(attrs: dict[str, Any]) -> dict[str, Any]:
    """NetCDF stores strings, numbers and lists of them: convert the rest or drop it."""
    clean: dict[str, Any] = {}
    for key, value in attrs.items():
        if isinstance(value, bool | np.bool_):
            clean[key] = int(value)
        elif isinstance(value, str | int | float | np.number):
            clean[key] = value
        elif isinstance(value, list | tuple | np.ndarray) and len(value) and all(
            isinstance(v, int | float | np.number) and not isinstance(v, bool) for v in value
        ):
            clean[key] = np.asarray(value)
        elif value is None:
            continue
        else:
            clean[key] = str(value)
    return clean


def open_results(path: str | os.PathLike) -> xr.Dataset:
    """Read a Dataset written by :func:`save` (bool variables restored)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such file")
    try:
        with xr.open_dataset(path, engine="h5netcdf") as dataset:
            dataset = dataset.load()
    except Exception as error:
        raise DatacubeReadError(path, f"cannot be read as NetCDF ({type(error).__name__}: {error})") from error
    for name in list(dataset.variables):
        variable = dataset[name]
        if variable.attrs.get("dtype") == "bool":
            attrs = {k: v for k, v in variable.attrs.items() if k != "dtype"}
            dataset[name] = variable.astype(bool)
            dataset[name].attrs = attrs
    return dataset


def find_datacubes(folder: str | os.PathLike, pattern: str = "*", *, recursive: bool = False) -> list[Path]:
    """List the datacube files of a folder, sorted.

    Parameters
    ----------
    folder
        The folder to search.
    pattern
        Glob pattern on file names (e.g. ``"*.dm4"``).
    recursive
        Also search sub-folders.

    Returns
    -------
    list of pathlib.Path
        Files with a supported suffix (:data:`SUPPORTED_SUFFIXES`); hidden and temporary files
        (names starting with ".") are left out.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise NotADirectoryError(f"{folder}: not a folder")
    candidates = folder.rglob(pattern) if recursive else folder.glob(pattern)
    return sorted(
        p for p in candidates
        if (p.is_file() or (p.is_dir() and p.suffix.lower() == ".zspy"))
        and p.suffix.lower() in SUPPORTED_SUFFIXES and not p.name.startswith(".")
    )


def to_hyperspy(cube: xr.DataArray):
    """Convert a datacube to an exspy ``EELSSpectrum`` with calibrated axes and metadata.

    Returns
    -------
    exspy.signals.EELSSpectrum
        Navigation (x, y), signal energy; beam energy, collection and convergence angles are set
        in ``metadata`` when the cube's attrs carry them.
    """
    with warnings.catch_warnings():  # HyperSpy 2.x warns about its own deprecated imports
        warnings.simplefilter("ignore")
        import exspy  # noqa: F401  (registers the EELS signal type)
        import hyperspy.api as hs

    cube = validate(cube, negative="allow")
    signal = hs.signals.Signal1D(np.asarray(cube.values))
    signal.set_signal_type("EELS")
    offset, dispersion, _ = axis_scale(cube["energy"].values)
    energy = signal.axes_manager.signal_axes[0]
    energy.name, energy.units, energy.offset = "Energy loss", "eV", offset
    energy.scale = dispersion if np.isfinite(dispersion) else 1.0
    units = cube["x"].attrs.get("units", "px")
    for axis, dim in zip(signal.axes_manager.navigation_axes, ("x", "y"), strict=False):
        start, step, _ = axis_scale(cube[dim].values)
        axis.name, axis.offset, axis.scale = dim, start, step if np.isfinite(step) else 1.0
        axis.units = units if units != "px" else "<undefined>"
    signal.metadata.General.title = str(cube.attrs.get("title", cube.name or "datacube"))
    tem = "Acquisition_instrument.TEM."
    for attr, node in (
        ("beam_energy_keV", tem + "beam_energy"),
        ("convergence_angle_mrad", tem + "convergence_angle"),
        ("collection_angle_mrad", tem + "Detector.EELS.collection_angle"),
        ("dwell_time_s", tem + "Detector.EELS.dwell_time"),
    ):
        if attr in cube.attrs:
            signal.metadata.set_item(node, float(cube.attrs[attr]))
    return signal


def from_hyperspy(signal, *, negative: NegativePolicy = "clip") -> xr.DataArray:
    """Convert a HyperSpy/exspy 1-D signal (EELS spectrum, line scan or spectrum image) to a datacube."""
    if signal.axes_manager.signal_dimension != 1:
        raise ValueError(
            f"from_hyperspy needs a 1-D signal (spectra), got signal dimension {signal.axes_manager.signal_dimension}"
        )
    in_array_order = sorted(signal.axes_manager._axes, key=lambda axis: axis.index_in_array)
    axes = [axis.get_axis_dictionary() for axis in in_array_order]
    for axis in axes:
        axis["navigate"] = axis.get("navigate", True)
        if not axis["navigate"]:
            axis["units"] = "eV" if str(axis.get("units", "eV")) in ("eV", "<undefined>") else axis["units"]
    metadata = signal.metadata.as_dictionary()
    cube = signal_dict_to_cube({"data": np.asarray(signal.data), "axes": axes, "metadata": metadata})
    return validate(cube, negative=negative)
