"""The datacube convention: an EELS spectrum image as a labelled :class:`xarray.DataArray`.

A datacube has dims ``("y", "x", "energy")``; ``energy`` is a strictly increasing, uniform
coordinate in eV; ``attrs["units"]`` is ``"counts"``. Line scans and single spectra are cubes with
size-1 spatial dims, so every function in eels-ad sees one shape of data.

A lazy (dask-backed) cube is read a chunk of rows at a time: :func:`iter_spectra` yields its spectra in
work blocks (two chunks held, the next one read while this one is worked on), and :func:`fold_rows`
combines a function's results over the blocks, here or, while a dask.distributed client is current,
over the cluster's workers (one task per chunk of rows).
"""

from __future__ import annotations

import functools
import operator
import os
import sys
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import xarray as xr

from ._threads import cores

DIMS: tuple[str, str, str] = ("y", "x", "energy")
"""The dims of every datacube, in this order."""

ENERGY_UNIT_TOLERANCE = 1e-3
"""Largest allowed spread of the energy steps, relative to the mean step (dispersion)."""

NegativePolicy = Literal["raise", "clip", "allow"]


def as_datacube(
    counts: np.ndarray | Sequence,
    energy: np.ndarray | Sequence | None = None,
    *,
    energy_offset: float | None = None,
    dispersion: float | None = None,
    y: np.ndarray | Sequence | None = None,
    x: np.ndarray | Sequence | None = None,
    spatial_units: str = "px",
    attrs: Mapping[str, Any] | None = None,
    negative: NegativePolicy = "clip",
    name: str = "counts",
) -> xr.DataArray:
    """Build a validated datacube from a numpy array of counts.

    Parameters
    ----------
    counts
        Array of shape ``(y, x, energy)``. A 1-D array is taken as a single spectrum and a 2-D
        array as a line scan ``(x, energy)``; both get size-1 spatial dims.
    energy
        Energy-loss of each channel in eV (strictly increasing, uniform). Alternatively give
        ``energy_offset`` and ``dispersion``.
    energy_offset, dispersion
        Energy of the first channel and eV per channel, used when ``energy`` is not given.
    y, x
        Spatial coordinates (default: pixel indices).
    spatial_units
        Units of ``y`` and ``x`` (``"px"`` for indices, ``"nm"`` when calibrated).
    attrs
        Acquisition metadata to keep (beam energy, dwell time, source file ...).
    negative
        What to do with negative counts (dark-reference-corrected data has some): ``"clip"`` them to
        zero (default; the number is kept in ``attrs["clipped_negative_voxels"]``), ``"raise"`` or
        ``"allow"`` them. The same default holds at every entry point (``load``, ``validate``, the
        detectors, ``compare_regions``, ``denoise_cube``).
    name
        Name of the DataArray.

    Returns
    -------
    xarray.DataArray
        The validated datacube with dims ``("y", "x", "energy")``.

    Examples
    --------
    >>> import numpy as np
    >>> cube = as_datacube(np.ones((2, 3, 4)), energy_offset=700.0, dispersion=0.25)
    >>> cube.dims, float(cube.energy[-1])
    (('y', 'x', 'energy'), 700.75)
    """
    array = counts if hasattr(counts, "dask") else np.asarray(counts)  # a dask array stays lazy
    if array.ndim == 1:
        array = array[np.newaxis, np.newaxis, :]
    elif array.ndim == 2:
        array = array[np.newaxis, :, :]
    elif array.ndim != 3:
        raise ValueError(
            f"counts must have 1 (spectrum), 2 (line scan) or 3 (y, x, energy) dims, got shape {array.shape}"
        )
    n_channels = array.shape[2]
    if energy is None:
        if energy_offset is None or dispersion is None:
            raise ValueError("give either `energy` or both `energy_offset` and `dispersion` (eV)")
        if not dispersion > 0:
            raise ValueError(f"dispersion must be > 0 eV per channel, got {dispersion}")
        energy = energy_offset + dispersion * np.arange(n_channels)
    energy = np.asarray(energy, dtype=float)
    if energy.shape != (n_channels,):
        raise ValueError(
            f"energy has {energy.size} values but counts has {n_channels} channels (last axis)"
        )
    coords: dict[str, Any] = {"energy": ("energy", energy, {"units": "eV", "long_name": "energy loss"})}
    for dim, values, size in (("y", y, array.shape[0]), ("x", x, array.shape[1])):
        values = np.arange(size) if values is None else np.asarray(values)
        if values.shape != (size,):
            raise ValueError(f"{dim} has {values.size} values but counts has {size} along {dim}")
        coords[dim] = (dim, values, {"units": spatial_units})
    cube_attrs = {"units": "counts", "long_name": "electron counts"}
    cube_attrs.update(attrs or {})
    cube = xr.DataArray(array, dims=DIMS, coords=coords, attrs=cube_attrs, name=name)
    return validate(cube, negative=negative)


def validate(cube: xr.DataArray, *, negative: NegativePolicy = "clip") -> xr.DataArray:
    """Check that ``cube`` follows the datacube convention and return it.

    Parameters
    ----------
    cube
        The spectrum image to check.
    negative
        ``"clip"`` negative counts to zero (default, the one policy of every entry point: the count
        of clipped voxels is kept in ``attrs["clipped_negative_voxels"]``), ``"raise"`` on them or
        ``"allow"`` them.

    Returns
    -------
    xarray.DataArray
        ``cube`` itself, or a clipped copy when ``negative="clip"`` and there were negatives.

    Raises
    ------
    TypeError
        Not a DataArray, or not a numeric dtype.
    ValueError
        Wrong dims, an empty axis, non-finite values, an energy axis that is missing, not strictly
        increasing or not uniform, or negative counts (with ``negative="raise"``).
    """
    if not isinstance(cube, xr.DataArray):
        raise TypeError(f"a datacube must be an xarray.DataArray, got {type(cube).__name__}")
    if tuple(cube.dims) != DIMS:
        raise ValueError(
            f"a datacube must have dims {DIMS} in this order, got {tuple(cube.dims)}; "
            "use cube.transpose('y', 'x', 'energy') or as_datacube()"
        )
    for dim, size in zip(DIMS, cube.shape, strict=True):
        if size == 0:
            raise ValueError(f"the {dim!r} axis of the datacube is empty")
    if not (np.issubdtype(cube.dtype, np.number) and not np.issubdtype(cube.dtype, np.complexfloating)):
        raise TypeError(f"datacube values must be real numbers, got dtype {cube.dtype}")
    if "energy" not in cube.coords:
        raise ValueError("the datacube has no 'energy' coordinate (eV)")
    energy = np.asarray(cube["energy"].values, dtype=float)
    if not np.all(np.isfinite(energy)):
        raise ValueError("the energy axis has non-finite values")
    if energy.size > 1:
        steps = np.diff(energy)
        if np.any(steps <= 0):
            bad = int(np.argmax(steps <= 0))
            raise ValueError(
                f"the energy axis must be strictly increasing; channel {bad + 1} "
                f"({energy[bad + 1]:.4f} eV) does not exceed channel {bad} ({energy[bad]:.4f} eV)"
                + ("; the axis runs backwards: use cube.sortby('energy')" if np.all(steps < 0) else
                   "; sort it with cube.sortby('energy') and drop repeated channels")
            )
        mean_step = (energy[-1] - energy[0]) / (energy.size - 1)
        spread = float(np.max(np.abs(steps - mean_step)))
        if spread > ENERGY_UNIT_TOLERANCE * mean_step:
            raise ValueError(
                f"the energy axis must be uniform: steps range from {steps.min():.6g} to "
                f"{steps.max():.6g} eV; resample it onto a uniform grid first"
            )
    if negative not in ("raise", "clip", "allow"):
        raise ValueError(f"negative must be 'raise', 'clip' or 'allow', got {negative!r}")
    if cube.chunks is not None:  # dask-backed: the values are checked inside the chunks as they are read
        return _checked_lazily(cube, negative)
    if np.issubdtype(cube.dtype, np.floating):
        n_bad = int(np.sum(~np.isfinite(cube.values)))
        if n_bad:
            where = np.argwhere(~np.isfinite(np.asarray(cube.values)))[0]
            raise ValueError(
                f"the datacube has {n_bad} non-finite values (NaN or inf), the first at "
                f"y={where[0]}, x={where[1]}, energy index {where[2]}"
            )
    if negative != "allow":
        n_negative = int(np.count_nonzero(cube.values < 0))
        if n_negative:
            if negative == "raise":
                raise ValueError(
                    f"the datacube has {n_negative} negative counts (minimum {float(cube.min()):.4g}); "
                    "dark-reference-corrected data has some: pass negative='clip' to set them to 0"
                )
            attrs = dict(cube.attrs)
            cube = cube.clip(min=0)
            cube.attrs = attrs
            cube.attrs["clipped_negative_voxels"] = n_negative + int(attrs.get("clipped_negative_voxels", 0))
    return cube


#: name prefix of the dask layer that checks a lazy cube's values as its chunks are read
CHECKED_LAYER = "eels-ad-checked-"


class DatacubeReadError(ValueError):
    """A file (or a region of it) could not be read as a datacube; the message names the file and the reason."""

    def __init__(self, path: str | os.PathLike, reason: str) -> None:
        self.path = Path(path)
        self.reason = reason
        super().__init__(f"{self.path}: {reason}")


def _check_block(block: np.ndarray, *, negative: str, source: str, block_info=None) -> np.ndarray:
    """Check (and clip) one chunk of a lazy cube; errors name the file and the voxel."""
    start = [lo for lo, _ in block_info[0]["array-location"]] if block_info else [0, 0, 0]
    where = f"{source}: " if source else ""
    if np.issubdtype(block.dtype, np.floating):
        bad = ~np.isfinite(block)
        if bad.any():
            first = np.argwhere(bad)[0] + start
            raise ValueError(f"{where}the datacube has non-finite values (NaN or inf) in the chunk read, the first "
                             f"at y={first[0]}, x={first[1]}, energy index {first[2]}")
    if negative != "allow" and block.size and block.min() < 0:
        if negative == "raise":
            first = np.argwhere(block < 0)[0] + start
            raise ValueError(f"{where}the datacube has negative counts, the first at y={first[0]}, x={first[1]}, "
                             f"energy index {first[2]}; pass negative='clip' to set them to 0")
        return np.maximum(block, 0)
    return block


def _checked_lazily(cube: xr.DataArray, negative: str) -> xr.DataArray:
    """Wrap a dask-backed cube so that each chunk is checked (and clipped) when, and only when, it is read.

    No pass over the data here: validating a lazy cube costs nothing until its chunks are read, and a
    cube validated once is not wrapped again (so the entry points can all call :func:`validate`).
    """
    data = cube.data
    name = str(getattr(data, "name", ""))
    if name.startswith(CHECKED_LAYER + negative + "-") or (negative == "allow" and name.startswith(CHECKED_LAYER)):
        return cube
    import dask
    import dask.array as da

    token = dask.base.tokenize(data, negative)
    checked = da.map_blocks(_check_block, data, dtype=data.dtype, negative=negative,
                            source=str(cube.attrs.get("source_file", "")),
                            name=f"{CHECKED_LAYER}{negative}-{token}")
    out = cube.copy(data=checked)
    out.attrs = dict(cube.attrs)
    if negative == "clip":
        out.attrs["negative_counts"] = "clipped to 0 chunk by chunk as read (lazy cube: not counted)"
    return out


def is_lazy(cube: xr.DataArray) -> bool:
    """Whether the cube is dask-backed (read chunk by chunk) rather than in memory."""
    return cube.chunks is not None


def row_blocks(cube: xr.DataArray, max_pixels: int) -> Iterator[slice]:
    """Row slices of at most ``max_pixels`` pixels (at least one row), aligned to the cube's chunks when lazy."""
    ny, nx = cube.sizes["y"], cube.sizes["x"]
    rows = max(1, max_pixels // max(nx, 1))
    if cube.chunks is not None:  # whole chunks per block: no chunk is read twice
        chunk_rows = int(cube.chunks[0][0])
        rows = max(chunk_rows, (rows // chunk_rows) * chunk_rows)
    for start in range(0, ny, rows):
        yield slice(start, min(start + rows, ny))


def read_blocks(cube: xr.DataArray, blocks: Iterable[slice], dtype: Any = None) -> Iterator[tuple[slice, np.ndarray]]:
    """(rows, values) of each block of rows in turn (:func:`read_rows`); for a lazy cube the next block is
    read (decompressed) in a thread while the caller works on this one, so reading and computing overlap
    (:func:`compute_cores` says how many cores that work has meanwhile). At most two blocks are held."""
    blocks = list(blocks)
    if not is_lazy(cube) or len(blocks) < 2:
        for block in blocks:
            yield block, read_rows(cube, block, dtype)
        return
    from concurrent.futures import ThreadPoolExecutor

    def submit(block: slice) -> Any:
        future = pool.submit(read_rows, cube, block, dtype)
        _READS_IN_FLIGHT.add(future)
        future.add_done_callback(_READS_IN_FLIGHT.discard)
        return future

    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="eels-ad-read") as pool:
        pending = submit(blocks[0])
        for index, block in enumerate(blocks):
            values = pending.result()
            if index + 1 < len(blocks):
                pending = submit(blocks[index + 1])
            yield block, values


#: the chunk reads running in :func:`read_blocks`' threads (each leaves when it is done)
_READS_IN_FLIGHT: set = set()


def compute_cores() -> int:
    """The cores that work on spectra may use now: all of the process's, one fewer while a chunk is being read
    (decompressed) beside it (:func:`read_blocks`), at least one."""
    return max(1, cores() - (1 if any(not read.done() for read in list(_READS_IN_FLIGHT)) else 0))


def iter_spectra(cube: xr.DataArray, work_pixels: int, *, rows_wanted: np.ndarray | None = None,
                 dtype: Any = np.float64) -> Iterator[tuple[slice, np.ndarray]]:
    """(rows, spectra) of whole rows of about ``work_pixels`` pixels in turn, spectra (pixels, channels) of ``dtype``.

    A lazy cube is read one chunk of rows at a time in its stored type, the next chunk in a thread while
    this one is worked on (:func:`read_blocks`), and converted one work block at a time: what is held is
    two stored chunks and one work block, whatever the chunk's size. With ``rows_wanted`` (bool per row)
    only the work blocks that hold a wanted row are yielded, and only the chunks that hold them read.
    Spectra of an in-memory cube of ``dtype`` are views of it: do not write into them.

    Examples
    --------
    >>> import eels_ad
    >>> from eels_ad.datacube import iter_spectra
    >>> cube = eels_ad.simulate_fe_l23((8, 4), seed=0)["counts"]
    >>> [(rows.start, spectra.shape[0]) for rows, spectra in iter_spectra(cube, 12)]
    [(0, 12), (3, 12), (6, 8)]
    """
    cube = cube.transpose("y", "x", "energy")
    reads = [block for block in row_blocks(cube, work_pixels) if rows_wanted is None or rows_wanted[block].any()]
    copy = True if is_lazy(cube) else None  # a work block never keeps a read chunk alive
    for block, values in read_blocks(cube, reads):
        yield from _work_blocks(values, block.start, work_pixels, rows_wanted, dtype, copy)
        del values  # before the chunk after next is read: two chunks held, not three


def _work_blocks(values: np.ndarray, first_row: int, work_pixels: int, rows_wanted: np.ndarray | None, dtype: Any,
                 copy: bool | None) -> Iterator[tuple[slice, np.ndarray]]:
    """(rows, spectra) of the work blocks of ``values``, the (rows, x, energy) values from row ``first_row`` on."""
    n_rows, nx, ne = values.shape
    step = max(1, int(work_pixels) // max(nx, 1))
    for start in range(0, n_rows, step):
        rows = slice(first_row + start, first_row + min(start + step, n_rows))
        if rows_wanted is None or rows_wanted[rows].any():
            yield rows, np.array(values[start:start + step], dtype=dtype, copy=copy).reshape(-1, ne)


def cluster_client() -> Any:
    """The dask.distributed ``Client`` that chunk work on lazy cubes goes to, or None.

    The current default client (``with Client(address):`` or ``Client(address)`` in a notebook), unless
    this process is itself a dask worker (a job on a worker reads its chunks where it runs).
    """
    if "distributed" not in sys.modules:  # no client can exist before distributed is imported
        return None
    import distributed

    try:
        distributed.get_worker()
        return None
    except ValueError:
        pass
    try:
        return distributed.default_client()
    except ValueError:
        return None


def fold_rows(cube: xr.DataArray, func: Any, combine: Any, *, work_pixels: int,
              rows_wanted: np.ndarray | None = None, row_data: np.ndarray | None = None,
              dtype: Any = np.float64, accumulate: Any = None) -> Any:
    """``combine`` of ``func(rows, spectra, row_data[rows])`` over the cube's work blocks (:func:`iter_spectra`).

    ``combine(a, b)`` must be associative, ``a`` coming from rows above ``b`` (e.g. sums of moments,
    lists of per-block results): it is applied in row order. Locally the blocks are worked on one after
    another (two chunks held). A lazy cube while a dask.distributed client is current
    (:func:`cluster_client`) is split over the cluster instead: one task per chunk of rows reads the chunk
    on a worker and folds its work blocks there, and the chunks' results are combined pairwise on the
    workers, so that only the final result comes back. ``func`` and ``row_data`` travel with the tasks.
    ``accumulate(total, part)``, an in-place form of ``combine`` that returns ``total``, serves the local
    fold (a sum of large matrices held once, not twice); the cluster's combines never write into their
    inputs (a task run again after a worker died would count a part twice). Returns None where no block
    is wanted.
    """
    cube = cube.transpose("y", "x", "energy")
    client = cluster_client() if is_lazy(cube) else None
    if client is None:
        result = None
        add = combine if accumulate is None else accumulate
        with _cores_beside_reader(is_lazy(cube)):
            for rows, spectra in iter_spectra(cube, work_pixels, rows_wanted=rows_wanted, dtype=dtype):
                part = func(rows, spectra, None if row_data is None else row_data[rows])
                result = part if result is None else add(result, part)
                del part
        return result
    import dask

    edges = np.cumsum((0, *cube.chunks[0]))
    chunks = cube.data.to_delayed(optimize_graph=True)[:, 0, 0]
    parts = []
    for chunk, start, stop in zip(chunks, edges[:-1], edges[1:], strict=True):
        wanted = None if rows_wanted is None else rows_wanted[start:stop]
        if wanted is not None and not wanted.any():
            continue
        parts.append(dask.delayed(_fold_chunk, pure=True)(
            chunk, int(start), func, combine, int(work_pixels), wanted,
            None if row_data is None else row_data[start:stop], dtype))
    if not parts:
        return None
    while len(parts) > 1:  # a tree of combines on the workers, in row order
        pairs = [dask.delayed(combine, pure=True)(a, b) for a, b in zip(parts[0::2], parts[1::2], strict=False)]
        parts = pairs + parts[2 * len(pairs):]
    return cluster_compute(client, parts[0], cube)


def cluster_compute(client: Any, tasks: Any, cube: xr.DataArray) -> Any:
    """``tasks`` (dask objects that read the lazy ``cube``) computed on the cluster, their results back; a chunk
    that cannot be read is a :class:`DatacubeReadError` naming the file and its rows."""
    try:
        return client.compute(tasks, sync=True)
    except (OSError, RuntimeError, KeyError, EOFError) as error:
        start, stop = _failing_chunk(cube, slice(0, cube.sizes["y"]))
        source = cube.attrs.get("source_file", "the lazy datacube")
        raise DatacubeReadError(
            source, f"rows {start}-{stop - 1} (of {cube.sizes['y']}) cannot be read on the cluster: the file is "
            f"truncated or damaged there ({type(error).__name__}: {error})") from error


def map_rows(cube: xr.DataArray, func: Any, *, work_pixels: int, row_data: np.ndarray | None = None,
             rows_wanted: np.ndarray | None = None) -> list[tuple[slice, Any]]:
    """``(rows, func(rows, spectra, row_data[rows]))`` for every work block, in row order.

    A :func:`fold_rows` whose results are kept per block (per-pixel maps): locally a chunk of rows at a
    time, over the cluster where a dask.distributed client is current (one task per chunk of rows, the
    blocks' results sent back). ``row_data`` (rows first) is what each block needs of the pixels' own
    values (e.g. a drift map): it travels with the tasks, a chunk's rows each.
    """
    parts = fold_rows(cube, functools.partial(_paired, func), operator.add, work_pixels=work_pixels,
                      rows_wanted=rows_wanted, row_data=row_data, accumulate=_extended)
    return [] if parts is None else parts


def _paired(func: Any, rows: slice, spectra: np.ndarray, data: Any) -> list[tuple[slice, Any]]:
    return [(rows, func(rows, spectra, data))]


def _extended(total: list, part: list) -> list:
    total.extend(part)
    return total


def _cores_beside_reader(reading: bool) -> Any:
    """A context in which BLAS leaves one core to the thread that reads (decompresses) the next chunk.

    Measured on 2 cores (a 256 x 256 x 1024 compressed NetCDF): a robust PCA fit and score in 6.9 s with
    one BLAS thread against 8.3 s with two, which fought the reader for the cores. (Work that splits itself
    over threads while no read is in flight, :func:`compute_cores`, does so with Python threads: BLAS's own
    threads spin for a while after each call and slow down what follows.)
    """
    import contextlib

    if not reading:
        return contextlib.nullcontext()
    from threadpoolctl import threadpool_info

    current = max((pool["num_threads"] for pool in threadpool_info() if pool.get("user_api") == "blas"), default=1)
    return _BlasBesideReader(max(1, min(current, cores() - 1)))


class _BlasBesideReader:
    """threadpoolctl's limit on BLAS's threads beside the chunk reader, noted for :func:`work_parts`."""

    def __init__(self, threads: int) -> None:
        self.threads = threads

    def __enter__(self) -> _BlasBesideReader:
        from threadpoolctl import threadpool_limits

        global _BLAS_BESIDE_READER
        self.limits = threadpool_limits(self.threads, user_api="blas")
        self.before, _BLAS_BESIDE_READER = _BLAS_BESIDE_READER, self.threads
        return self

    def __exit__(self, *exc: object) -> None:
        global _BLAS_BESIDE_READER
        _BLAS_BESIDE_READER = self.before
        self.limits.restore_original_limits()


#: BLAS's threads while a fold reads beside its work (:func:`_cores_beside_reader`), else None
_BLAS_BESIDE_READER: int | None = None


def work_parts() -> int:
    """Into how many parts, each in a Python thread, BLAS-heavy work of a fold may split now: inside a fold over a
    lazy cube (BLAS limited to leave the chunk reader a core), as many as the cores not reading hold BLAS's
    threads, e.g. 2 on 2 cores while the reader has nothing in flight (the last chunk's work, or work that
    outruns the reads); 1 elsewhere (BLAS has every core)."""
    if _BLAS_BESIDE_READER is None:
        return 1
    return max(1, compute_cores() // _BLAS_BESIDE_READER)


def _fold_chunk(values: np.ndarray, first_row: int, func: Any, combine: Any, work_pixels: int,
                rows_wanted: np.ndarray | None, row_data: np.ndarray | None, dtype: Any) -> Any:
    """:func:`fold_rows` of one chunk of rows (a task on a worker); ``rows_wanted`` and ``row_data`` are the chunk's."""
    wanted = None
    if rows_wanted is not None:  # indexed by the cube's rows in _work_blocks
        wanted = np.zeros(first_row + values.shape[0], dtype=bool)
        wanted[first_row:] = rows_wanted
    result = None
    for rows, spectra in _work_blocks(values, first_row, work_pixels, wanted, dtype, None):
        local = slice(rows.start - first_row, rows.stop - first_row)
        part = func(rows, spectra, None if row_data is None else row_data[local])
        result = part if result is None else combine(result, part)
    return result


def read_rows(cube: xr.DataArray, rows: slice, dtype: Any = None) -> np.ndarray:
    """The values of rows ``rows`` as a numpy array (read from the file for a lazy cube).

    Raises
    ------
    DatacubeReadError
        The region could not be read (a truncated or damaged file): the message names the file and
        the rows, so a batch run reports it and goes on.
    """
    try:
        values = _chunk_values(cube.isel(y=rows).data) if is_lazy(cube) else cube.isel(y=rows).values
    except (OSError, RuntimeError, KeyError, EOFError) as error:  # h5py / zarr / memmap read failures
        start, stop = _failing_chunk(cube, rows)
        source = cube.attrs.get("source_file", "the lazy datacube")
        raise DatacubeReadError(
            source, f"rows {start}-{stop - 1} (of {cube.sizes['y']}) cannot be read: the file is "
            f"truncated or damaged there ({type(error).__name__}: {error})") from error
    return np.asarray(values, dtype=dtype)


def _chunk_values(data: Any) -> np.ndarray:
    """The values of a dask array; one chunk is read here (synchronously) without ``compute``'s final copy,
    which would hold it twice."""
    import dask
    from dask.core import flatten

    keys = list(flatten(data.__dask_keys__()))
    if len(keys) != 1:
        return np.asarray(data)
    return np.asarray(dask.get(data.__dask_optimize__(data.__dask_graph__(), keys), keys[0]))


def _failing_chunk(cube: xr.DataArray, rows: slice) -> tuple[int, int]:
    """The first chunk of rows within ``rows`` that cannot be read (``rows`` itself if none is found)."""
    if cube.chunks is None:
        return rows.start, rows.stop
    edges = np.cumsum((0, *cube.chunks[0]))
    for start, stop in zip(edges[:-1], edges[1:], strict=True):
        if stop <= rows.start or start >= rows.stop:
            continue
        try:
            cube.isel(y=slice(int(start), int(stop))).compute()
        except (OSError, RuntimeError, KeyError, EOFError):
            return int(start), int(stop)
    return rows.start, rows.stop


def axis_scale(values: np.ndarray | Sequence[float]) -> tuple[float, float, int]:
    """``(offset, step, size)`` of a uniform coordinate; the step is NaN for a single value."""
    values = np.asarray(values, dtype=float)
    step = float((values[-1] - values[0]) / (values.size - 1)) if values.size > 1 else float("nan")
    return float(values[0]), step, int(values.size)


def energy_axis(cube: xr.DataArray) -> tuple[float, float, int]:
    """Return ``(offset, dispersion, size)`` of the energy axis in eV."""
    return axis_scale(cube["energy"].values)


@xr.register_dataarray_accessor("eels")
class EELSAccessor:
    """Everyday operations on a datacube: ``cube.eels.<method>``.

    Examples
    --------
    >>> import numpy as np, eels_ad
    >>> cube = eels_ad.as_datacube(np.ones((4, 4, 8)), energy_offset=700.0, dispersion=0.5)
    >>> cube.eels.crop(701, 702).sizes["energy"]
    3
    >>> float(cube.eels.total_counts().sum())
    128.0
    """

    def __init__(self, cube: xr.DataArray) -> None:
        self._cube = cube

    @property
    def dispersion(self) -> float:
        """Energy step in eV per channel."""
        return energy_axis(self._cube)[1]

    @property
    def offset(self) -> float:
        """Energy of the first channel in eV."""
        return energy_axis(self._cube)[0]

    @property
    def n_pixels(self) -> int:
        """Number of spectra (y x x)."""
        return int(self._cube.sizes["y"] * self._cube.sizes["x"])

    def validate(self, *, negative: NegativePolicy = "raise") -> xr.DataArray:
        """Validate the cube (see :func:`validate`)."""
        return validate(self._cube, negative=negative)

    def crop(self, e_min: float | None = None, e_max: float | None = None) -> xr.DataArray:
        """Keep the channels with ``e_min <= energy <= e_max`` (eV)."""
        cropped = self._cube.sel(energy=slice(e_min, e_max))
        if cropped.sizes["energy"] == 0:
            lo, hi = float(self._cube.energy[0]), float(self._cube.energy[-1])
            raise ValueError(f"energy range ({e_min}, {e_max}) eV holds no channel of the cube ({lo}-{hi} eV)")
        return cropped

    def bin(self, y: int = 1, x: int = 1, energy: int = 1) -> xr.DataArray:
        """Sum neighbouring pixels and/or channels (counts add; a ragged edge is dropped)."""
        factors = {"y": y, "x": x, "energy": energy}
        for dim, factor in factors.items():
            if int(factor) != factor or factor < 1:
                raise ValueError(f"binning factor for {dim!r} must be a positive integer, got {factor}")
            if factor > self._cube.sizes[dim]:
                raise ValueError(f"binning factor {factor} exceeds the {dim!r} size {self._cube.sizes[dim]}")
        binned = self._cube.coarsen({d: f for d, f in factors.items() if f > 1}, boundary="trim").sum()
        binned.attrs = dict(self._cube.attrs)
        return binned.transpose(*DIMS)

    def total_counts(self, energy_range: tuple[float, float] | None = None) -> xr.DataArray:
        """Map (y, x) of the counts summed over the whole axis or an ``(e_min, e_max)`` window."""
        cube = self._cube if energy_range is None else self.crop(*energy_range)
        total = cube.sum("energy")
        total.name = "total_counts"
        total.attrs = {"units": "counts", "energy_range": list(energy_range) if energy_range else "all"}
        return total

    def mean_spectrum(self, mask: xr.DataArray | np.ndarray | None = None) -> xr.DataArray:
        """Mean spectrum over all pixels or over the pixels where ``mask`` is True."""
        if mask is None:
            return self._cube.mean(("y", "x"))
        mask = as_mask(mask, self._cube)
        if not bool(mask.any()):
            raise ValueError("the mask selects no pixel")
        return self._cube.where(mask).mean(("y", "x"))

    def spectra(self, mask: xr.DataArray | np.ndarray | None = None) -> np.ndarray:
        """The spectra as a 2-D array (pixels, channels), optionally only where ``mask`` is True."""
        values = np.asarray(self._cube.values).reshape(self.n_pixels, -1)
        if mask is None:
            return values
        return values[np.asarray(as_mask(mask, self._cube)).ravel()]


def as_mask(mask: xr.DataArray | np.ndarray, cube: xr.DataArray) -> xr.DataArray:
    """Turn a (y, x) boolean array into a DataArray aligned with ``cube``, checking its shape."""
    shape = (cube.sizes["y"], cube.sizes["x"])
    if isinstance(mask, xr.DataArray):
        values = mask.transpose("y", "x").values
    else:
        values = np.asarray(mask)
    if values.shape != shape:
        raise ValueError(f"mask has shape {values.shape} but the cube has (y, x) = {shape}")
    if values.dtype != bool:
        raise TypeError(f"mask must be boolean, got dtype {values.dtype}")
    return xr.DataArray(values, dims=("y", "x"), coords={"y": cube["y"], "x": cube["x"]})


def channel_index(channels: np.ndarray) -> slice | np.ndarray:
    """A boolean channel selection as a slice when it is one run of channels (indexing then makes views)."""
    chosen = np.flatnonzero(channels)
    if chosen.size and chosen[-1] - chosen[0] + 1 == chosen.size:
        return slice(int(chosen[0]), int(chosen[-1]) + 1)
    return channels
