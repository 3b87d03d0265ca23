"""The one error type for problems the user fixes (a missing folder, a bad option, an unreadable model).

Every CLI catches `UsageError` alone and prints its message as one line, without a traceback (exit code 2);
anything else is a bug and keeps its traceback. Modules subclass it where a caller needs to tell problems
apart (`data_loader.DatasetError`, `model.WeightsError`, `predict.ModelLoadError`, ...).
"""
from __future__ import annotations


class UsageError(RuntimeError):
    """A problem the user fixes; the message names it and says how."""
