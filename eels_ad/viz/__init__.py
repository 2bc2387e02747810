"""Looking at results: linked maps and spectra in a notebook, figures, and an offline HTML report.

Imported lazily: ``import eels_ad`` does not load matplotlib or HoloViews.

- :func:`explore`: linked score map, energy-filtered map and spectra in a live notebook.
- :func:`report`: the page to send a colleague (what, how, the answer, the explorer, maps, spectra),
  offline HTML; :func:`linked_explorer` (tap a pixel, see its spectrum, no kernel needed),
  :func:`report_layout`, :func:`save_html`, :func:`save_png`, :func:`write_html`: its parts.
- :func:`plot_channel_tests`, :func:`channel_tests_hv`, :func:`reconstruction_hv`,
  :func:`plot_detection_grid`: figures of the NB channel tests, SPIRAL-TAP and detection grids.
"""

from ._explore import explore
from ._figures import channel_tests_hv, plot_channel_tests, plot_detection_grid, reconstruction_hv
from ._linked import linked_explorer
from ._report import html_page, report, report_layout, save_html, save_png, write_html

__all__ = [
    "channel_tests_hv",
    "explore",
    "html_page",
    "linked_explorer",
    "plot_channel_tests",
    "plot_detection_grid",
    "reconstruction_hv",
    "report",
    "report_layout",
    "save_html",
    "save_png",
    "write_html",
]
