"""The registry of memfit's techniques: the one place that says what each is and when it runs.

Every question of the form "which passes may this backend run?" is answered here — by the backend
(``passes="auto"`` or a list), by the options' validation (which names exist), by the pipeline-stage
adapter (auto plus ``split_backward``) and by the hints of a :class:`~memfit.errors.BudgetError`
(what the user could allow).

Where a technique runs in one compile (see ``docs/layout.md``):

* ``"dynamo"``: on Dynamo's FX graph, before AOTAutograd (``stream``: its regions become custom ops
  whose own backward runs chunk by chunk, so it must rewrite before autograd traces the joint graph);
* ``"joint"``: on the joint forward+backward graph, deciding what the forward saves (``checkpoint``,
  ``share_norms``, ``fewbit``);
* ``"backward"``: on the partitioned backward graph (``split_backward``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal


@dataclass(frozen=True)
class Technique:
    """One memory technique, as users name it in ``passes=[...]``."""

    name: str
    module: str
    """The pass that carries out its plan."""
    exact: bool
    """Gradients equal eager's within fp32 rounding (False: approximate, used only when allowed)."""
    auto: Literal["yes", "approximate", "searched", "no"]
    """Taken by ``passes="auto"``: ``"yes"``; ``"approximate"``: only with ``allow_approximation=True``;
    ``"searched"``: by auto's stream search, weighed against the plan without it by predicted time wherever
    that plan recomputes or does not fit;
    ``"no"``: only when named (or by the pipeline-stage adapter)."""
    stage: Literal["dynamo", "joint", "backward"]
    summary: str


TECHNIQUES: dict[str, Technique] = {
    t.name: t
    for t in (
        Technique("checkpoint", "memfit.passes.checkpoint", True, "yes", "joint",
                  "save or recompute each forward value"),
        Technique("share_norms", "memfit.passes.share_norms", True, "yes", "joint",
                  "norms' backward reads their output, so their input is not saved"),
        Technique("fewbit", "memfit.passes.fewbit", False, "approximate", "joint",
                  "few-bit codes of activation inputs instead of the inputs"),
        Technique("split_backward", "memfit.passes.split_backward", True, "no", "backward",
                  "backward as B (input gradients) and a queued W (weight gradients)"),
        Technique("stream", "memfit.passes.stream", True, "searched", "dynamo",
                  "token-wise regions run in chunks along the sequence"),
    )
}

#: Pass name -> the module of its pass (what ``passes=[...]`` accepts).
PASSES: dict[str, str] = {name: t.module for name, t in TECHNIQUES.items()}

#: Passes that change gradients; ``passes="auto"`` runs them only with ``allow_approximation=True``.
APPROXIMATE = frozenset(name for name, t in TECHNIQUES.items() if not t.exact)

#: Exact passes that ``passes="auto"`` does not run as a candidate of its own: ``split_backward``
#: changes *when* weight gradients arrive (only when named, or in a pipeline stage); ``stream`` is
#: weighed by auto's stream search (``memfit.compiler.search.stream_or_not``).
OPT_IN = frozenset(name for name, t in TECHNIQUES.items() if t.auto in ("no", "searched"))


def enabled(passes: tuple[str, ...] | str, allow_approximation: bool = False) -> tuple[str, ...]:
    """The passes a backend with these options may run as candidates: the named ones, or for
    ``"auto"`` every technique auto takes (approximate ones when allowed), in registry order."""
    if passes != "auto":
        return tuple(passes)
    return tuple(
        name for name, t in TECHNIQUES.items()
        if t.auto == "yes" or (t.auto == "approximate" and allow_approximation)
    )


def auto_streams(passes: tuple[str, ...] | str) -> bool:
    """Whether auto's stream-or-not search may stream (a budget is needed too: see the backend)."""
    return passes == "auto" and any(t.auto == "searched" for t in TECHNIQUES.values())


def stage_passes(passes: tuple[str, ...] | str) -> list[str]:
    """A pipeline stage's passes: the user's, or for ``"auto"`` every exact technique auto runs as a
    candidate; ``split_backward`` is added by the caller."""
    if passes == "auto":
        return [name for name, t in TECHNIQUES.items() if t.exact and t.auto == "yes"]
    if isinstance(passes, str):
        return [p for p in passes.split(",") if p.strip()]
    return list(passes or ())


__all__ = ["APPROXIMATE", "OPT_IN", "PASSES", "TECHNIQUES", "Technique", "auto_streams", "enabled", "stage_passes"]
