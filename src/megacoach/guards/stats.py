"""Pure statistics for the guards (numpy and the standard library only; no scipy).

Every guard decision is a one-sided test with a stated false-alarm probability:

* `rank_test`: labeled best-of-K comparisons ranked by some quantity (a Values Coach score, the
  Megacoach reward, the advantages, PPO's push). Under "no relation to the labels" the labelers' choice
  is a uniformly random one of the K samples, whatever the quantity; the sum of the chosen samples'
  mid-ranks then has an exact, known distribution (a convolution over comparisons), so the p-value is
  exact for any number of comparisons, any mix of K and any ties (e.g. invalid responses that all get
  the same penalty carry no evidence either way).
* `binom_*`: exact binomial tails (sign tests, win rates).
* `welch_z` / `trend_z`: normal approximations for means of many samples (labeler and Values
  Coach scores of whole rollout batches, n >= 64 per iteration).
* `ols`: least squares with t statistics (the direction of PPO's push against score and KL), with
  an exact Student-t tail (`t_sf`, via the regularised incomplete beta function).
* `alpha_per_check`: the Bonferroni split that keeps a clean run's false-halt probability below
  1 - confidence over all monitors and all iterations.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from statistics import NormalDist

import numpy as np

_N = NormalDist()


def z_for(alpha: float) -> float:
    """The one-sided critical value: P(Z > z) = alpha."""
    alpha = min(max(float(alpha), 1e-300), 0.5)
    if alpha < 1e-15:  # NormalDist.inv_cdf loses precision; asymptotic expansion of the tail
        z = math.sqrt(-2 * math.log(alpha))
        for _ in range(30):
            z = math.sqrt(-2 * math.log(alpha * z * math.sqrt(2 * math.pi)))
        return z
    return _N.inv_cdf(1.0 - alpha)


def normal_sf(z: float) -> float:
    """P(Z > z)."""
    return 0.5 * math.erfc(z / math.sqrt(2.0))


def alpha_per_check(confidence: float, n_checks: int) -> float:
    """Bonferroni: each of n_checks tests at this level keeps P(any false alarm) <= 1 - confidence."""
    return (1.0 - confidence) / max(1, int(n_checks))


# ------------------------------------------------------------------------------------------ binomial
def _log_binom_pmf(k: int, n: int, p: float) -> float:
    if p <= 0.0:
        return 0.0 if k == 0 else -math.inf
    if p >= 1.0:
        return 0.0 if k == n else -math.inf
    return (math.lgamma(n + 1) - math.lgamma(k + 1) - math.lgamma(n - k + 1)
            + k * math.log(p) + (n - k) * math.log1p(-p))


def binom_cdf(k: int, n: int, p: float) -> float:
    """P(X <= k) for X ~ Binomial(n, p)."""
    if k < 0:
        return 0.0
    if k >= n:
        return 1.0
    logs = [_log_binom_pmf(i, n, p) for i in range(0, k + 1)]
    m = max(logs)
    return min(1.0, math.exp(m) * sum(math.exp(x - m) for x in logs)) if m > -math.inf else 0.0


def binom_sf(k: int, n: int, p: float) -> float:
    """P(X >= k) for X ~ Binomial(n, p)."""
    if k <= 0:
        return 1.0
    if k > n:
        return 0.0
    logs = [_log_binom_pmf(i, n, p) for i in range(k, n + 1)]
    m = max(logs)
    return min(1.0, math.exp(m) * sum(math.exp(x - m) for x in logs)) if m > -math.inf else 0.0


# ------------------------------------------------------------------------------------------ rank test
@dataclass
class RankTest:
    """How well a quantity ranks the labeled choice among the K samples of each comparison.

    agreement: mean over comparisons of the share of the other samples the chosen one beats (ties count
    half): 0.5 = chance, 1 = always ranked first, 0 = always last.
    top1: share of comparisons where the chosen sample is strictly first.
    p_better / p_worse: exact one-sided p-values of "at least this well / this badly" under the null that
    the labelers' choice is a uniformly random one of the K samples (a permutation test conditional on
    the ties present: a comparison whose samples all tie carries no evidence either way)."""

    n: int
    agreement: float
    top1: float
    p_better: float
    p_worse: float

    def as_dict(self) -> dict:
        return {k: (round(v, 6) if isinstance(v, float) else v) for k, v in asdict(self).items()}


def _midrank_scores(row: np.ndarray) -> np.ndarray:
    """2 x (others beaten) + (others tied), per sample: integers in 0..2(K-1)."""
    v = np.where(np.isfinite(row), row, -np.inf)
    greater = (v[:, None] > v[None, :]).sum(1)
    equal = (v[:, None] == v[None, :]).sum(1) - 1
    return 2 * greater + equal


def rank_test(values, chosen) -> RankTest:
    """Rank test of `chosen[c]` among `values[c]` (one row per comparison, K_c >= 2 values each)."""
    dist = np.ones(1)
    obs, agree, top, n = 0, 0.0, 0, 0
    for row, c in zip(values, chosen):
        row = np.asarray(row, dtype=float)
        k = len(row)
        if k < 2:
            continue
        s = _midrank_scores(row)
        obs += int(s[c])
        agree += s[c] / (2.0 * (k - 1))
        top += int(s[c] == 2 * (k - 1))
        n += 1
        pmf = np.bincount(s, minlength=2 * (k - 1) + 1) / k
        dist = np.convolve(dist, pmf)
    if n == 0:
        return RankTest(0, 0.5, 0.0, 1.0, 1.0)
    p_better = float(min(1.0, dist[obs:].sum()))
    p_worse = float(min(1.0, dist[:obs + 1].sum()))
    return RankTest(n, agree / n, top / n, p_better, p_worse)


def reversed_rank_test(values, chosen) -> RankTest:
    """`rank_test` with each comparison's choice reversed (K = 2: the other sample; K > 2: each other sample in turn,
    agreement and top1 averaged, p-values of the first): for any figure that reads the labelers' choice, below
    chance wherever the figure as stored is above it (the pairwise agreements of a row's K choices sum to K / 2)."""
    rows = [np.asarray(r, dtype=float) for r in values]
    kmax = max((len(r) for r in rows), default=2)
    def moved(r, c, j):  # the choice moved j places on (cycling through a shorter row's other samples)
        return c if len(r) < 2 else (c + 1 + (j - 1) % (len(r) - 1)) % len(r)

    tests = [rank_test(rows, [moved(r, c, j) for r, c in zip(rows, chosen)]) for j in range(1, max(2, kmax))]
    first = tests[0]
    return RankTest(first.n, float(np.mean([t.agreement for t in tests])), float(np.mean([t.top1 for t in tests])),
                    first.p_better, first.p_worse)


def sign_test(diffs: np.ndarray) -> tuple[int, int, float, float]:
    """(positives, n non-zero, P(>= positives | fair coin), P(<= positives | fair coin)); zeros dropped."""
    d = np.asarray(diffs, dtype=float)
    d = d[np.isfinite(d) & (d != 0)]
    pos, n = int(np.sum(d > 0)), len(d)
    return pos, n, binom_sf(pos, n, 0.5), binom_cdf(pos, n, 0.5)


# ------------------------------------------------------------------------------------------ means
def welch_z(x: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    """(mean(x) - mean(y), z) of two independent samples (z = 0 when either is too small)."""
    x = np.asarray(x, dtype=float)
    y = np.asarray(y, dtype=float)
    x, y = x[np.isfinite(x)], y[np.isfinite(y)]
    if len(x) < 2 or len(y) < 2:
        return 0.0, 0.0
    diff = float(x.mean() - y.mean())
    se = math.sqrt(x.var(ddof=1) / len(x) + y.var(ddof=1) / len(y))
    if se <= 0:
        return diff, 0.0 if diff == 0 else math.copysign(math.inf, diff)
    return diff, diff / se


def trend_z(means: list[float], ses: list[float]) -> tuple[float, float]:
    """(slope per iteration, z) of a weighted least-squares line through per-iteration means."""
    m = np.asarray(means, dtype=float)
    s = np.asarray(ses, dtype=float)
    ok = np.isfinite(m) & np.isfinite(s) & (s > 0)
    m, s = m[ok], s[ok]
    if len(m) < 3:
        return 0.0, 0.0
    x = np.arange(len(m), dtype=float)
    w = 1.0 / s ** 2
    xb = float(np.sum(w * x) / np.sum(w))
    sxx = float(np.sum(w * (x - xb) ** 2))
    if sxx <= 0:
        return 0.0, 0.0
    slope = float(np.sum(w * (x - xb) * m) / sxx)
    return slope, slope * math.sqrt(sxx)


# ------------------------------------------------------------------------------------------ Student t
def _betacf(a: float, b: float, x: float) -> float:
    """Continued fraction of the incomplete beta function (modified Lentz)."""
    tiny = 1e-300
    qab, qap, qam = a + b, a + 1.0, a - 1.0
    c, d = 1.0, 1.0 - qab * x / qap
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 400):
        m2 = 2 * m
        aa = m * (b - m) * x / ((qam + m2) * (a + m2))
        d = 1.0 + aa * d
        d = 1.0 / (d if abs(d) > tiny else tiny)
        c = 1.0 + aa / c
        c = c if abs(c) > tiny else tiny
        h *= d * c
        aa = -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2))
        d = 1.0 + aa * d
        d = 1.0 / (d if abs(d) > tiny else tiny)
        c = 1.0 + aa / c
        c = c if abs(c) > tiny else tiny
        delta = d * c
        h *= delta
        if abs(delta - 1.0) < 1e-14:
            break
    return h


def betainc(a: float, b: float, x: float) -> float:
    """The regularised incomplete beta function I_x(a, b)."""
    if x <= 0:
        return 0.0
    if x >= 1:
        return 1.0
    lbt = math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)
    if x < (a + 1.0) / (a + b + 2.0):
        return math.exp(lbt) * _betacf(a, b, x) / a
    return 1.0 - math.exp(lbt) * _betacf(b, a, 1.0 - x) / b


def t_sf(t: float, df: float) -> float:
    """P(T > t) for Student's t with df degrees of freedom."""
    if math.isinf(t):
        return 0.0 if t > 0 else 1.0
    if df <= 0:
        return 0.5
    tail = 0.5 * betainc(df / 2.0, 0.5, df / (df + t * t))
    return tail if t > 0 else 1.0 - tail


@dataclass
class OLS:
    coef: np.ndarray  # intercept first
    t: np.ndarray
    df: int

    def p_positive(self, i: int) -> float:
        """One-sided p-value of 'coefficient i > 0' (small = confidently positive)."""
        return t_sf(float(self.t[i]), self.df)

    def p_negative(self, i: int) -> float:
        return t_sf(-float(self.t[i]), self.df)


def ols(y: np.ndarray, *xs: np.ndarray) -> OLS | None:
    """y = b0 + b1 x1 + ... by least squares, with t statistics (None when underdetermined).
    Predictors without spread are dropped (their coefficient and t are reported as 0)."""
    y = np.asarray(y, dtype=float)
    keep = [i for i, x in enumerate(xs) if np.std(np.asarray(x, dtype=float)) > 1e-12 * (1 + np.abs(x).max())]
    X = np.column_stack([np.ones(len(y))] + [np.asarray(xs[i], dtype=float) for i in keep])
    n, p = X.shape
    if n <= p:
        return None
    coef, *_ = np.linalg.lstsq(X, y, rcond=None)
    resid = y - X @ coef
    df = n - p
    s2 = float(resid @ resid) / df
    try:
        cov = np.linalg.inv(X.T @ X)
    except np.linalg.LinAlgError:
        return None
    se = np.sqrt(np.maximum(np.diag(cov) * s2, 0.0))
    scale = float(np.abs(y).max()) + 1e-30
    with np.errstate(divide="ignore", invalid="ignore"):
        t = np.where(se > 1e-9 * scale, coef / np.where(se > 0, se, 1.0), np.sign(coef) * np.inf)
    full_coef = np.zeros(len(xs) + 1)
    full_t = np.zeros(len(xs) + 1)
    full_coef[0], full_t[0] = coef[0], t[0]
    for j, i in enumerate(keep, start=1):
        full_coef[i + 1], full_t[i + 1] = coef[j], t[j]
    return OLS(full_coef, full_t, df)


def spearman(x: np.ndarray, y: np.ndarray) -> float:
    """Rank correlation (average ranks for ties)."""
    def ranks(a):
        a = np.asarray(a, dtype=float)
        order = np.argsort(a, kind="mergesort")
        r = np.empty(len(a))
        r[order] = np.arange(len(a), dtype=float)
        for v in np.unique(a):
            m = a == v
            if m.sum() > 1:
                r[m] = r[m].mean()
        return r
    rx, ry = ranks(x), ranks(y)
    if rx.std() == 0 or ry.std() == 0:
        return 0.0
    return float(np.corrcoef(rx, ry)[0, 1])
