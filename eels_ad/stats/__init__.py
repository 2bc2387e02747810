"""Negative-binomial count regression: which energy channels differ, and by how much.

``nb_fit`` fits NB2 regressions to every feature at once (method of moments or maximum
likelihood), ``nb_test`` tests two groups per feature (Wald or likelihood ratio, BH q-values),
``compare_regions`` runs it per energy channel between two regions of a spectrum image.
"""

from .negbin import NBFit, benjamini_hochberg, nb_fit, nb_loglik, nb_test
from .regions import compare_regions, size_factors_from_totals

__all__ = [
    "NBFit",
    "benjamini_hochberg",
    "compare_regions",
    "nb_fit",
    "nb_loglik",
    "nb_test",
    "size_factors_from_totals",
]
