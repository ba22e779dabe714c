"""The one error an export raises for input it cannot handle."""

from __future__ import annotations


class ExportError(RuntimeError):
    """The source cannot be exported (a missing or unreadable model, an unsupported policy, a
    graph that does not reproduce the policy, the ``deploy`` extra not installed). The message
    is one line naming the file or setting and what is wrong."""


__all__ = ["ExportError"]
