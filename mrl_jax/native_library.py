"""Finding the package's optional native extensions (setup.py builds them)."""
from __future__ import annotations

import ctypes
import importlib.machinery
import pathlib


def load(directory: pathlib.Path, stem: str) -> ctypes.CDLL | None:
  """The extension `stem` built next to `directory`'s modules, or None (not built)."""
  for suffix in importlib.machinery.EXTENSION_SUFFIXES:
    path = directory / f"{stem}{suffix}"
    if path.exists():
      return ctypes.CDLL(str(path))
  return None
