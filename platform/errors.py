"""Typed errors. Every message says what is wrong, where, and how to fix it.

User errors (`UserError` and subclasses) make the CLI exit with code 2 and no traceback. All
errors pickle cleanly so they cross Ray task boundaries intact.
"""

from __future__ import annotations

from dataclasses import dataclass, field


class RetroError(Exception):
    """Base class of every error retro raises on purpose."""

    def __reduce__(self):  # keep subclasses with custom __init__ picklable across Ray
        return (_rebuild, (type(self), self.__dict__.copy(), self.args))


def _rebuild(cls, state, args):
    err = cls.__new__(cls)
    Exception.__init__(err, *args)
    err.__dict__.update(state)
    return err


class UserError(RetroError):
    """The user can fix this (bad spec, bad input data, bad command line). CLI exit code 2."""


@dataclass
class SpecIssue:
    """One problem in a spec: where it is, what is wrong, and what would be valid."""

    path: str
    message: str
    file: str | None = None
    line: int | None = None
    value: object = field(default=None)
    has_value: bool = False
    hint: str | None = None

    def render(self) -> str:
        where = self.path or "<spec>"
        if self.file:
            where += f"  ({self.file}{f':{self.line}' if self.line else ''})"
        text = f"{where}: {self.message}"
        if self.has_value:
            text += f" [got {self.value!r}]"
        if self.hint:
            text += f"\n    hint: {self.hint}"
        return text


class SpecError(UserError):
    """A spec is invalid. Carries every issue found, not just the first."""

    def __init__(self, issues: list[SpecIssue]):
        self.issues = list(issues)
        n = len(self.issues)
        head = f"invalid spec: {n} problem{'s' if n != 1 else ''}"
        super().__init__(head + "\n" + "\n".join("  - " + i.render() for i in self.issues))


class ComponentNotFound(UserError):
    """A `type:` name that no registry entry matches."""

    def __init__(self, kind: str, name: str, known: list[str], close: list[str]):
        self.kind, self.name, self.known, self.close = kind, name, known, close
        msg = f"unknown {kind} component {name!r}"
        if close:
            msg += f"; did you mean {' or '.join(repr(c) for c in close)}?"
        msg += f" Known: {', '.join(known) or '(none)'}. List them with `retro components {kind}`."
        super().__init__(msg)


class InputDataError(UserError):
    """Input data (a corpus file, a model directory, ...) is missing or malformed."""


class ArtifactError(RetroError):
    """The artifact store is inconsistent or an artifact is unreadable."""


class StageFailed(RetroError):
    """A stage raised. Names the stage, its artifact key, the cause and the log file."""

    def __init__(self, stage: str, key: str, cause: str, log_file: str | None = None,
                 user_error: bool = False):
        self.stage, self.key, self.cause, self.log_file = stage, key, cause, log_file
        self.user_error = user_error
        msg = f"stage {stage!r} (key {key[:12]}) failed: {cause}"
        if log_file:
            msg += f"\n    log: {log_file}"
        super().__init__(msg)
