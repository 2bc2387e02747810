"""The numba kernel of :mod:`eels_ad.detect._score_kernels` (imported on first use: numba's import is not free)."""

import numpy as np
from numba import njit


@njit(nogil=True, cache=True, fastmath={"nsz", "arcp", "contract", "afn", "reassoc"})
def _rows(counts, model, floor, x0, dx, means, variances, with_shift, log_counts, out):  # pragma: no cover
    n, ne = counts.shape
    nt = means.size
    n_logs = log_counts.size
    for i in range(n):
        information = 0.0
        score = 0.0
        deviance = 0.0
        mean = 0.0
        variance = 0.0
        for k in range(ne):
            mu = max(model[i, k], floor)
            y = counts[i, k]
            if with_shift and ne > 1:  # np.gradient of the floored model: central inside, one-sided at the ends
                if k == 0:
                    slope = max(model[i, 1], floor) - mu
                elif k == ne - 1:
                    slope = mu - max(model[i, k - 1], floor)
                else:
                    slope = 0.5 * (max(model[i, k + 1], floor) - max(model[i, k - 1], floor))
                ratio = slope / mu
                information += slope * ratio
                score += (y - mu) * ratio
            log_mu = np.log(mu)
            positive = max(y, 0.0)
            deviance += mu - positive
            if positive > 0.0:  # y log(y / mu); 0 where y = 0
                whole = int(positive)  # counts: their logs from the table (a fifth of the kernel's time)
                log_y = log_counts[whole] if whole < n_logs and whole == positive else np.log(positive)
                deviance += positive * (log_y - log_mu)
            position = (log_mu - x0) / dx
            if position > nt - 1:  # beyond the table: the large-count expansion
                mean += 1.0 + 1.0 / (6.0 * mu)
                variance += 2.0 + 2.0 / mu
            else:
                j = min(max(int(position), 0), nt - 2)
                f = min(max(position - j, 0.0), 1.0)
                mean += means[j] * (1.0 - f) + means[j + 1] * f
                variance += variances[j] * (1.0 - f) + variances[j + 1] * f
        z = (2.0 * deviance - mean) / np.sqrt(max(variance, 1e-12))
        if with_shift:  # the shift test's |z| (its shift clipped to the window, as edge_shift), 0 where flat
            shift_z = 0.0
            if information > 0:
                shift_z = min(abs(score) / information, ne - 1.0) * np.sqrt(information)
            z = max(z, shift_z)
        out[i] = z


