"""Checkers for the "Check yourself" exercises, one module per notebook.

A checker takes the learner's answer and returns Feedback: whether it is right and, when not, which
value is off, by how much, and the likely mistake. An answer of None means "not attempted yet"."""
from dataclasses import dataclass


@dataclass(frozen=True)
class Feedback:
    ok: bool
    message: str
    attempted: bool = True

    def __str__(self):
        mark = "correct" if self.ok else ("not attempted yet" if not self.attempted else "not yet")
        return f"[{mark}] {self.message}"

    def _repr_markdown_(self):
        icon = "✅" if self.ok else ("✏️" if not self.attempted else "❌")
        return f"{icon} {self.message}"


def not_attempted(what: str) -> Feedback:
    """Feedback for an answer left as None."""
    return Feedback(ok=False, attempted=False, message=f"Fill in {what}, then run this cell again.")


def wrong_type(answer, kind, what: str) -> Feedback | None:
    """Feedback when `answer` is not a `kind` (int, or (int, float) for any number; True and False
    never count as numbers), else None. `what` names the answer wanted, e.g. "a whole number of pages"."""
    if isinstance(answer, bool) or not isinstance(answer, kind):
        return Feedback(False, f"Give {what}, got {answer!r} ({type(answer).__name__}).")
    return None
