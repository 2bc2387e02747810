"""Re-create eels_ad/data/fe_l23_sample.nc, the sample cube the demo and notebooks use.

Run from the repository root:  python data/make_sample_cube.py [--overwrite]
The recipe lives in eels_ad.data.SAMPLE_RECIPE; tests check that the shipped file matches it.
"""

import argparse
from pathlib import Path

from eels_ad.data import SAMPLE_FILE, make_sample
from eels_ad.io import save

target = Path(__file__).resolve().parent.parent / "eels_ad" / "data" / SAMPLE_FILE

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--overwrite", action="store_true", help="replace the existing file")
    args = parser.parse_args()
    save(make_sample(), target, overwrite=args.overwrite)
    print(f"wrote {target} ({target.stat().st_size / 1e6:.2f} MB)")
