"""What memfit raises and records when it cannot do what was asked, in one module that imports nothing
of memfit but :mod:`memfit.units` (so the planner, the passes and the backend can all use it without
importing each other).

* :class:`CantApply`: a pass or a planner cannot handle a graph; the graph is left unchanged and the
  reason becomes a :class:`Note` in the graph's record.
* :class:`Note`: one line of a graph's record. It is the text the reports print, and it also carries
  the technique it is about and a reason code, so code that acts on a note tests the code, never the
  wording.
* :class:`BudgetError`: no plan fits the budget; it states the smallest peak memfit can reach.
* :class:`OptionsError`: a bad option given through ``torch.compile(..., options=...)``.
"""

from __future__ import annotations

from typing import Sequence

from torch._dynamo.exc import ShortenTraceback

from memfit.units import format_bytes

#: Reason codes a :class:`Note` or :class:`CantApply` may carry (a note without one is informative).
REASONS = {
    "not_applied": "a technique could not handle the graph; it was left unchanged",
    "left_exact": "a site the technique leaves exact, with why",
    "not_needed": "the graph fits without the technique",
    "not_replayed": "the compiled graph's buffer plan could not be replayed; the planner's model stands",
    "no_budget": "no budget was given: nothing to plan for",
    "applied": "the technique was carried out (what it did follows)",
    "does_not_fit": "the technique's smallest reachable peak is over the budget",
    "kept_smallest": "no plan fits the budget; the smallest-peak plan was kept (strict=False)",
    "over_budget": "the compiled graph's step peak is over the budget (also warned)",
    "dynamic_shapes": "the graph has symbolic sizes the technique cannot plan for",
    "nothing_to_do": "the graph holds nothing the technique rewrites",
    "retry": "a search tried again with another setting",
    "choice": "the planner's choice among candidates",
    "graph_break": "the graph ends at a graph break: the code up to the next graph runs outside any plan",
    "limits": "what the planner could not choose (values it must save or must recompute), bounding its smallest peak",
}


class Note(str):
    """One line of a graph's record: the text the reports print, plus its technique and reason code.

    A ``str`` so that every report, JSON record and test that reads notes as text reads them as before.
    """

    technique: str | None
    code: str | None

    def __new__(cls, text: str, technique: str | None = None, code: str | None = None) -> "Note":
        if code is not None and code not in REASONS:
            raise ValueError(f"unknown note reason code {code!r}; known: {', '.join(REASONS)}")
        note = super().__new__(cls, text)
        note.technique = technique if technique is not None else getattr(text, "technique", None)
        note.code = code if code is not None else getattr(text, "code", None)
        return note

    def __reduce__(self):  # pickles (and deep-copies) with its fields
        return (Note, (str(self), self.technique, self.code))


def is_note(note: str, code: str, technique: str | None = None) -> bool:
    """Whether ``note`` carries reason ``code`` (and is about ``technique``, when given)."""
    return getattr(note, "code", None) == code and (technique is None or getattr(note, "technique", None) == technique)


class CantApply(Exception):
    """Raised by a pass (or its planner) that cannot handle a graph; the graph is left unchanged and
    the reason reported (as a :class:`Note` with ``code``)."""

    def __init__(self, reason: str, code: str = "not_applied"):
        super().__init__(reason)
        self.reason = reason
        self.code = code

    def note(self, technique: str, text: str | None = None) -> Note:
        """The record's line for this refusal: ``"<technique>: not applied: <reason>"`` unless ``text``."""
        return Note(text if text is not None else f"{technique}: not applied: {self.reason}", technique, self.code)


class OptionsError(ShortenTraceback, ValueError):
    """A bad option given through ``torch.compile(..., options=...)``.

    Dynamo wraps whatever a backend raises in ``BackendCompilerFailed`` (a RuntimeError), except
    ``ShortenTraceback``; deriving from it lets the user see a plain ``ValueError`` naming the option.
    """


class BudgetError(ShortenTraceback):
    """No plan memfit can make fits the budget; says the smallest peak it can reach and what else could help.

    (Derived from ``ShortenTraceback`` so Dynamo passes it to the user as it is.)
    """

    def __init__(
        self,
        smallest_peak: int,
        budget: int,
        margin: float = 1.0,
        *,
        hints: Sequence[str] = ("raise the budget, or shrink the batch or sequence",),
        message: str | None = None,
        limits: Sequence[str] = (),
    ):
        self.smallest_peak = smallest_peak
        self.limits = tuple(limits)
        """What bounded the smallest peak (values the planner had to save or to recompute), in words."""
        self.budget = budget
        self.margin = margin
        """The fraction of the budget plans aimed at (< 1: a peak of the planner's model, under Inductor;
        1: a peak replayed from what Inductor compiled, or an exact model)."""
        self.hints = tuple(hints)
        self.fallback = None
        self.baseline = None
        """(GraphPair, StepAnalysis) of the graph's baseline partition, where a partition refused it."""
        self.at_least = False
        """True: refused before planning, ``smallest_peak`` is what the step needs at the very least
        (``memfit.planner.budget.StepFloor``), not a peak a plan reached."""
        """With ``strict=False``: the smallest-peak plan, kept for a report of what does not fit."""
        if message is None:
            extra = ""
            if margin < 1.0:
                extra = (
                    f"; under Inductor plans keep a {100 * (1 - margin):.0f}% margin, so the smallest budget that can "
                    f"be planned is {format_bytes(smallest_peak / margin)}"
                )
            message = (
                f"memfit: no plan fits the budget of {format_bytes(budget)} ({budget} bytes): the smallest step "
                f"peak memfit can reach for this graph is {format_bytes(smallest_peak)} ({smallest_peak} bytes){extra}. "
                + (f"What bounds it: {'; '.join(self.limits)}. " if self.limits else "")
                + f"To fit: {'; or '.join(self.hints)}"
            )
        super().__init__(message, first_useful_frame=None)


class UnplannedCodeError(ShortenTraceback, RuntimeError):
    """With ``strict=True``: part of a budgeted step runs outside memfit's graphs (a graph break), where
    memfit cannot keep the budget. The message names the break and how to find the others."""

    def __init__(self, message: str):
        super().__init__(message, first_useful_frame=None)


__all__ = ["REASONS", "BudgetError", "CantApply", "Note", "OptionsError", "UnplannedCodeError", "is_note"]
