"""The ``eels-ad`` command line: parse arguments, call the public API, print."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path


def _describe(path: Path) -> dict:
    from .io import load

    cube = load(path, negative="allow")
    values = cube.values
    energy = cube["energy"].values
    totals = values.reshape(-1, values.shape[-1]).sum(axis=1)
    description = {
        "file": str(path),
        "dims": {dim: int(size) for dim, size in cube.sizes.items()},
        "energy_eV": {
            "first": float(energy[0]),
            "last": float(energy[-1]),
            "dispersion": float(cube.eels.dispersion) if energy.size > 1 else None,
        },
        "spatial_units": cube["x"].attrs.get("units", "px"),
        "dtype": str(cube.dtype),
        "counts": {
            "total": float(values.sum()),
            "mean_per_voxel": float(values.mean()),
            "min": float(values.min()),
            "max": float(values.max()),
            "negative_voxels": int((values < 0).sum()),
            "median_per_spectrum": float(sorted(totals)[len(totals) // 2]),
        },
        "attrs": {k: (v if isinstance(v, (str, int, float)) else str(v)) for k, v in cube.attrs.items()},
    }
    return description


def _cmd_info(args: argparse.Namespace) -> int:
    failures = 0
    for path in args.files:
        try:
            description = _describe(Path(path))
        except (OSError, ValueError) as error:
            print(f"error: {error}", file=sys.stderr)
            failures += 1
            continue
        if args.json:
            print(json.dumps(description, indent=2))
            continue
        dims, energy, counts = description["dims"], description["energy_eV"], description["counts"]
        print(f"{description['file']}")
        print(f"  dims         y={dims['y']} x={dims['x']} energy={dims['energy']} ({description['dtype']})")
        dispersion = f"{energy['dispersion']:.4g} eV/channel" if energy["dispersion"] else "single channel"
        print(f"  energy       {energy['first']:.2f} - {energy['last']:.2f} eV, {dispersion}")
        print(f"  spatial      {description['spatial_units']}")
        print(
            f"  counts       total {counts['total']:.4g}, mean {counts['mean_per_voxel']:.4g}/voxel, "
            f"min {counts['min']:.4g}, max {counts['max']:.4g}, negative voxels {counts['negative_voxels']}"
        )
        for key in ("title", "beam_energy_keV", "dwell_time_s", "collection_angle_mrad"):
            if key in description["attrs"]:
                print(f"  {key:<12} {description['attrs'][key]}")
    return 1 if failures else 0


def _cmd_simulate(args: argparse.Namespace) -> int:
    from .io import save
    from .simulate import simulate_fe_l23

    dataset = simulate_fe_l23(
        tuple(args.shape), dose=args.dose, shift=args.shift, anomaly_fraction=args.fraction,
        layout=args.layout, overdispersion=args.overdispersion, seed=args.seed,
    )
    try:
        save(dataset, args.out, overwrite=args.overwrite)
    except FileExistsError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    n_anomalous = int(dataset["anomaly"].sum())
    print(
        f"wrote {args.out}: {args.shape[0]} x {args.shape[1]} px x {dataset.sizes['energy']} channels, "
        f"{n_anomalous} anomalous pixels shifted by {args.shift:+g} eV ({args.layout}), seed {args.seed}"
    )
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    try:
        summary = run_demo(args.out, overwrite=args.overwrite, quiet=args.quiet, seed=args.seed)
    except FileExistsError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    if not args.quiet:
        print(summary["text"])
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``eels-ad`` (one sub-command per job)."""
    parser = argparse.ArgumentParser(
        prog="eels-ad",
        description="Find and explain anomalies in EELS spectrum images.",
    )
    from . import __version__

    parser.add_argument("--version", action="version", version=f"eels-ad {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    info = commands.add_parser("info", help="dims, energy axis and count statistics of datacube files",
                               description="Print dims, energy axis and count statistics of datacube files.")
    info.add_argument("files", nargs="+", metavar="FILE", help=".dm3, .dm4, .hspy, .msa, .emd or .nc file")
    info.add_argument("--json", action="store_true", help="print JSON instead of text")
    info.set_defaults(run=_cmd_info)

    simulate = commands.add_parser(
        "simulate", help="write a simulated Fe L2,3 spectrum image with anomalies",
        description="Write a simulated Fe L2,3 spectrum image (counts + ground truth) to NetCDF.",
    )
    simulate.add_argument("out", metavar="OUT.nc", help="output NetCDF file")
    simulate.add_argument("--shape", nargs=2, type=int, default=(64, 64), metavar=("NY", "NX"))
    simulate.add_argument("--shift", type=float, default=1.0, help="Fe edge shift of anomalies in eV (default 1)")
    simulate.add_argument("--fraction", type=float, default=0.01, help="fraction of anomalous pixels (0.01)")
    simulate.add_argument("--layout", choices=("pixels", "clusters", "line"), default="pixels")
    simulate.add_argument("--dose", type=float, default=200.0, help="mean pre-edge counts per channel (200)")
    simulate.add_argument("--overdispersion", type=float, default=0.0,
                          help="gamma-Poisson over-dispersion alpha (variance mu + alpha mu^2; default 0)")
    simulate.add_argument("--seed", type=int, default=0)
    simulate.add_argument("--overwrite", action="store_true", help="replace OUT.nc if it exists")
    simulate.set_defaults(run=_cmd_simulate)

    demo = commands.add_parser(
        "demo", help="run the whole pipeline on the embedded sample data",
        description="Run the pipeline on the embedded sample cube and write results and a report.",
    )
    demo.add_argument("--out", default="eels-ad-demo", help="output folder (default eels-ad-demo)")
    demo.add_argument("--overwrite", action="store_true", help="replace the results of an earlier demo")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--quiet", action="store_true", help="print nothing but errors")
    demo.set_defaults(run=_cmd_demo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``eels-ad`` console script."""
    args = build_parser().parse_args(argv)
    return int(args.run(args))


if __name__ == "__main__":
    sys.exit(main())
