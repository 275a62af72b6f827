"""Errors shared by the checkpoint readers (torch zip pickles and safetensors)."""

from __future__ import annotations

import os
from typing import Any

__all__ = ["CheckpointError", "source_label"]


class CheckpointError(ValueError):
  """A checkpoint file is malformed, truncated, unsafe or uses an unsupported feature.

  The message names the file and what is wrong with it. Subclasses ``ValueError`` so that
  callers treating "bad input" generically keep working.
  """


def source_label(source: Any) -> str:
  """How error messages name a checkpoint source: its quoted path, or the file object's name.

  Args:
    source: a path (str or os.PathLike) or a file object.

  Returns:
    ``repr`` of the path or of the file object's ``name``, else ``<TypeName object>``.
  """
  if isinstance(source, (str, os.PathLike)):
    return repr(os.fspath(source))
  name = getattr(source, "name", None)
  return repr(name) if isinstance(name, (str, bytes)) else f"<{type(source).__name__} object>"
