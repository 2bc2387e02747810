"""What real data needs before any likelihood: detector gain, X-ray spikes, vacuum.

:func:`prepare` does all of it in one call and is what the pipeline (``eels-ad demo``, ``train``,
``detect``) runs by default; each step is also a function of its own.

- :func:`estimate_gain`: counts per electron from neighbouring-pixel differences; counts are divided
  by it before any Poisson likelihood (PCA normalisation, the CVAE's NLL, SPIRAL-TAP, NB tests).
- :func:`find_spikes`, :func:`remove_spikes`: single-voxel X-ray spikes, repaired from the spatial
  neighbours, with the mask kept as the coordinate ``spike``.
- :func:`vacuum_mask`: vacuum and very thin pixels, kept as the coordinate ``vacuum``; detectors
  neither train on nor flag them.
- :func:`zero_loss_drift`: the energy drift of every pixel from the zero-loss peak of a low-loss
  image recorded with the core loss; :func:`align_energy` resamples a cube by it (for looking: the
  quantity maps take the drift instead and move their model).
"""

from ._drift import align_energy, zero_loss_drift
from ._gain import GainEstimate, estimate_gain, resolve_gain
from ._prepare import load_prepared, prepare
from ._spikes import find_spikes, remove_spikes
from ._vacuum import vacuum_mask

__all__ = ["GainEstimate", "align_energy", "estimate_gain", "find_spikes", "load_prepared", "prepare", "remove_spikes",
           "resolve_gain", "vacuum_mask", "zero_loss_drift"]
