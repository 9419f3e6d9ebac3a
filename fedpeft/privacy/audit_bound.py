"""Empirical lower bound on epsilon from one training run (Steinke, Nasr & Jagielski, 2023).

"Privacy Auditing with One (1) Training Run", NeurIPS 2023, arXiv:2305.08846. The auditor picks m
canaries and includes each one independently with probability 1/2, trains once, scores every
canary (higher = more likely included), then guesses "included" for the k_+ highest-scored and
"excluded" for the k_- lowest-scored canaries and abstains on the rest. If the training algorithm
is (epsilon, delta)-DP, the number W of correct guesses among the r = k_+ + k_- made is hardly more
likely to be large than under randomized response: the paper's main (epsilon, delta) theorem gives,
for every v,

    P[W >= v] <= f(v) + 2 m delta * max_{i >= 1} (f(v - i) - f(v)) / i,
    f(t) = P[Binomial(r, e^eps / (1 + e^eps)) >= t].

Seeing v correct guesses therefore rejects (epsilon, delta)-DP at confidence 1 - beta for every
epsilon whose right-hand side is below beta. The empirical lower bound is the largest such
epsilon. `epsilon_lower_bound` computes it as the paper's Appendix D code does (`p_value_DP_audit`
and the bisection of `get_eps_audit`); with delta = 0 it is the one-sided binomial
(Clopper-Pearson) bound on the guess accuracy, mapped through accuracy = e^eps / (1 + e^eps).
`best_guess_bound` turns canary scores and the inclusion bits into guesses, and pays for choosing
(k_+, k_-) after seeing the scores with a union bound.

A lower bound from an audit says "this algorithm is NOT (eps, delta)-DP for any eps below eps_lb"
(unless an event of probability at most beta happened). It says nothing about the upper bound
that the accountant reports; a weak attack gives a small eps_lb whatever the true epsilon is.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from numbers import Integral, Real

import numpy as np
from numpy.typing import ArrayLike
from scipy import special

#: The guess counts r that `best_guess_bound` tries when it chooses (k_+, k_-) itself, as fractions
#: of the number of canaries m (rounded, at least 1). Each r is tried split evenly (k_+ = ceil(r/2),
#: k_- = floor(r/2)) and, when r < m, as "included" guesses only (k_+ = r, k_- = 0): loss-based
#: scores often single out included canaries more surely than excluded ones.
DEFAULT_GUESS_FRACTIONS: tuple[float, ...] = (0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0)

# Bisection stops when the bracket is this narrow relative to (1 + its upper end); the paper's
# 30 steps on a bracket of width <= a few units stop at about 1e-9.
_RELATIVE_TOLERANCE = 1e-12
_MAX_BISECTION_STEPS = 200


@dataclass(frozen=True)
class AuditBound:
    """The result of auditing one run: the bound and the guesses it rests on.

    Attributes:
        epsilon: the empirical lower bound on epsilon (natural-log units); 0.0 when the guesses
            are no evidence against (0, delta)-DP at this confidence.
        num_canaries: m, the number of canaries (each included with probability 1/2).
        guesses: r = k_plus + k_minus, the number of guesses made (the rest are abstentions).
        correct: v, how many of the r guesses were right.
        k_plus: canaries guessed "included" (the k_plus highest scores).
        k_minus: canaries guessed "excluded" (the k_minus lowest scores).
        confidence: 1 - beta, the confidence of the whole statement, union bound included.
        delta: the delta of the (epsilon, delta)-DP hypothesis that was tested.
        candidates: how many (k_plus, k_minus) choices were tried; each was tested at level
            beta / candidates, so `confidence` holds for the best of them.
    """

    epsilon: float
    num_canaries: int
    guesses: int
    correct: int
    k_plus: int
    k_minus: int
    confidence: float
    delta: float
    candidates: int = 1


def epsilon_lower_bound(
    num_canaries: int, guesses: int, correct: int, delta: float, confidence: float = 0.95
) -> float:
    """The largest epsilon that `correct` right guesses out of `guesses` rule out, else 0.0.

    An (eps, delta)-DP algorithm audited with `num_canaries` canaries (each included with
    probability 1/2) lets an auditor who makes `guesses` guesses get at least `correct` right with
    probability at most p(eps) = f(v) + 2 m delta max_i (f(v - i) - f(v)) / i (module docstring).
    The result is the largest eps >= 0 with p(eps) < 1 - confidence, found by bisection as in the
    paper's Appendix D (`get_eps_audit`), but to ~1e-12 rather than 30 steps. The returned value
    always satisfies p(eps) < 1 - confidence, so it is a valid bound even where the bisection is
    conservative. Abstentions still count: delta's term grows with `num_canaries`, not `guesses`,
    which is why m = 1000 canaries with 100 guesses give a smaller bound than m = 100. Since
    p(eps) >= min(1, 2 m delta / v) for every eps, nothing at all can be claimed once
    2 m delta / correct >= 1 - confidence (m = 1000, delta = 1e-3 at 95%: 40 correct or fewer).

    Args:
        num_canaries: m >= 1, the number of canaries, abstentions included.
        guesses: r, the number of guesses made, 0 <= r <= m.
        correct: v, the number of correct guesses, 0 <= v <= r.
        delta: the delta of the hypothesis, 0 <= delta < 1.
        confidence: 1 - beta, in (0, 1).

    Returns:
        The empirical lower bound on epsilon (natural-log units); 0.0 when nothing can be claimed.

    Raises:
        ValueError: an argument is not of its type or outside its range (the message names it).
    """
    m = _check_int("num_canaries", num_canaries, 1, None)
    r = _check_int("guesses", guesses, 0, m, upper_name="num_canaries")
    v = _check_int("correct", correct, 0, r, upper_name="guesses")
    delta = _check_delta(delta)
    confidence = _check_confidence(confidence)
    return _epsilon_lower_bound(m, r, v, delta, 1.0 - confidence)


def best_guess_bound(
    scores: ArrayLike,
    included: ArrayLike,
    delta: float,
    confidence: float = 0.95,
    guesses: tuple[int, int] | None = None,
) -> AuditBound:
    """Guess each canary's inclusion from its score and return the bound those guesses give.

    The k_+ highest-scored canaries are guessed "included", the k_- lowest-scored "excluded", and
    the rest are abstentions; ties in `scores` are broken by canary index, so the canaries' order
    must not itself tell which were included (do not sort them by `included`).

    With `guesses=(k_plus, k_minus)` that one choice is tested at the full confidence; it must be
    fixed before the scores are seen. With `guesses=None` the function chooses: it tries every
    (k_+, k_-) built from `DEFAULT_GUESS_FRACTIONS` (a grid that depends on m only) and returns
    the largest bound. The paper's experiments report the best bound over the numbers of guesses
    they tried; taking a maximum after seeing the results like that overstates the confidence,
    so here each of the N candidates is tested at level beta / N (a union bound, Bonferroni): the
    chance that ANY candidate's bound exceeds the true epsilon is then at most beta, and the
    returned `confidence` is honest for the maximum. The price is a slightly smaller bound than
    testing one fixed choice at level beta.

    Args:
        scores: shape (m,), finite floats; higher means "more likely included" (e.g. minus the
            canary's loss under the trained model).
        included: shape (m,), bool; whether each canary was in the training data.
        delta: the delta of the (epsilon, delta)-DP hypothesis, 0 <= delta < 1.
        confidence: 1 - beta, in (0, 1), for the returned bound as a whole.
        guesses: (k_plus, k_minus), non-negative integers with k_plus + k_minus <= m, or None to
            choose among the default grid under a union bound.

    Returns:
        The `AuditBound` of the chosen guesses (the first of the grid among equal bounds).

    Raises:
        ValueError: an argument is not of its type, shape or range (the message names it).
    """
    score_array = _check_scores(scores)
    inclusion = _check_included(included, score_array.shape[0])
    delta = _check_delta(delta)
    confidence = _check_confidence(confidence)
    m = score_array.shape[0]
    candidates = _guess_grid(m) if guesses is None else [_check_guesses(guesses, m)]

    # Canaries from lowest to highest score; ties keep index order (a stable sort).
    ranked = inclusion[np.argsort(score_array, kind="stable")]
    # included_from_top[k] = included canaries among the k highest scores,
    # excluded_from_bottom[k] = excluded canaries among the k lowest.
    included_from_top = np.concatenate(([0], np.cumsum(ranked[::-1], dtype=np.int64)))
    excluded_from_bottom = np.concatenate(([0], np.cumsum(~ranked, dtype=np.int64)))

    beta_each = (1.0 - confidence) / len(candidates)
    right = [
        int(included_from_top[k_plus] + excluded_from_bottom[k_minus])
        for k_plus, k_minus in candidates
    ]
    # The delta = 0 bound is cheap and never below the delta > 0 one (p only grows with delta):
    # try the candidates from the highest delta = 0 bound down, and stop once none can win.
    ceilings = [
        _epsilon_lower_bound(m, sum(pair), v, 0.0, beta_each)
        for pair, v in zip(candidates, right, strict=True)
    ]
    best_index, best_epsilon = 0, -math.inf
    for index in sorted(range(len(candidates)), key=lambda i: -ceilings[i]):
        if ceilings[index] < best_epsilon:
            break
        r = sum(candidates[index])
        epsilon = (
            ceilings[index]
            if delta == 0
            else _epsilon_lower_bound(m, r, right[index], delta, beta_each)
        )
        if epsilon > best_epsilon or (epsilon == best_epsilon and index < best_index):
            best_index, best_epsilon = index, epsilon
    k_plus, k_minus = candidates[best_index]
    return AuditBound(
        epsilon=best_epsilon,
        num_canaries=m,
        guesses=k_plus + k_minus,
        correct=right[best_index],
        k_plus=k_plus,
        k_minus=k_minus,
        confidence=confidence,
        delta=delta,
        candidates=len(candidates),
    )


def _epsilon_lower_bound(m: int, r: int, v: int, delta: float, beta: float) -> float:
    """sup{eps >= 0 : p(eps) < beta} by bisection, keeping p(lo) < beta; arguments checked."""
    if v == 0:
        return 0.0  # p = P[W >= 0] = 1
    log_coefficients = _log_binomial_coefficients(r, v) if delta > 0 else None

    def p(eps: float) -> float:
        return _p_value(m, r, v, eps, delta, log_coefficients)

    if p(0.0) >= beta:
        return 0.0
    # p(eps) >= f(v) >= P[W' = r] = q^r, which reaches beta at q = beta^(1/r): an upper bracket.
    log_root = math.log(beta) / r
    hi = log_root - math.log(-math.expm1(log_root))  # logit(beta^(1/r))
    hi = hi * (1 + 1e-9) + 1e-9
    lo = 0.0
    for _ in range(_MAX_BISECTION_STEPS):
        if hi - lo <= _RELATIVE_TOLERANCE * (1.0 + hi):
            break
        mid = 0.5 * (lo + hi)
        if p(mid) < beta:
            lo = mid
        else:
            hi = mid
    return lo


def _log_binomial_coefficients(r: int, v: int) -> np.ndarray:
    """Log C(r, k) for k = v-1, v-2, ..., 0: shape (v,), the order `_p_value` sums them in."""
    k = np.arange(v - 1, -1, -1, dtype=np.float64)
    return special.gammaln(r + 1.0) - special.gammaln(k + 1.0) - special.gammaln(r - k + 1.0)


def _p_value(
    m: int, r: int, v: int, eps: float, delta: float, log_coefficients: np.ndarray | None
) -> float:
    """The paper's p-value of >= v correct out of r guesses, m canaries, under (eps, delta)-DP.

    Appendix D's `p_value_DP_audit`: q = e^eps / (1 + e^eps) is randomized response's accuracy,
    f(t) = P[Binomial(r, q) >= t], and p = f(v) + 2 m delta * alpha with
    alpha = max_{1 <= i <= v} P[v - i <= Binomial(r, q) < v] / i (larger i only shrink the ratio).
    `log_coefficients` is `_log_binomial_coefficients(r, v)`, needed only when delta > 0.
    """
    q = float(special.expit(eps))
    tail = float(special.bdtrc(v - 1, r, q))  # P[Binomial(r, q) > v - 1]
    if delta == 0 or log_coefficients is None:
        return min(tail, 1.0)
    k = np.arange(v - 1, -1, -1, dtype=np.float64)
    log_pmf = log_coefficients + k * special.log_expit(eps) + (r - k) * special.log_expit(-eps)
    below = np.cumsum(np.exp(log_pmf))  # below[i-1] = P[v - i <= Binomial(r, q) <= v - 1]
    alpha = float(np.max(below / np.arange(1, v + 1)))
    return min(tail + 2.0 * m * delta * alpha, 1.0)


def _guess_grid(m: int) -> list[tuple[int, int]]:
    """The (k_plus, k_minus) tried for m canaries, from `DEFAULT_GUESS_FRACTIONS`, no repeats."""
    grid: list[tuple[int, int]] = []
    for fraction in DEFAULT_GUESS_FRACTIONS:
        r = min(m, max(1, math.floor(fraction * m + 0.5)))
        splits = [((r + 1) // 2, r // 2)]
        if r < m:
            splits.append((r, 0))
        for split in splits:
            if split not in grid:
                grid.append(split)
    return grid


def _check_int(
    name: str, value: object, low: int, high: int | None, upper_name: str | None = None
) -> int:
    """`value` as an int in [low, high] (no upper limit when high is None), else ValueError."""
    if high is None:
        valid = f"an integer >= {low}"
    else:
        upper = f"{upper_name}={high}" if upper_name else f"{high}"
        valid = f"an integer in [{low}, {upper}]"
    if isinstance(value, bool) or not isinstance(value, Integral):
        raise ValueError(f"{name} must be {valid}, got {value!r}")
    number = int(value)
    if number < low or (high is not None and number > high):
        raise ValueError(f"{name} must be {valid}, got {number}")
    return number


def _check_real(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, Real) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite real number, got {value!r}")
    return float(value)


def _check_delta(delta: object) -> float:
    number = _check_real("delta", delta)
    if not 0.0 <= number < 1.0:
        raise ValueError(f"delta must be in [0, 1), got {delta!r}")
    return number


def _check_confidence(confidence: object) -> float:
    number = _check_real("confidence", confidence)
    if not 0.0 < number < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence!r}")
    return number


def _check_scores(scores: ArrayLike) -> np.ndarray:
    try:
        array = np.asarray(scores, dtype=np.float64)
    except (TypeError, ValueError) as error:
        raise ValueError(f"scores must be a 1-D array of finite floats: {error}") from None
    if array.ndim != 1 or array.shape[0] == 0:
        raise ValueError(f"scores must be a non-empty 1-D array, got shape {array.shape}")
    if not np.all(np.isfinite(array)):
        raise ValueError("scores must be finite (no NaN or infinity)")
    return array


def _check_included(included: ArrayLike, m: int) -> np.ndarray:
    array = np.asarray(included)
    if array.dtype != np.bool_:
        raise ValueError(f"included must be a boolean array, got dtype {array.dtype}")
    if array.shape != (m,):
        raise ValueError(f"included must have the shape of scores, ({m},), got {array.shape}")
    return array


def _check_guesses(guesses: object, m: int) -> tuple[int, int]:
    if not isinstance(guesses, tuple | list) or len(guesses) != 2:
        raise ValueError(f"guesses must be None or a pair (k_plus, k_minus), got {guesses!r}")
    k_plus = _check_int("guesses[0] (k_plus)", guesses[0], 0, m, upper_name="num_canaries")
    k_minus = _check_int(
        "guesses[1] (k_minus)", guesses[1], 0, m - k_plus, upper_name="num_canaries - k_plus"
    )
    return k_plus, k_minus
