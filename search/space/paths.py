"""Paths a user gives (a model checkpoint, the data folder, a ``label_fraction`` file), made
absolute once, on the driver, against the directory the command runs in: trials run in Ray's
own working directories, where a relative path names nothing."""

from __future__ import annotations

import os
from typing import Any

from difftune.trainables.data.splits import is_number

#: model names that are presets, not paths
MODEL_PRESETS = ("demo", "paper256")


def user_path(value: Any, *, keep: tuple[str, ...] = ()) -> Any:
    """``value`` made absolute against the working directory when it is a relative file
    path; names in ``keep`` (presets), numbers, URIs and None stay as they are."""
    if not isinstance(value, str) or not value or value in keep or "://" in value \
            or is_number(value):
        return value
    return os.path.abspath(os.path.expanduser(value))
