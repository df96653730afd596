"""One loader for every model: built-in names, GGUF files, local directories and Hub ids share one code path.

Every name is first resolved to a local directory of safetensors weights; that directory is then
fingerprinted (for cache keys) and loaded with ``transformers`` as usual. Built-in names and user GGUF
files are converted once, by one converter, into such a directory under the cache folder.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from es_lightning.io import atomic_directory, atomic_write_json
from es_lightning.models.gguf_files import (
    GGUFModelFiles,
    find_gguf_files,
    gguf_architecture,
    gguf_files_in,
    gguf_sha256,
    is_gguf_path,
    join_gguf_parts,
)
from es_lightning.models.registry import BUILTIN_MODELS, BuiltinModel, find_gguf

log = logging.getLogger(__name__)

CACHE_ENV = "ES_LIGHTNING_CACHE"
FINGERPRINT_FILE = "es_lightning_fingerprint.json"
CONVERSION_FORMAT = 2
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
WEIGHT_SUFFIXES = {".json", ".jinja", ".safetensors", ".bin", ".model", ".txt"}  # the files a fingerprint reads


def default_cache_dir() -> Path:
    """``$ES_LIGHTNING_CACHE`` if set, else ``~/.cache/es_lightning``."""
    env = os.environ.get(CACHE_ENV)
    if env:
        return Path(env).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "es_lightning"


def _cpu_has_bfloat16() -> bool:
    """Whether the CPU computes bfloat16 natively (AVX512-BF16 or AMX); elsewhere torch emulates it, slower than
    float32."""
    try:
        flags = Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace")
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def dtype_name(dtype: str, device: str | torch.device = "cpu") -> str:
    """The concrete dtype name for a config value: ``auto`` is ``bfloat16`` on a GPU that supports it or a CPU with
    native bfloat16 (measured 2.5-10x faster there), else ``float32`` (3x faster than emulated bfloat16, measured)."""
    if dtype != "auto":
        return dtype
    if torch.device(device).type == "cuda":
        return "bfloat16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "float32"
    return "bfloat16" if _cpu_has_bfloat16() else "float32"


def resolve_dtype(dtype: str | torch.dtype, device: str | torch.device = "cpu") -> torch.dtype:
    """Map a config string (or ``auto``, see :func:`dtype_name`) to a torch dtype, with a clear error for unknown
    names."""
    if isinstance(dtype, torch.dtype):
        return dtype
    name = dtype_name(dtype, device)
    if name not in DTYPES:
        raise ValueError(f"Unknown dtype {dtype!r}: use one of {sorted(DTYPES) + ['auto']}.")
    return DTYPES[name]


def _read_record(folder: Path) -> dict | None:
    """The conversion record of ``folder`` if it is current and every file it lists is whole, else None."""
    try:
        record = json.loads((folder / FINGERPRINT_FILE).read_text())
    except (OSError, json.JSONDecodeError):
        return None
    if record.get("format") != CONVERSION_FORMAT:
        return None
    for name, size in record.get("files", {}).items():
        path = folder / name
        if not path.exists() or path.stat().st_size != size:
            return None
    return record


def _part_stats(model: GGUFModelFiles) -> list[dict]:
    """Path, size and mtime of every part: when these match the record, the GGUF is not hashed again."""
    stats = [(part.resolve(), part.stat()) for part in model.parts]
    return [{"path": str(path), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns} for path, stat in stats]


def _conversion_is_valid(folder: Path, model: GGUFModelFiles, sha256: str | None) -> bool:
    """Whether ``folder`` holds a whole conversion of exactly these GGUF bytes (hashing them only if needed)."""
    record = _read_record(folder)
    if record is None:
        return False
    stats = _part_stats(model)
    if record.get("gguf_parts") == stats:
        return True
    if (sha256 or gguf_sha256(model)) != record.get("gguf_sha256"):
        return False
    atomic_write_json(folder / FINGERPRINT_FILE, {**record, "gguf_parts": stats})  # same bytes, new path or mtime
    return True


@contextlib.contextmanager
def _conversion_lock(folder: Path) -> Iterator[None]:
    """Hold an exclusive lock beside ``folder``: two first runs never convert the same model at once."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    with open(folder.parent / f".{folder.name}.lock", "a") as lock:
        fcntl.flock(lock.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock.fileno(), fcntl.LOCK_UN)


def _cache_root(cache_dir: str | Path | None) -> Path:
    return Path(cache_dir) if cache_dir else default_cache_dir()


def convert_builtin(model: BuiltinModel, cache_dir: str | Path | None = None) -> Path:
    """Convert a built-in GGUF model once into ``<cache>/models/<name>-<version>``; return that directory."""
    cache_dir = _cache_root(cache_dir)
    folder = cache_dir / "models" / f"{model.name}-{model.version}"
    with _conversion_lock(folder):
        gguf = GGUFModelFiles(stem=model.name, parts=(find_gguf(model, cache_dir / "gguf"),))
        origin = {"builtin": model.name, "package": f"{model.package}=={model.version}"}
        return _convert_locked(gguf, folder, origin, sha256=None)


def convert_gguf_file(path: Path, cache_dir: str | Path | None = None) -> Path:
    """Convert a user's GGUF model (a ``.gguf`` file, or a folder holding one model's parts) once into
    ``<cache>/models/gguf-<stem>-<sha256[:12]>``; return that directory.

    A conversion whose record lists these files with the same sizes and mtimes is reused without hashing;
    otherwise the GGUF bytes are hashed, and a changed GGUF gets a new folder (the old one stays, unused).
    """
    gguf = find_gguf_files(path)
    models = _cache_root(cache_dir) / "models"
    stats = _part_stats(gguf)
    for folder in sorted(models.glob(f"gguf-{gguf.cache_stem}-*")):
        record = _read_record(folder)
        if record is not None and record.get("gguf_parts") == stats:
            return folder
    size = sum(stat["size"] for stat in stats)
    log.info("Hashing %s (%.2f GB) to find its conversion", gguf.display_name, size / 1e9)
    sha256 = gguf_sha256(gguf)
    folder = models / f"gguf-{gguf.cache_stem}-{sha256[:12]}"
    with _conversion_lock(folder):
        return _convert_locked(gguf, folder, {"source": stats[0]["path"]}, sha256)


def _dense_gguf_loading() -> dict:
    """``from_pretrained`` keywords that unpack every GGUF weight into a dense tensor (what safetensors holds).

    transformers releases that can keep GGUF blocks packed have ``GgufConfig(dequantize=...)``; older ones
    always unpack.
    """
    try:
        from transformers import GgufConfig
    except ImportError:
        return {}
    return {"quantization_config": GgufConfig(dequantize=True)}


def _check_architecture(gguf: Path, label: str) -> None:
    """Fail with the architecture's name when transformers cannot build a config from this GGUF."""
    import transformers
    from transformers import AutoConfig

    try:
        AutoConfig.from_pretrained(gguf.parent, gguf_file=gguf.name)
    except (ValueError, KeyError, NotImplementedError) as err:
        architecture = gguf_architecture(gguf)
        raise ValueError(
            f"{label} is a GGUF of architecture {architecture!r}, which transformers {transformers.__version__} "
            f"cannot load: transformers' GGUF support is what limits this ({type(err).__name__}: {err}). "
            f"Fix: use the model's original weights (a Hub id or a saved transformers folder), or a transformers "
            f"release whose GGUF loader knows {architecture!r}."
        ) from err


def _convert_locked(gguf: GGUFModelFiles, folder: Path, origin: dict[str, str], sha256: str | None) -> Path:
    """Convert ``gguf`` into ``folder`` unless a valid conversion is there; the caller holds the folder's lock.

    Built-ins and user files both come here. The directory appears atomically and its record holds the
    GGUF's sha256, each part's path, size and mtime, and every file's size, so a half-written or stale
    conversion is never used.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if _conversion_is_valid(folder, gguf, sha256):
        return folder
    label = origin.get("builtin") or gguf.display_name
    log.info(
        "Converting %s from GGUF to safetensors under %s (once; a 100 MB GGUF takes about a minute)", label, folder
    )
    start = time.time()
    stats = _part_stats(gguf)
    sha256 = sha256 or gguf_sha256(gguf)
    with tempfile.TemporaryDirectory(dir=folder.parent, prefix=f".{folder.name}.", suffix=".tmp") as work:
        whole = join_gguf_parts(gguf, Path(work))
        _check_architecture(whole, label)
        log.info("Reading and dequantizing the GGUF tensors of %s", label)
        source = AutoModelForCausalLM.from_pretrained(
            whole.parent, gguf_file=whole.name, dtype=torch.float32, **_dense_gguf_loading()
        )
        tokenizer = AutoTokenizer.from_pretrained(whole.parent, gguf_file=whole.name)
    # transformers refuses save_pretrained on a GGUF-loaded model: copy the weights into a fresh one.
    config = source.config
    if hasattr(config, "quantization_config"):  # the weights are saved dequantized: no GGUF loader on reload
        del config.quantization_config
    fresh = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = fresh.load_state_dict(source.state_dict(), strict=False)
    missing = [key for key in missing if key not in getattr(fresh, "_tied_weights_keys", []) and "lm_head" not in key]
    if missing or unexpected:
        raise RuntimeError(f"GGUF conversion of {label} lost weights: missing={missing} unexpected={unexpected}")
    del source
    log.info("Saving %s as float32 safetensors", label)
    with atomic_directory(folder) as tmp:
        fresh.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        record = {
            "format": CONVERSION_FORMAT,
            **origin,
            "gguf_sha256": sha256,
            "gguf_parts": stats,
            "files": {p.name: p.stat().st_size for p in sorted(tmp.iterdir())},
        }
        (tmp / FINGERPRINT_FILE).write_text(json.dumps(record, indent=2))
    log.info("Converted %s in %.0f s", label, time.time() - start)
    return folder


def resolve_model_dir(name: str, cache_dir: str | Path | None = None) -> Path:
    """Resolve a model name to a local directory of weights.

    In order: a built-in name; a ``.gguf`` file or a folder of ``.gguf`` files without ``config.json``
    (converted once into the cache); a folder with ``config.json``; else a Hub id.
    """
    if name in BUILTIN_MODELS:
        return convert_builtin(BUILTIN_MODELS[name], cache_dir)
    path = Path(name).expanduser()
    if is_gguf_path(path) and not path.exists():
        raise FileNotFoundError(
            f"The GGUF file {str(path)!r} does not exist (a relative path starts at the working directory "
            f"{os.getcwd()!r}). Fix: give the path of an existing .gguf file, best an absolute one."
        )
    if path.is_file() and is_gguf_path(path):
        return convert_gguf_file(path, cache_dir)
    if path.is_dir():
        if (path / "config.json").exists():
            return path
        if gguf_files_in(path):
            return convert_gguf_file(path, cache_dir)
        raise FileNotFoundError(
            f"The model directory {str(path)!r} has neither a config.json nor a .gguf file. Fix: point at a saved "
            f"transformers model folder, a .gguf file, or a folder holding one GGUF model."
        )
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(name, allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja"]))
    except Exception as err:  # any failure here means the name resolves nowhere
        raise ValueError(
            f"Model {name!r} resolves nowhere: it is not a built-in name ({', '.join(sorted(BUILTIN_MODELS))}), "
            f"not an existing .gguf file or local directory, and the Hub lookup failed ({type(err).__name__}: {err}). "
            f"Fix: use a built-in name, a .gguf file, a path to a saved transformers model, or a Hub id with network "
            f"access."
        ) from err


def fingerprint_model_dir(folder: Path) -> str:
    """A cheap content fingerprint of a model directory: config plus size and head/tail bytes of each weight file."""
    digest = hashlib.sha256()
    for path in sorted(folder.iterdir()):
        if path.suffix not in WEIGHT_SUFFIXES or path.name == FINGERPRINT_FILE:
            continue
        digest.update(path.name.encode())
        size = path.stat().st_size
        digest.update(str(size).encode())
        with open(path, "rb") as handle:
            digest.update(handle.read(1 << 20))
            if size > 2 << 20:
                handle.seek(-(1 << 20), os.SEEK_END)
                digest.update(handle.read(1 << 20))
    return digest.hexdigest()[:16]


@dataclass
class LoadedModel:
    """A model with its tokenizer, resolved directory and fingerprint."""

    name: str
    model: torch.nn.Module
    tokenizer: object
    directory: Path
    fingerprint: str


def load_model(
    name: str,
    cache_dir: str | Path | None = None,
    dtype: str | torch.dtype = "float32",
    device: str | torch.device = "cpu",
) -> LoadedModel:
    """Load a causal LM and its tokenizer from any name that :func:`resolve_model_dir` accepts, in eval mode."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = resolve_model_dir(name, cache_dir)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model: torch.nn.Module = AutoModelForCausalLM.from_pretrained(folder, dtype=resolve_dtype(dtype, device))
    model = model.to(device)  # called as nn.Module.to: transformers' @wraps(nn.Module.to) hides its bound type
    model.eval()
    return LoadedModel(
        name=name, model=model, tokenizer=tokenizer, directory=folder, fingerprint=fingerprint_model_dir(folder)
    )
