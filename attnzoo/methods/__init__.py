"""The built-in attention methods, one file each, in family folders:
``attnzoo/methods/<family>/<name>.py`` (``softmax``, ``linear``, ``local``, ``sparse``,
...). Importing this package imports every method file it finds, which registers it:
adding a method is adding its file. Files and folders whose name starts with ``_``
are skipped (helpers private to a family).

Each method file's docstring is the method's documentation (maths, paper, complexity):
``import attnzoo.methods.linear.linear`` and ``help(...)`` it, or ``attnzoo info NAME``.
"""

from __future__ import annotations

import importlib
import pkgutil


def _discover() -> list:
    names = []
    for info in pkgutil.walk_packages(__path__, __name__ + "."):
        if any(part.startswith("_") for part in info.name[len(__name__) + 1:].split(".")):
            continue
        names.append(info.name)
        if not info.ispkg:
            importlib.import_module(info.name)
    return names


MODULES = _discover()
