"""Just-in-time builds of CUDA kernels into plain shared libraries of ``TORCH_LIBRARY`` ops.

A ``KernelSpec`` names template sources under ``csrc/`` and the values substituted into them
(``${NAME}`` placeholders). ``load(spec)`` renders the sources, compiles them with ninja into
``<cache>/<name>-<key>/<name>.so`` and loads it with ``torch.ops.load_library``; the ops then
live in ``torch.ops.<spec.namespace>``. No Python extension module is built, so one library
serves every Python version that runs the same torch.

The cache key hashes the rendered sources, every header under ``csrc/`` (subfolders too), the
flags, the torch and CUDA versions and the target arch. Builds are safe across processes: a file
lock makes one process build while the others wait, the library is installed by an atomic rename
with a checksum beside it, and a library whose checksum does not match (a killed build, a
corrupt file) is rebuilt rather than loaded. The lock file records its holder (pid, host, kernel,
start time), so a waiter says whom it waits for, and says it again every ``WAIT_REPORT_S``.

Environment: ``ENGINE_BACKEND_CACHE_DIR`` (the cache), ``ENGINE_BACKEND_CUDA_ARCH`` then
``TORCH_CUDA_ARCH_LIST`` (the target arch, see ``target_arch``), ``CUDA_HOME`` (the toolkit),
``MAX_JOBS`` (ninja's parallel jobs). Messages go to the package logger (``engine_backend.log``).
"""

from __future__ import annotations

import fcntl
import functools
import hashlib
import json
import os
import re
import shutil
import socket
import subprocess
import sysconfig
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from string import Template

import torch

from ..log import logger

CSRC = Path(__file__).parent / "csrc"
CACHE_ENV = "ENGINE_BACKEND_CACHE_DIR"
ARCH_ENV = "ENGINE_BACKEND_CUDA_ARCH"
ARCH_LIST_ENV = "TORCH_CUDA_ARCH_LIST"
JOBS_ENV = "MAX_JOBS"
KEY_VERSION = "2"  # bump when the build recipe below changes meaning
HEADER_SUFFIXES = (".cuh", ".h", ".hpp", ".inl")  # files a source may #include: all of them enter the key
WAIT_REPORT_S = 30.0  # a process waiting on another's build says so this often


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


def _cache_error(e: OSError) -> JitBuildError:
    return JitBuildError(f"the JIT cache {cache_dir()} is not a writable folder ({e}): "
                         f"set {CACHE_ENV} to one")


def cuda_home() -> Path:
    """CUDA_HOME (else CUDA_PATH), else the toolkit at /usr/local/cuda. A variable that is set must
    name a toolkit: a wrong one is an error, never a silent fall-back to another toolkit. (``nvcc``
    on PATH may be a wrapper script, so its location does not reliably point at the toolkit.)"""
    for var in ("CUDA_HOME", "CUDA_PATH"):
        value = os.environ.get(var)
        if value:
            if not (Path(value) / "bin" / "nvcc").exists():
                raise JitBuildError(f"{var}={value} holds no bin/nvcc: point {var} at a CUDA toolkit "
                                    "(the folder holding bin/nvcc), or unset it to use /usr/local/cuda")
            return Path(value)
    default = Path("/usr/local/cuda")
    if (default / "bin" / "nvcc").exists():
        return default
    raise JitBuildError("no CUDA toolkit found: set CUDA_HOME to the folder holding bin/nvcc")


@functools.lru_cache(maxsize=None)
def nvcc_version() -> str:
    out = subprocess.run([str(cuda_home() / "bin" / "nvcc"), "--version"], capture_output=True, text=True, check=True)
    return out.stdout.strip().splitlines()[-1]


def _device_arch() -> str | None:
    """The current GPU's target (Hopper and Blackwell: the arch-specific sm_90a, sm_100a), or None."""
    if not torch.cuda.is_available():
        return None
    major, minor = torch.cuda.get_device_capability()
    return f"{major}{minor}" + ("a" if major >= 9 else "")


_ARCH_ENTRY = re.compile(r"(\d+)\.(\d+)([af]?)(\+PTX)?", re.IGNORECASE)


def _list_entry(entry: str) -> str:
    """A TORCH_CUDA_ARCH_LIST entry as a target: "9.0" -> "90", "9.0a" -> "90a", "9.0+PTX" -> "90"
    (a build has one arch and its SASS; PTX for later GPUs is not added)."""
    m = _ARCH_ENTRY.fullmatch(entry)
    if not m:
        raise JitBuildError(f"{ARCH_LIST_ENV}: cannot read {entry!r} (expected entries like 9.0, 9.0a or 9.0+PTX); "
                            f"set {ARCH_ENV} (e.g. 90a) to name the target")
    return f"{m[1]}{m[2]}{m[3].lower()}"


def _capability(arch: str) -> str:
    return arch.rstrip("af")


def _arch_from_list(value: str) -> str | None:
    """One entry: that target, as written. Several (an image built for many GPUs): each build here
    targets one arch, the GPU's own (sm_90a on Hopper), if its compute capability is among them;
    without a GPU, or with one the list leaves out, the choice is the user's: an error names
    ENGINE_BACKEND_CUDA_ARCH."""
    archs = list(dict.fromkeys(_list_entry(e) for e in re.split(r"[;\s]+", value.strip()) if e))
    if not archs:
        return None
    if len(archs) == 1:
        return archs[0]
    device = _device_arch()
    if device is not None and _capability(device) in {_capability(a) for a in archs}:
        return device
    found = f"the GPU's sm_{device} is not among them" if device else "there is no GPU to choose by"
    raise JitBuildError(f"{ARCH_LIST_ENV}={value!r} names several archs ({', '.join('sm_' + a for a in archs)}) "
                        f"and {found}: a build targets one arch, so set {ARCH_ENV} (e.g. 90a) to name it")


@functools.lru_cache(maxsize=None)
def _say_listed_once(listed: str, arch: str) -> None:
    device = _device_arch()
    other = f" (this GPU's own target is sm_{device}: set {ARCH_ENV} to choose it)" if device not in (None, arch) else ""
    logger().info(f"target sm_{arch}, from {ARCH_LIST_ENV}={listed!r}{other}")


def target_arch(arch: str | None = None) -> str:
    """Explicit arch (e.g. "90a"), else env ENGINE_BACKEND_CUDA_ARCH, else env TORCH_CUDA_ARCH_LIST
    (see ``_arch_from_list``), else the current device's. Hopper and Blackwell devices get their
    arch-specific targets (sm_90a, sm_100a)."""
    arch = arch or os.environ.get(ARCH_ENV)
    if arch:
        return arch.removeprefix("sm_")
    listed = os.environ.get(ARCH_LIST_ENV, "").strip()
    if listed:
        arch = _arch_from_list(listed)
        if arch:
            _say_listed_once(listed, arch)
            return arch
    device = _device_arch()
    if device is None:
        raise JitBuildError(f"no GPU to take the target arch from: pass arch= or set {ARCH_ENV} (e.g. 90a)")
    return device


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


def _headers(folder: Path) -> list[Path]:
    """Every header under ``folder``, subfolders included: any of them may be #included."""
    return sorted(p for p in folder.rglob("*") if p.suffix in HEADER_SUFFIXES and p.is_file())


def cache_key(spec: KernelSpec, arch: str) -> str:
    h = hashlib.sha256()
    for src, text in sorted(_render(spec).items()):
        h.update(f"{src}\0{text}\0".encode())
    for folder in dict.fromkeys((CSRC, spec.source_dir)):
        for header in _headers(folder):
            h.update(f"{header.relative_to(folder).as_posix()}\0".encode() + header.read_bytes())
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
def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, someone else's
        return True
    return True


def _holder_text(path: Path) -> str:
    """Who holds the lock at ``path``, from the record its holder wrote into it."""
    try:
        holder = json.loads(path.read_text() or "null")
        pid, host, kernel, since = holder["pid"], holder["host"], holder["kernel"], float(holder["since"])
    except (OSError, ValueError, TypeError, KeyError):
        return "another process (not recorded yet)"
    text = f"pid {pid} on host {host}, building {kernel} since {time.strftime('%H:%M:%S', time.localtime(since))}"
    if host == socket.gethostname() and not _pid_alive(int(pid)):
        text += (f"; pid {pid} is no longer running, so another process holds the lock now (one that has not "
                 "recorded itself yet, or one in another PID namespace)")
    return text


def _wait_for(fd: int, path: Path) -> None:
    """Block on the lock, saying whom we wait for at once and again every WAIT_REPORT_S."""
    done = threading.Event()

    def report():
        t0 = time.monotonic()
        logger().info(f"waiting for {_holder_text(path)} (lock {path})")
        while not done.wait(WAIT_REPORT_S):
            logger().info(f"still waiting, {time.monotonic() - t0:.0f} s now, for {_holder_text(path)}")

    reporter = threading.Thread(target=report, name="jit-lock-wait", daemon=True)
    reporter.start()
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
    finally:
        done.set()
        reporter.join()


@contextmanager
def _file_lock(path: Path, kernel: str):
    """Hold the lock at ``path``, recording in it who holds it (pid, host, ``kernel``, start time).
    The kernel releases an flock when its holder dies, so a killed builder never blocks the others."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    except OSError as e:
        raise _cache_error(e) from e
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            _wait_for(fd, path)
        record = {"pid": os.getpid(), "host": socket.gethostname(), "kernel": kernel, "since": time.time()}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(record).encode(), 0)
        try:
            yield
        finally:
            os.ftruncate(fd, 0)
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _installed(lib: Path) -> bool:
    """A library counts as built only if its checksum file matches its bytes."""
    stamp = lib.with_suffix(".so.sha256")
    try:
        return stamp.read_text().strip() == _sha256(lib)
    except OSError:
        return False


def _ninja_command(build_dir: Path) -> list[str]:
    ninja = shutil.which("ninja") or str(Path(sysconfig.get_path("scripts")) / "ninja")
    command = [ninja, "-C", str(build_dir)]
    jobs = os.environ.get(JOBS_ENV, "").strip()
    if jobs:
        if not jobs.isdigit() or int(jobs) < 1:
            raise JitBuildError(f"{JOBS_ENV}={jobs!r}: expected a positive number of parallel compile jobs")
        command += ["-j", str(int(jobs))]
    return command


def _build(spec: KernelSpec, arch: str, ns: str, build_dir: Path) -> Path:
    """Compile in ``build_dir`` and atomically install ``<name>.so`` plus its checksum.

    Starts from an empty folder: objects left by a killed build could look up to date."""
    rendered, ninja_file, command = _render(spec), _ninja_file(spec, arch, ns), _ninja_command(build_dir)
    shutil.rmtree(build_dir, ignore_errors=True)
    try:
        build_dir.mkdir(parents=True, exist_ok=True)
        for src, text in rendered.items():  # a source may sit in a subfolder of source_dir
            (build_dir / src).parent.mkdir(parents=True, exist_ok=True)
            (build_dir / src).write_text(text)
        (build_dir / "build.ninja").write_text(ninja_file)
    except OSError as e:
        raise _cache_error(e) from e
    logger().info(f"building {spec.name} for sm_{arch} in {build_dir} ...")
    t0 = time.perf_counter()
    proc = subprocess.run(command, capture_output=True, text=True)
    if proc.returncode != 0:
        raise JitBuildError(f"building {spec.name} (sm_{arch}) failed:\n{proc.stdout}\n{proc.stderr}")
    lib = build_dir / f"{spec.name}.so"
    partial = build_dir / f"{spec.name}.so.partial"
    digest = _sha256(partial)
    os.replace(partial, lib)
    stamp_tmp = build_dir / f".{spec.name}.sha256.{os.getpid()}"
    stamp_tmp.write_text(digest)
    os.replace(stamp_tmp, lib.with_suffix(".so.sha256"))
    logger().info(f"built {spec.name} for sm_{arch} in {time.perf_counter() - t0:.1f} s")
    return lib


def build(spec: KernelSpec, arch: str | None = None) -> Path:
    """Return the path of the built library, building it if the cache lacks a valid one.

    Works without a GPU when ``arch`` (or env ENGINE_BACKEND_CUDA_ARCH, or TORCH_CUDA_ARCH_LIST) is given."""
    arch = target_arch(arch)
    key = cache_key(spec, arch)
    ns = f"eb_{spec.name}_{key}"
    build_dir = cache_dir() / f"{spec.name}-{key}"
    lib = build_dir / f"{spec.name}.so"
    if _installed(lib):
        return lib
    with _file_lock(cache_dir() / f"{spec.name}-{key}.lock", f"{spec.name} (sm_{arch})"):
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
        logger().warning(f"cached {lib} failed to load ({e}); rebuilding")
        with _file_lock(cache_dir() / f"{lib.parent.name}.lock", f"{spec.name} (sm_{arch})"):
            lib.with_suffix(".so.sha256").unlink(missing_ok=True)
        lib = build(spec, arch)
        torch.ops.load_library(str(lib))
    _loaded[spec, arch] = getattr(torch.ops, ns)
    return _loaded[spec, arch]
