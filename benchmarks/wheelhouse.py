#!/usr/bin/env python
"""The wheelhouse a GPU machine without a package registry installs megacoach's dependencies from.

Such a machine brings its own CUDA build of torch (and accelerate, peft, numpy, pandas, pyarrow, matplotlib,
tensorboard, ...), but not every package megacoach needs, and an older transformers than it needs. The wheelhouse
holds, for CPython 3.12 on manylinux x86_64, every dependency of megacoach (pyproject.toml) and of the TRL bench
(trl, datasets) with their own dependencies, never a torch build, never a CUDA library:

  python benchmarks/wheelhouse.py build [DIR]   resolve and download them here (a machine with a registry);
                                                 `make wheelhouse` runs it (DIR default .wheelhouse, git-ignored)
  python benchmarks/wheelhouse.py check [DIR]   what is wrong with DIR (one line each; exit 1 if anything): a
                                                 missing requirement, a wheel that is not for cp312 manylinux
                                                 x86_64, a torch or CUDA wheel, transformers older than megacoach
                                                 needs, two versions of one package
  python benchmarks/wheelhouse.py requirements  the requirement lines the GPU check installs from it

Standard library plus `packaging` (present wherever pip is), so that it runs on the GPU machine too.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import tempfile
import tomllib
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name, parse_wheel_filename

ROOT = Path(__file__).resolve().parent.parent
PYTHON = "3.12"
# what the GPU machine brings (its image's package list) and the check must not replace: torch and what is built
# against it; the installs ask for these by name only where megacoach's requirement says so
MACHINE_HAS = {"torch", "triton", "accelerate", "peft"}
# large packages the machine's image has at versions megacoach accepts: left out to keep the wheelhouse small
# (the device tool carries 64 MiB, project included)
LEFT_OUT = {"numpy", "pandas", "pyarrow", "scipy", "sympy", "networkx", "pillow", "matplotlib", "tensorboard",
            "tensorboard-data-server", "grpcio", "protobuf", "fonttools", "kiwisolver", "contourpy", "pyyaml",
            "markupsafe", "jinja2", "fsspec", "aiohttp", "yarl", "multidict", "frozenlist", "propcache",
            "aiosignal", "aiohappyeyeballs", "hf-xet", "psutil", "rich",
            "pygments", "markdown-it-py", "mdurl", "requests", "urllib3", "certifi", "idna", "charset-normalizer",
            "tqdm", "filelock", "packaging", "typing-extensions", "setuptools", "xxhash", "lxml", "cython"}
PEER = ["trl==1.12.0"]  # the TRL bench's trainer (installed without its dependencies: they would bring a torch)
PEER_DEPS = ["datasets>=3.0"]
PLATFORMS = ["manylinux_2_17_x86_64", "manylinux2014_x86_64", "manylinux_2_24_x86_64", "manylinux_2_27_x86_64",
             "manylinux_2_28_x86_64", "manylinux_2_31_x86_64", "manylinux_2_34_x86_64", "manylinux_2_35_x86_64",
             "manylinux1_x86_64", "any"]
MIN_TRANSFORMERS = "5.24"


def requirements() -> list[Requirement]:
    """megacoach's dependencies (pyproject.toml) that the GPU machine must get from the wheelhouse (not its
    torch, accelerate or peft), plus the TRL bench's datasets."""
    meta = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    reqs = [Requirement(line) for line in meta["dependencies"] + PEER_DEPS]
    return [r for r in reqs if canonicalize_name(r.name) not in MACHINE_HAS]


def wheel_fits(filename: str) -> bool:
    """Whether a wheel installs on CPython 3.12, manylinux x86_64."""
    _, _, _, tags = parse_wheel_filename(filename)
    for t in tags:
        py_ok = t.interpreter in ("py3", "py312", "cp312") or (t.interpreter.startswith("cp3") and t.abi == "abi3")
        abi_ok = t.abi in ("none", "abi3", "cp312")
        plat_ok = t.platform == "any" or (t.platform.startswith("manylinux") and t.platform.endswith("x86_64"))
        if py_ok and abi_ok and plat_ok:
            return True
    return False


def check(folder: Path) -> list[str]:
    """Problems with a wheelhouse (empty: ready)."""
    if not folder.is_dir():
        return [f"{folder}: no such folder (make wheelhouse builds it)"]
    wheels = sorted(p.name for p in folder.glob("*.whl"))
    if not wheels:
        return [f"{folder}: no wheels in it (make wheelhouse builds it)"]
    problems, versions = [], {}
    for w in wheels:
        try:
            name, version, _, _ = parse_wheel_filename(w)
        except ValueError as err:
            problems.append(f"{w}: not a wheel name ({err})")
            continue
        if name in MACHINE_HAS or name.startswith("nvidia-"):
            problems.append(f"{w}: the GPU machine's own {name} must stay (never carry torch or CUDA libraries)")
        if not wheel_fits(w):
            problems.append(f"{w}: not for CPython {PYTHON} on manylinux x86_64")
        versions.setdefault(name, []).append(str(version))
    for name, vs in versions.items():
        if len(vs) > 1:
            problems.append(f"{name}: {len(vs)} versions ({', '.join(vs)}); pip would refuse the install")
    for r in requirements() + [Requirement(p) for p in PEER]:
        name = canonicalize_name(r.name)
        if name in LEFT_OUT:
            continue
        have = versions.get(name)
        if not have:
            problems.append(f"{r}: no wheel")
        elif not any(r.specifier.contains(v, prereleases=True) for v in have):
            problems.append(f"{r}: only {', '.join(have)}")
    tf = versions.get("transformers", [])
    if tf and not any(Requirement(f"transformers>={MIN_TRANSFORMERS}").specifier.contains(v) for v in tf):
        problems.append(f"transformers {tf[0]}: megacoach needs >= {MIN_TRANSFORMERS}")
    return problems


def build(folder: Path) -> int:
    """Resolve megacoach's dependencies for cp312 manylinux x86_64 (pip's resolver, nothing installed) and download
    the wheels, less what the GPU machine has (MACHINE_HAS, LEFT_OUT), plus the TRL bench's trl without its
    dependencies."""
    folder.mkdir(parents=True, exist_ok=True)
    plat = ["--only-binary=:all:", "--python-version", PYTHON, "--implementation", "cp", "--abi",
            "cp" + PYTHON.replace(".", "")]
    for p in PLATFORMS:
        plat += ["--platform", p]
    pip = [sys.executable, "-m", "pip"]
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "report.json"
        subprocess.run(pip + ["install", "--dry-run", "--ignore-installed", "--quiet", "--report", str(report),
                              "--target", str(Path(tmp) / "t"), *plat, *map(str, requirements())], check=True)
        pins = []
        for item in json.loads(report.read_text())["install"]:
            name = canonicalize_name(item["metadata"]["name"])
            if name in MACHINE_HAS or name in LEFT_OUT or name.startswith("nvidia-"):
                continue
            pins.append(f"{item['metadata']['name']}=={item['metadata']['version']}")
        subprocess.run(pip + ["download", "--no-deps", "--quiet", "-d", str(folder), *plat, *pins, *PEER], check=True)
    problems = check(folder)
    size = sum(p.stat().st_size for p in folder.glob("*.whl")) / 2**20
    print(f"wheelhouse {folder}: {len(list(folder.glob('*.whl')))} wheels, {size:.1f} MiB")
    for p in problems:
        print(f"  problem: {p}")
    return 1 if problems else 0


def main(argv: list[str]) -> int:
    if not argv or argv[0] not in ("build", "check", "requirements"):
        print(__doc__)
        return 2
    folder = Path(argv[1]) if len(argv) > 1 else ROOT / ".wheelhouse"
    if argv[0] == "requirements":
        print("\n".join(re.sub(r"\s+", "", str(r)) for r in requirements()))
        return 0
    if argv[0] == "build":
        return build(folder)
    problems = check(folder)
    for p in problems:
        print(p)
    if not problems:
        print(f"wheelhouse {folder}: ready ({len(list(folder.glob('*.whl')))} wheels)")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
