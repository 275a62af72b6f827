"""Test helpers for file-like sources."""

from __future__ import annotations

import io


class NonSeekableStream(io.RawIOBase):
  """A readable stream that cannot seek, like a pipe or a socket."""

  def __init__(self, data: bytes):
    self._inner = io.BytesIO(data)

  def readable(self):
    return True

  def readinto(self, b):
    return self._inner.readinto(b)
