"""torchvision's pure-Python transforms, importable in the reference venv without installing it.

torchvision 0.28's compiled extension is a CUDA build that fails to load against the CPU torch of
the reference venv, and `import torchvision` loads it from the package __init__. Only the
pure-Python transforms are needed, so the package is registered by hand (its search path, no
__init__) before importing them. torchvision is deliberately not installed into the venv: once it
is importable, transformers and diffusers import it too (and fail, or switch CLIPImageProcessor to
its torchvision backend), which breaks the other reference scripts. The pinned wheel is read in
place instead: an installed torchvision of that version if there is one, else the wheel that
`pip download` puts in .cache/reference/ (zipimport reads the pure-Python modules from it).

Importing this module registers the package; then `import torchvision.transforms` works.
"""
import glob
import importlib.metadata
import importlib.util
import os
import subprocess
import sys
import types

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

TORCHVISION = "0.28.0"


def torchvision_path():
    """Where torchvision's package files are, without importing it (see the module docstring)."""
    try:
        installed = importlib.metadata.version("torchvision")
    except importlib.metadata.PackageNotFoundError:
        installed = None
    if installed is not None and installed.split("+")[0] == TORCHVISION:
        return list(importlib.util.find_spec("torchvision").submodule_search_locations)
    cache = os.path.join(ROOT, ".cache", "reference")
    pattern = os.path.join(cache, f"torchvision-{TORCHVISION}-*.whl")
    if not glob.glob(pattern):
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
             "--disable-pip-version-check", "-q", "-d", cache, f"torchvision=={TORCHVISION}"],
            check=True,
        )
    return [os.path.join(sorted(glob.glob(pattern))[0], "torchvision")]


_pkg = types.ModuleType("torchvision")
_pkg.__path__ = torchvision_path()
sys.modules["torchvision"] = _pkg
