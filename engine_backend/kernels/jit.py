"""Just-in-time builds of CUDA kernels into plain shared libraries of ``TORCH_LIBRARY`` ops.

A ``KernelSpec`` names template sources under ``csrc/`` and the values substituted into them
(``${NAME}`` placeholders). ``load(spec)`` renders the sources, compiles them with ninja into
``<cache>/<name>-<key>/<name>.so`` and loads it with ``torch.ops.load_library``; the ops then
live in ``torch.ops.<spec.namespace>``. No Python extension module is built, so one library
serves every Python version that runs the same torch.

The cache key hashes the rendered sources, every header in ``csrc/``, the flags, the torch
and CUDA versions and the target arch. Builds are safe across processes: a file lock makes
one process build while the others wait, the library is installed by an atomic rename with
a checksum beside it, and a library whose checksum does not match (a killed build, a
corrupt file) is rebuilt rather than loaded.
"""

from __future__ import annotations

import fcntl
import functools
import hashlib
import os
import shutil
import subprocess
import sys
import sysconfig
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from string import Template

import torch

CSRC = Path(__file__).parent / "csrc"
CACHE_ENV = "ENGINE_BACKEND_CACHE_DIR"
ARCH_ENV = "ENGINE_BACKEND_CUDA_ARCH"
KEY_VERSION = "1"  # bump when the build recipe below changes meaning


class JitBuildError(RuntimeError):
    """A kernel failed to compile or link; the message holds the compiler's output."""


@dataclass(frozen=True)
class KernelSpec:
    name: str  # kernel family, e.g. "merge_state"
    sources: tuple[str, ...]  # template files under source_dir, rendered then compiled
    params: tuple[tuple[str, str], ...] = ()  # ${NAME} -> value substitutions
    cuda_flags: tuple[str, ...] = field(default=())
    source_dir: Path = CSRC  # where the templates and their headers live (tests use their own)

    @staticmethod
    def make(
        name: str, sources, params: dict[str, object] | None = None, cuda_flags=(), source_dir: Path = CSRC
    ) -> "KernelSpec":
        items = tuple(sorted((k, str(v)) for k, v in (params or {}).items()))
        return KernelSpec(name, tuple(sources), items, tuple(cuda_flags), Path(source_dir))


# ------------------------------------------------------------------------ environment
def cache_dir() -> Path:
    root = os.environ.get(CACHE_ENV)
    if root:
        return Path(root).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "engine_backend" / "jit"


def cuda_home() -> Path:
    """CUDA_HOME, else the toolkit at /usr/local/cuda. (``nvcc`` on PATH may be a wrapper
    script, so its location does not reliably point at the toolkit.)"""
    for candidate in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if candidate and (Path(candidate) / "bin" / "nvcc").exists():
            return Path(candidate)
    raise JitBuildError("no CUDA toolkit found: set CUDA_HOME to the folder holding bin/nvcc")


@functools.lru_cache(maxsize=None)
def nvcc_version() -> str:
    out = subprocess.run([str(cuda_home() / "bin" / "nvcc"), "--version"], capture_output=True, text=True, check=True)
    return out.stdout.strip().splitlines()[-1]


def target_arch(arch: str | None = None) -> str:
    """Explicit arch (e.g. "90a"), else env ENGINE_BACKEND_CUDA_ARCH, else the current
    device's. Hopper and Blackwell get their arch-specific targets (sm_90a, sm_100a)."""
    arch = arch or os.environ.get(ARCH_ENV)
    if arch:
        return arch.removeprefix("sm_")
    if not torch.cuda.is_available():
        raise JitBuildError(f"no GPU to take the target arch from: pass arch= or set {ARCH_ENV} (e.g. 90a)")
    major, minor = torch.cuda.get_device_capability()
    return f"{major}{minor}" + ("a" if major >= 9 else "")


def _torch_paths() -> tuple[list[str], str]:
    root = Path(torch.__file__).parent
    return [str(root / "include"), str(root / "include" / "torch" / "csrc" / "api" / "include")], str(root / "lib")


# ----------------------------------------------------------------------- build recipe
def _render(spec: KernelSpec) -> dict[str, str]:
    params = dict(spec.params)
    rendered = {}
    for src in spec.sources:
        text = (spec.source_dir / src).read_text()
        try:
            rendered[src] = Template(text).substitute(params)
        except (KeyError, ValueError) as e:
            raise JitBuildError(f"template {src}: missing or bad parameter {e}") from e
    return rendered


def _flags(arch: str) -> dict[str, list[str]]:
    includes, _ = _torch_paths()
    inc = [f"-I{CSRC}"] + [f"-isystem {p}" for p in includes] + [f"-isystem {cuda_home() / 'include'}"]
    abi = f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}"
    common = ["-O3", "-std=c++17", "-DNDEBUG", abi]
    nvcc = common + [
        f"-gencode=arch=compute_{arch},code=sm_{arch}",
        "--expt-relaxed-constexpr",
        "-lineinfo",
        "-Xcompiler=-fPIC",
        "-Xptxas=-warn-spills",
    ]
    cxx = common + ["-fPIC", "-Wno-unused-parameter"]
    return {"inc": inc, "nvcc": nvcc, "cxx": cxx}


def cache_key(spec: KernelSpec, arch: str) -> str:
    h = hashlib.sha256()
    for src, text in sorted(_render(spec).items()):
        h.update(f"{src}\0{text}\0".encode())
    for folder in dict.fromkeys((CSRC, spec.source_dir)):
        for header in sorted(folder.glob("*.cuh")) + sorted(folder.glob("*.h")):
            h.update(f"{header.name}\0".encode() + header.read_bytes())
    fl = _flags(arch)
    meta = [KEY_VERSION, spec.name, repr(spec.params), repr(spec.cuda_flags), " ".join(fl["nvcc"] + fl["cxx"]),
            torch.__version__, str(torch.version.cuda), nvcc_version(), arch]
    h.update("\0".join(meta).encode())
    return h.hexdigest()[:20]


def namespace(spec: KernelSpec, arch: str | None = None) -> str:
    """The torch.ops namespace this spec's library registers (unique per specialization)."""
    return f"eb_{spec.name}_{cache_key(spec, target_arch(arch))}"


def _ninja_file(spec: KernelSpec, arch: str, ns: str) -> str:
    fl = _flags(arch)
    _, torch_lib = _torch_paths()
    nvcc = cuda_home() / "bin" / "nvcc"
    cxx = os.environ.get("CXX", "c++")
    cuda_lib = cuda_home() / "lib64"
    defines = f"-DEB_NAMESPACE={ns}"
    if spec.source_dir != CSRC:  # the rendered copies live in the build folder: point at their headers
        defines += f" -I{spec.source_dir}"
    lines = [
        "ninja_required_version = 1.3",
        f"cxxflags = {' '.join(fl['cxx'] + fl['inc'])} {defines}",
        f"nvccflags = {' '.join(fl['nvcc'] + list(spec.cuda_flags) + fl['inc'])} {defines}",
        f"ldflags = -shared -L{torch_lib} -lc10 -lc10_cuda -ltorch -ltorch_cpu -L{cuda_lib} -lcudart",
        f"rule nvcc\n  command = {nvcc} $nvccflags -c $in -o $out\n  description = nvcc $in",
        f"rule cxx\n  command = {cxx} $cxxflags -c $in -o $out\n  description = c++ $in",
        f"rule link\n  command = {cxx} $in $ldflags -o $out\n  description = link $out",
    ]
    objs = []
    for src in spec.sources:
        obj = src + ".o"
        objs.append(obj)
        lines.append(f"build {obj}: {'nvcc' if src.endswith('.cu') else 'cxx'} {src}")
    lines.append(f"build {spec.name}.so.partial: link {' '.join(objs)}")
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------- cache + load
@contextmanager
def _file_lock(path: Path):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _installed(lib: Path) -> bool:
    """A library counts as built only if its checksum file matches its bytes."""
    stamp = lib.with_suffix(".so.sha256")
    try:
        return stamp.read_text().strip() == _sha256(lib)
    except OSError:
        return False


def _log(msg: str) -> None:
    print(f"[engine_backend] {msg}", file=sys.stderr, flush=True)


def _build(spec: KernelSpec, arch: str, ns: str, build_dir: Path) -> Path:
    """Compile in ``build_dir`` and atomically install ``<name>.so`` plus its checksum.

    Starts from an empty folder: objects left by a killed build could look up to date."""
    shutil.rmtree(build_dir, ignore_errors=True)
    build_dir.mkdir(parents=True, exist_ok=True)
    for src, text in _render(spec).items():
        (build_dir / src).write_text(text)
    (build_dir / "build.ninja").write_text(_ninja_file(spec, arch, ns))
    _log(f"building {spec.name} for sm_{arch} in {build_dir} ...")
    t0 = time.perf_counter()
    ninja = shutil.which("ninja") or str(Path(sysconfig.get_path("scripts")) / "ninja")
    proc = subprocess.run([ninja, "-C", str(build_dir)], capture_output=True, text=True)
    if proc.returncode != 0:
        raise JitBuildError(f"building {spec.name} (sm_{arch}) failed:\n{proc.stdout}\n{proc.stderr}")
    lib = build_dir / f"{spec.name}.so"
    partial = build_dir / f"{spec.name}.so.partial"
    digest = _sha256(partial)
    os.replace(partial, lib)
    stamp_tmp = build_dir / f".{spec.name}.sha256.{os.getpid()}"
    stamp_tmp.write_text(digest)
    os.replace(stamp_tmp, lib.with_suffix(".so.sha256"))
    _log(f"built {spec.name} in {time.perf_counter() - t0:.1f} s")
    return lib


def build(spec: KernelSpec, arch: str | None = None) -> Path:
    """Return the path of the built library, building it if the cache lacks a valid one.

    Works without a GPU when ``arch`` (or env ENGINE_BACKEND_CUDA_ARCH) is given."""
    arch = target_arch(arch)
    key = cache_key(spec, arch)
    ns = f"eb_{spec.name}_{key}"
    build_dir = cache_dir() / f"{spec.name}-{key}"
    lib = build_dir / f"{spec.name}.so"
    if _installed(lib):
        return lib
    with _file_lock(cache_dir() / f"{spec.name}-{key}.lock"):
        if not _installed(lib):  # another process may have built it while we waited
            lib.unlink(missing_ok=True)
            return _build(spec, arch, ns, build_dir)
    return lib


_loaded: dict[tuple[KernelSpec, str], object] = {}  # the JIT cache's in-process half


def load(spec: KernelSpec, arch: str | None = None):
    """Build if needed, load, and return ``torch.ops.<namespace>`` for ``spec``."""
    arch = target_arch(arch)
    if (spec, arch) in _loaded:
        return _loaded[spec, arch]
    ns = namespace(spec, arch)
    lib = build(spec, arch)
    try:
        torch.ops.load_library(str(lib))
    except (OSError, RuntimeError) as e:
        _log(f"cached {lib.name} failed to load ({e}); rebuilding")
        with _file_lock(cache_dir() / f"{lib.parent.name}.lock"):
            lib.with_suffix(".so.sha256").unlink(missing_ok=True)
        lib = build(spec, arch)
        torch.ops.load_library(str(lib))
    _loaded[spec, arch] = getattr(torch.ops, ns)
    return _loaded[spec, arch]
