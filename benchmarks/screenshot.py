"""Screenshot an eels-ad HTML report in headless Chromium, after Bokeh has drawn its canvases.

Usage: python benchmarks/screenshot.py REPORT.html OUT.png [--width 1500 --height 1300]
Needs Debian's chromium and chromium-driver, and selenium (dev extra).
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from browser import check_in_browser  # noqa: E402  (the test suite's browser harness)

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("report", type=Path)
    parser.add_argument("out", type=Path)
    parser.add_argument("--width", type=int, default=1500)
    parser.add_argument("--height", type=int, default=1300)
    args = parser.parse_args()
    errors = check_in_browser(args.report, args.out, min_canvases=4, width=args.width, height=args.height)
    print(f"wrote {args.out}; console errors: {errors or 'none'}")
