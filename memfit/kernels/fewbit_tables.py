"""Optimal piecewise-constant derivatives for few-bit activation gradients.

The backward of a pointwise nonlinearity ``y = f(x)`` needs only ``f'(x)``. Few-bit backward
(Novikov et al., ICML 2023) keeps a ``b``-bit code of ``x`` instead of ``x`` and multiplies the
incoming gradient by a level ``q(x)`` chosen from ``2**b`` values. This module finds ``q``: the
boundaries ``s_1 < ... < s_{2^b - 1}`` and levels ``v_0 .. v_{2^b - 1}`` minimising

    E_{x ~ p} [ (f'(x) - q(x))^2 ],   q(x) = v_k  where  k = #{i : x > s_i}

(the code of ``x`` is the number of boundaries strictly below it, so ``x == s_i`` falls in the
lower interval, which is what ``relu``'s and ``leaky_relu``'s backward do at 0: they are exact at
one bit).

Why a dynamic program: for fixed intervals the best level is the ``p``-weighted mean of ``f'`` on
each, and the error is the weighted variance; so the problem is optimal 1-D segmentation, which a
DP over "``k`` intervals covering the first ``j`` grid cells" solves to the global optimum on the
grid in ``O(K N^2)``. With ``N = 1600`` cells of width 0.01 on [-8, 8] (the standard normal puts
1.2e-15 of its mass outside) and ``K = 16`` levels it takes about 0.2 s per function and gives the
1-, 2-, 3- and 4-bit tables from one run. Tables are cached per (function, parameters, weighting).

``p`` is a standard normal by default (pre-activations of normalised networks are close to it); a
measured histogram of real inputs can be given instead (:class:`Histogram`, filled by
``memfit.passes.fewbit.calibrate``).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import numpy as np

#: Activations with a table. ReLU and LeakyReLU have piecewise-constant derivatives: exact at 1 bit.
#: ``quick_gelu`` is ``x * sigmoid(1.702 x)`` (CLIP's, HF's ``QuickGELUActivation``; no ATen op: the
#: backward is matched as a chain, :mod:`memfit.planner.fewbit_chains`).
ACTIVATIONS = ("gelu", "gelu_tanh", "silu", "sigmoid", "tanh", "softplus", "elu", "mish", "relu", "leaky_relu", "quick_gelu")
QUICK_GELU_SCALE = 1.702
EXACT_AT_ONE_BIT = ("relu", "leaky_relu")
BITS = (1, 2, 3, 4)

GRID_LIMIT = 8.0
GRID_CELLS = 1600


def _phi(x: np.ndarray) -> np.ndarray:
    return np.exp(-0.5 * x * x) / math.sqrt(2 * math.pi)


def _Phi(x: np.ndarray) -> np.ndarray:
    from scipy.special import ndtr

    return ndtr(x)


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * x))


def derivative(kind: str, x: np.ndarray, param: float | None = None) -> np.ndarray:
    """``f'(x)`` in float64 for an activation in :data:`ACTIVATIONS` (``param``: the activation's
    parameter where it has one: softplus ``beta``, elu ``alpha``, leaky_relu ``negative_slope``)."""
    x = np.asarray(x, dtype=np.float64)
    if kind == "gelu":
        return _Phi(x) + x * _phi(x)
    if kind == "gelu_tanh":
        c = math.sqrt(2 / math.pi)
        u = c * (x + 0.044715 * x**3)
        t = np.tanh(u)
        return 0.5 * (1 + t) + 0.5 * x * (1 - t * t) * c * (1 + 3 * 0.044715 * x * x)
    if kind == "silu":
        s = _sigmoid(x)
        return s * (1 + x * (1 - s))
    if kind == "quick_gelu":
        s = _sigmoid(QUICK_GELU_SCALE * x)
        return s * (1 + QUICK_GELU_SCALE * x * (1 - s))
    if kind == "sigmoid":
        s = _sigmoid(x)
        return s * (1 - s)
    if kind == "tanh":
        return 1 - np.tanh(x) ** 2
    if kind == "softplus":
        beta = 1.0 if param is None else param
        return _sigmoid(beta * x)
    if kind == "elu":
        alpha = 1.0 if param is None else param
        return np.where(x > 0, 1.0, alpha * np.exp(np.minimum(x, 0)))
    if kind == "mish":
        sp = np.logaddexp(0, x)
        t = np.tanh(sp)
        return t + x * (1 - t * t) * _sigmoid(x)
    if kind == "relu":
        return (x > 0).astype(np.float64)
    if kind == "leaky_relu":
        slope = 0.01 if param is None else param
        return np.where(x > 0, 1.0, slope)
    raise ValueError(f"no few-bit table for activation {kind!r}; accepted: {', '.join(ACTIVATIONS)}")


@dataclass(frozen=True)
class Histogram:
    """A measured distribution of an activation's inputs: counts over equal-width bins of [lo, hi]."""

    lo: float
    hi: float
    counts: tuple[float, ...]

    def __post_init__(self) -> None:
        if not self.hi > self.lo or len(self.counts) < 2 or sum(self.counts) <= 0:
            raise ValueError("a Histogram needs hi > lo, at least two bins and a positive total count")


@dataclass(frozen=True)
class Table:
    """The optimal ``2**bits``-level approximation of one activation's derivative."""

    kind: str
    bits: int
    boundaries: tuple[float, ...]
    levels: tuple[float, ...]
    mse: float
    """Expected squared error of the derivative under the weighting."""
    rel_error: float
    """``sqrt(mse / E[f'^2])``: the relative L2 error of the input gradient for a gradient
    independent of x (what a test on normal inputs measures)."""

    def code(self, x: np.ndarray) -> np.ndarray:
        x = np.asarray(x, dtype=np.float32)
        return sum((x > np.float32(s)).astype(np.int64) for s in self.boundaries)

    def approx(self, x: np.ndarray) -> np.ndarray:
        return np.asarray(self.levels)[self.code(x)]


def _cells(histogram: Histogram | None, limit: float, cells: int) -> tuple[np.ndarray, np.ndarray]:
    """Cell edges (candidate boundaries) and cell probabilities."""
    if histogram is None:
        edges = np.linspace(-limit, limit, cells + 1)
        edges[cells // 2] = 0.0  # an exact 0 edge: ReLU and LeakyReLU come out exact
        cdf = _Phi(edges)
        w = np.diff(cdf)
        w[0] += cdf[0]  # the tails go to the outer cells
        w[-1] += 1 - cdf[-1]
        return edges, w
    counts = np.asarray(histogram.counts, dtype=np.float64)
    edges = np.linspace(histogram.lo, histogram.hi, len(counts) + 1)
    if histogram.lo < 0 < histogram.hi:  # move the edge nearest 0 onto it
        edges[np.argmin(np.abs(edges))] = 0.0
    return edges, counts / counts.sum()


def segment(fprime: np.ndarray, w: np.ndarray, max_levels: int) -> list[tuple[list[int], float]]:
    """Optimal segmentations of the cells into k = 1..max_levels intervals (weighted least squares).

    Returns, for each k, the cut indices (interval i covers cells [cuts[i], cuts[i+1]) with
    cuts[0] = 0 and cuts[k] = N implied) and the error. Exact on the grid: the DP considers every cut.
    """
    n = len(fprime)
    W = np.concatenate([[0.0], np.cumsum(w)])
    S = np.concatenate([[0.0], np.cumsum(w * fprime)])
    Q = np.concatenate([[0.0], np.cumsum(w * fprime * fprime)])
    i = np.arange(n + 1)[:, None]
    j = np.arange(n + 1)[None, :]
    dw = W[j] - W[i]
    ds = S[j] - S[i]
    with np.errstate(divide="ignore", invalid="ignore"):
        cost = np.where(dw > 0, (Q[j] - Q[i]) - ds * ds / dw, 0.0)
    cost = np.maximum(cost, 0.0)
    cost[i >= j] = np.inf  # intervals are non-empty
    best = np.full(n + 1, np.inf)
    best[0] = 0.0
    backs = []
    out = []
    for k in range(1, max_levels + 1):
        total = best[:, None] + cost  # [i, j]
        arg = np.argmin(total, axis=0)
        best = total[arg, np.arange(n + 1)]
        backs.append(arg)
        cuts, j_ = [], n
        for back in reversed(backs):
            j_ = int(back[j_])
            cuts.append(j_)
        cuts = sorted(cuts)[1:]  # drop the leading 0
        out.append((cuts, float(best[n])))
    return out


@functools.lru_cache(maxsize=None)
def _tables(kind: str, param: float | None, histogram: Histogram | None) -> dict[int, Table]:
    edges, w = _cells(histogram, GRID_LIMIT, GRID_CELLS)
    mid = 0.5 * (edges[1:] + edges[:-1])
    fp = derivative(kind, mid, param)
    second = float(np.sum(w * fp * fp))
    segs = segment(fp, w, 2 ** max(BITS))
    W = np.concatenate([[0.0], np.cumsum(w)])
    S = np.concatenate([[0.0], np.cumsum(w * fp)])
    out = {}
    for bits in BITS:
        cuts, err = segs[2**bits - 1]
        bounds = [0] + cuts + [len(w)]
        levels = []
        for a, b in zip(bounds[:-1], bounds[1:]):
            levels.append(float((S[b] - S[a]) / (W[b] - W[a])) if W[b] > W[a] else 0.0)
        out[bits] = Table(
            kind=kind,
            bits=bits,
            boundaries=tuple(float(np.float32(edges[c])) for c in cuts),
            levels=tuple(levels),
            mse=err,
            rel_error=math.sqrt(err / second) if second > 0 else 0.0,
        )
    return out


#: Approx-BP's ReGELU2 and ReSiLU2 (Yang et al., ICML 2024, arXiv 2406.16282): the backward of
#: ``h(x) = sum_i a_i * relu(x - c_i)`` (sum a_i = 1, sum a_i c_i = 0) in place of the activation's,
#: with the ``a``, ``c`` the paper's authors published for 2 bits. Its derivative is piecewise constant:
#: 0 below c_1, then a_1, a_1 + a_2, and 1 above c_3; a 2-bit code of x says which piece. The thresholds
#: come from fitting h to the function (their theory), where :func:`table` fits the derivative: so these
#: tables have the larger derivative error (see ``docs/fewbit.md``), kept as an option to compare.
APPROX_BP = {
    "gelu": ((-0.04922261145617846, 1.0979632065417297, -0.048740595085551286),
             (-3.1858810036855245, -0.001178821281161997, 3.190832613414926)),
    "silu": ((-0.04060357190528599, 1.080925428529668, -0.040321856624382146),
             (-6.3050461001646445, -0.0008684942046214787, 6.325815242089708)),
}
APPROX_BP["gelu_tanh"] = APPROX_BP["gelu"]  # tanh-approximated GELU (GPT-2's gelu_new): ReGELU2 too
TABLE_SOURCES = ("optimal", "approx_bp")


@functools.lru_cache(maxsize=None)
def _approx_bp(kind: str, histogram: Histogram | None) -> Table:
    a, c = APPROX_BP[kind]
    levels = tuple(float(v) for v in np.concatenate([[0.0], np.cumsum(a)]))
    edges, w = _cells(histogram, GRID_LIMIT, GRID_CELLS)
    mid = 0.5 * (edges[1:] + edges[:-1])
    fp = derivative(kind, mid, None)
    q = np.asarray(levels)[sum((mid > s).astype(np.int64) for s in c)]
    mse, second = float(np.sum(w * (fp - q) ** 2)), float(np.sum(w * fp * fp))
    return Table(kind=kind, bits=2, boundaries=tuple(float(np.float32(s)) for s in c), levels=levels, mse=mse,
                 rel_error=math.sqrt(mse / second) if second > 0 else 0.0)


def table(kind: str, bits: int, *, param: float | None = None, histogram: Histogram | None = None,
          source: str = "optimal") -> Table:
    """The cached table for ``kind`` at ``bits`` (1..4) bits: the optimal one, or with
    ``source="approx_bp"`` Approx-BP's published 2-bit table where it has one (:data:`APPROX_BP`; other
    activations keep the optimal table)."""
    if kind not in ACTIVATIONS:
        raise ValueError(f"no few-bit table for activation {kind!r}; accepted: {', '.join(ACTIVATIONS)}")
    if bits not in BITS:
        raise ValueError(f"bits={bits!r} is not supported; accepted: {', '.join(map(str, BITS))}")
    if source not in TABLE_SOURCES:
        raise ValueError(f"unknown few-bit table source {source!r}; accepted: {', '.join(TABLE_SOURCES)}")
    if source == "approx_bp" and kind in APPROX_BP:
        if bits != 2:
            raise ValueError(f"Approx-BP's tables are 2-bit; got bits={bits} (use fewbit_bits=2 with fewbit_tables='approx_bp')")
        return _approx_bp(kind, histogram)
    return _tables(kind, None if param is None else float(param), histogram)[bits]
