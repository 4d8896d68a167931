"""Torch files given by users (checkpoints, embedding tables) loaded without ever running code from them.

Every such file is read with ``torch.load(weights_only=True)``: tensors, numbers, strings, lists and dicts only.
A file that needs code to unpickle (pickled classes or functions, whether from another program or crafted to run
code) is refused with a message that says so; this module never suggests, and the project never uses,
``weights_only=False``. A truncated or foreign file is named as such.
"""

from __future__ import annotations

import pickle
import zipfile
from pathlib import Path

import torch


class TorchFileError(ValueError):
    """A torch file given by the user cannot be loaded safely; the message names the file, the problem and the fix."""


def load_torch_file(path: str | Path, what: str, map_location: str | torch.device = "cpu") -> object:
    """The contents of a ``torch.save`` file (``what`` names its role for the messages, e.g. "model checkpoint").

    Raises :class:`TorchFileError` for a missing or unreadable file, one that needs code to unpickle, and a
    truncated or foreign file.
    """
    path = Path(path)
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except OSError as err:
        raise TorchFileError(f"{path}: cannot read the {what}: {err}") from err
    except pickle.UnpicklingError as err:
        if not zipfile.is_zipfile(path):
            raise TorchFileError(_not_torch(path, what)) from err
        raise TorchFileError(
            f"{path}: the {what} holds Python objects that only code can rebuild (pickled classes or functions, "
            "written by another program or crafted to run code). universal loads tensors and plain values only and "
            f"never unpickles code; use a {what} written by universal, or export the tensors with torch.save of "
            "plain dicts and tensors") from err
    except (RuntimeError, EOFError, ValueError, KeyError, AttributeError) as err:
        raise TorchFileError(_not_torch(path, what)) from err


def _not_torch(path: Path, what: str) -> str:
    size = path.stat().st_size
    return (f"{path}: not a complete torch file ({size} bytes): truncated by an interrupted copy or download, or "
            f"another kind of file; copy or download the {what} again")
