"""A folder of wheels for a GPU machine's own Python: `bash run.sh wheels DIR [--python 3.12] [--platform P]`.

A GPU machine often comes with its own Python holding torch (built for its CUDA), transformers and
the usual scientific stack, but no package index. `bash run.sh wheels DIR`, run beforehand on a machine
with one (this repository's `.venv/`, which has torch to build DeepSpeed with), fills DIR with what such
a Python lacks for training, evaluation and `gpu-check`, at the versions tested here (this
environment's), for the named Python version and platform (default CPython 3.12, manylinux x86_64):

- DeepSpeed, built from its source distribution as a pure-Python wheel (`DS_BUILD_OPS=0`: no compiled
  ops; torch's AdamW needs none, ZeRO-Offload's CPU Adam would JIT-compile on the GPU machine), and
  its dependencies hjson, pydantic (+ pydantic-core, annotated-types, typing-inspection,
  typing-extensions), py-cpuinfo, msgpack, einops, ninja and psutil;
- webdataset (+ braceexpand), the shards' format;
- transformers at the pinned version (the GPU machine's may be older);
- not wandb: without it runs log to metrics.jsonl only (`pretrain.metrics` says so and goes on).

Then it checks that the set installs on the target (`pip install --dry-run --target` for that Python
and platform, no index), that every requirement of a wheel is in the set or among `ASSUMED` (what a
machine with torch and transformers has), that there is one version of each package, and that DIR
plus the repository's files that travel with it stay under 64 MiB. On the GPU machine:

    CALM_PYTHON=python3 CALM_WHEELS=DIR bash run.sh gpu-check      # pip install --no-index --no-deps --target
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import zipfile
from importlib.metadata import version
from pathlib import Path

from packaging.markers import default_environment
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name, parse_wheel_filename

REPO = Path(__file__).resolve().parent.parent
BUILT = ("deepspeed",)
"""Published only as a source distribution: built here into a py3-none-any wheel."""
DOWNLOADED = ("hjson", "pydantic", "pydantic-core", "annotated-types", "typing-inspection", "typing-extensions",
              "py-cpuinfo", "msgpack", "einops", "ninja", "psutil", "webdataset", "braceexpand", "transformers")
ASSUMED = ("torch", "numpy", "packaging", "pyyaml", "tqdm", "regex", "huggingface-hub", "tokenizers", "safetensors",
           "typer", "filelock", "fsspec", "requests")
"""Present on any machine with torch and transformers (their versions are the machine's)."""
LIMIT_MIB = 64
MANYLINUX = ("manylinux_2_28", "manylinux_2_27", "manylinux_2_17", "manylinux2014", "manylinux_2_12",
             "manylinux2010", "manylinux_2_5", "manylinux1")


def target_flags(python: str, arch: str) -> list[str]:
    """pip's flags for a CPython `python` ("3.12") on manylinux `arch` wheels (or pure ones)."""
    abi = "cp" + python.replace(".", "")
    flags = ["--python-version", python, "--implementation", "cp", "--only-binary=:all:"]
    for a in (abi, "abi3", "none"):
        flags += ["--abi", a]
    for tag in MANYLINUX:
        flags += ["--platform", f"{tag}_{arch}"]
    return flags + ["--platform", "any"]


def pip(*args: str, **env: str) -> None:
    cmd = [sys.executable, "-m", "pip", "--disable-pip-version-check", *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, **env})
    if proc.returncode != 0:
        raise SystemExit(f"failed: {' '.join(cmd)}\n{proc.stderr[-3000:]}")


def fetch(out: Path, python: str, arch: str) -> None:
    """Download the binary/pure wheels for the target and build DeepSpeed's wheel from source."""
    pins = [f"{name}=={version(name)}" for name in DOWNLOADED]
    pip("download", "-q", "--no-deps", *target_flags(python, arch), "-d", str(out), *pins)
    with tempfile.TemporaryDirectory() as tmp:
        for name in BUILT:
            pip("download", "-q", "--no-deps", "--no-binary=:all:", "-d", tmp, f"{name}=={version(name)}")
        pip("wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(out),
            *[str(p) for p in Path(tmp).iterdir() if p.name.endswith((".tar.gz", ".zip"))], DS_BUILD_OPS="0")


def requirements(wheel: Path) -> list[str]:
    with zipfile.ZipFile(wheel) as zf:
        meta = next(n for n in zf.namelist() if n.endswith(".dist-info/METADATA"))
        lines = zf.read(meta).decode().splitlines()
    return [line.split(":", 1)[1].strip() for line in lines if line.startswith("Requires-Dist:")]


def check(out: Path, python: str, arch: str) -> list[str]:
    """Problems with the folder for this target (empty when it is a consistent, installable set)."""
    wheels = sorted(out.glob("*.whl"))
    versions: dict[str, list[str]] = {}
    for w in wheels:
        name, ver, _, _ = parse_wheel_filename(w.name)
        versions.setdefault(name, []).append(str(ver))
    problems = [f"{n}: several versions {v}" for n, v in versions.items() if len(v) > 1]
    env = dict(default_environment(), python_version=python, python_full_version=f"{python}.0",
               platform_machine=arch, sys_platform="linux", platform_system="Linux", extra="")
    for w in wheels:
        for text in requirements(w):
            req = Requirement(text)
            if req.marker is not None and not req.marker.evaluate(env):
                continue  # an extra, or another Python/platform
            name = canonicalize_name(req.name)
            if name in versions:
                if not req.specifier.contains(versions[name][0], prereleases=True):
                    problems.append(f"{w.name} needs {req}, the folder has {name} {versions[name][0]}")
            elif name not in ASSUMED:
                problems.append(f"{w.name} needs {req}: neither in the folder nor assumed on the GPU machine")
    with tempfile.TemporaryDirectory() as tmp:
        try:
            pip("install", "--dry-run", "-q", "--no-index", "--no-deps", "--target", tmp,
                *target_flags(python, arch), *map(str, wheels))
        except SystemExit as exc:
            problems.append(f"not installable for CPython {python} on {arch}: {exc}")
    return problems


def travel_bytes(out: Path) -> tuple[int, int]:
    """(bytes of the repository's files that travel with it: tracked and untracked-not-ignored, bytes of
    the wheels folder)."""
    listed = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=REPO, capture_output=True,
                            check=True).stdout.decode().split("\0")
    repo = sum((REPO / f).stat().st_size for f in listed if f and (REPO / f).is_file()
               and not (REPO / f).resolve().is_relative_to(out.resolve()))
    return repo, sum(w.stat().st_size for w in out.glob("*.whl"))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bash run.sh wheels", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("dir", type=Path, help="the wheels folder (emptied of older wheels first)")
    parser.add_argument("--python", default="3.12", help="the GPU machine's CPython version")
    parser.add_argument("--arch", default="x86_64", help="its processor (manylinux wheels)")
    parser.add_argument("--check-only", action="store_true", help="check an existing folder, fetch nothing")
    args = parser.parse_args(argv)
    args.dir.mkdir(parents=True, exist_ok=True)
    if not args.check_only:
        for old in args.dir.glob("*.whl"):
            old.unlink()
        fetch(args.dir, args.python, args.arch)
    problems = check(args.dir, args.python, args.arch)
    repo, wheels = travel_bytes(args.dir)
    if repo + wheels > LIMIT_MIB * 2**20:
        problems.append(f"repository {repo / 2**20:.1f} MiB + wheels {wheels / 2**20:.1f} MiB > {LIMIT_MIB} MiB")
    names = sorted(parse_wheel_filename(w.name)[0] for w in args.dir.glob("*.whl"))
    print(json.dumps({"dir": str(args.dir), "python": args.python, "arch": args.arch, "wheels": names,
                      "wheels_mib": round(wheels / 2**20, 1), "repository_mib": round(repo / 2**20, 1),
                      "assumed_on_target": list(ASSUMED), "problems": problems}, indent=1))
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
