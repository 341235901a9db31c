"""Build and load the project's small C kernels (kernels/csrc/*.c) with the system C compiler.

Why plain C through ctypes, not a torch C++ extension: the kernels take raw float / int64
pointers, so they need no torch headers; `cc -O3 -march=native -fopenmp` builds one in about a
second, where a torch extension takes about a minute on first use (measured here, 2 cores). The
library is built once per source (with the csrc/*.h it includes), compiler and flags and cached (MOH_COMPILE_CACHE, else
$XDG_CACHE_HOME/moh_compile, else ~/.cache/moh_compile), written to a temporary name and renamed,
so concurrent processes never load a half-written file. `-march=native` is safe because the cache
key includes the machine (a shared home across different CPUs gets one build per CPU model).

When no compiler works (or MOH_COMPILE_NATIVE=0), `load` returns None and callers use their
PyTorch path; `why_unavailable` says why.
"""
from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path

CSRC = Path(__file__).resolve().parent / "csrc"
FLAGS = ["-O3", "-march=native", "-fopenmp", "-shared", "-fPIC", "-std=c11"]

_lock = threading.Lock()
_loaded: dict[str, ctypes.CDLL | None] = {}
_errors: dict[str, str] = {}


def cache_dir() -> Path:
    root = os.environ.get("MOH_COMPILE_CACHE")
    if root:
        return Path(root) / "kernels"
    xdg = os.environ.get("XDG_CACHE_HOME")
    return Path(xdg or Path.home() / ".cache") / "moh_compile" / "kernels"


def _compiler() -> str | None:
    for name in (os.environ.get("CC"), "cc", "gcc", "clang"):
        if name and shutil.which(name):
            return name
    return None


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("model name", "flags")):
                return line
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _build(name: str, cc: str) -> Path:
    src = CSRC / f"{name}.c"
    version = subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=30).stdout
    headers = [h.read_text() for h in sorted(CSRC.glob("*.h"))]  # what the sources include
    key = hashlib.sha256("\0".join([src.read_text(), *headers, cc, version, " ".join(FLAGS),
                                     _cpu_model()]).encode())
    lib = cache_dir() / f"{name}-{key.hexdigest()[:16]}.so"
    if lib.exists():
        return lib
    lib.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=lib.parent)
    os.close(fd)
    try:
        res = subprocess.run([cc, *FLAGS, str(src), "-o", tmp, "-lm"], capture_output=True, text=True, timeout=120)
        if res.returncode != 0:
            raise RuntimeError(f"{cc} failed: {res.stderr.strip().splitlines()[-1] if res.stderr.strip() else res.returncode}")
        os.replace(tmp, lib)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return lib


def load(name: str) -> ctypes.CDLL | None:
    """The built library kernels/csrc/<name>.c, or None when it cannot be built here."""
    with _lock:
        if name in _loaded:
            return _loaded[name]
        lib = None
        if os.environ.get("MOH_COMPILE_NATIVE", "1") == "0":
            _errors[name] = "disabled by MOH_COMPILE_NATIVE=0"
        elif (cc := _compiler()) is None:
            _errors[name] = "no C compiler found (set CC)"
        else:
            try:
                lib = ctypes.CDLL(str(_build(name, cc)))
            except (OSError, RuntimeError, subprocess.SubprocessError) as e:
                _errors[name] = f"could not build {name}.c: {e}"
        _loaded[name] = lib
        return lib


def why_unavailable(name: str) -> str | None:
    """Why `load(name)` returned None (None when it loaded or was not tried)."""
    return _errors.get(name)


__all__ = ["load", "why_unavailable", "cache_dir"]
