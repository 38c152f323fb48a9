"""Which files a bulk run covers: a folder (recursively), a glob, a manifest, or single files.

Local paths and anything `pyarrow.fs` opens (`s3://`, `gs://`, `hdfs://`, ...). Listing happens
once, in the driver; the CPU stage reads each file's bytes where it runs.
"""

from __future__ import annotations

import fnmatch
import glob
import os
from pathlib import Path

AUDIO_SUFFIXES = frozenset(
    {".wav", ".flac", ".mp3", ".m4a", ".aac", ".ogg", ".oga", ".opus", ".webm", ".mp4", ".mka",
     ".mkv", ".wma", ".aiff", ".aif", ".amr", ".3gp", ".caf"}
)
"""What a folder or glob listing keeps; a manifest or an explicit file is taken as given."""

MANIFEST_SUFFIXES = frozenset({".txt", ".lst", ".list", ".manifest", ".tsv", ".csv"})
"""An --input file with one of these suffixes is a list of paths, one a line (first column)."""


class InputError(ValueError):
    """An --input that names nothing we can list; the message says which and why."""


def is_remote(path: str) -> bool:
    return "://" in path and not path.startswith("file://")


def _strip_file_scheme(path: str) -> str:
    return path[len("file://"):] if path.startswith("file://") else path


def list_inputs(specs: list[str]) -> list[str]:
    """Every audio file the specs name, sorted and without duplicates."""
    found: list[str] = []
    for spec in specs:
        items = _list_one(spec)
        if not items:
            raise InputError(f"--input {spec!r} matches no audio files")
        found.extend(items)
    return sorted(dict.fromkeys(found))


def _list_one(spec: str) -> list[str]:
    if is_remote(spec):
        return _list_remote(spec)
    path = _strip_file_scheme(spec)
    if glob.has_magic(path):
        return [os.path.abspath(p) for p in glob.glob(path, recursive=True)
                if os.path.isfile(p) and _is_audio(p)]
    if os.path.isdir(path):
        return [str(p.resolve()) for p in Path(path).rglob("*") if p.is_file() and _is_audio(str(p))]
    if os.path.isfile(path):
        if Path(path).suffix.lower() in MANIFEST_SUFFIXES:
            return _read_manifest(path, Path(path).read_text(encoding="utf-8"), os.path.dirname(os.path.abspath(path)))
        return [os.path.abspath(path)]
    raise InputError(f"--input {spec!r}: no such file or folder")


def _is_audio(path: str) -> bool:
    return os.path.splitext(path)[1].lower() in AUDIO_SUFFIXES


def _read_manifest(name: str, text: str, base: str) -> list[str]:
    """One path per line (first tab/comma separated column); '#' comments and a `path` header skipped.
    Relative local paths are relative to the manifest's own folder."""
    out: list[str] = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        first = line.split("\t")[0].split(",")[0].strip()
        if first.lower() == "path":
            continue
        if is_remote(first):
            out.append(first)
        else:
            first = _strip_file_scheme(first)
            out.append(first if os.path.isabs(first) else os.path.normpath(os.path.join(base, first)))
    if not out:
        raise InputError(f"manifest {name!r} lists no paths")
    return out


def _list_remote(uri: str) -> list[str]:
    import pyarrow.fs as pafs

    scheme = uri.split("://", 1)[0] + "://"
    magic = glob.has_magic(uri)
    root_uri = uri.split("*", 1)[0].rsplit("/", 1)[0] if magic else uri
    fs, root = pafs.FileSystem.from_uri(root_uri)
    info = fs.get_file_info(root)
    if info.type == pafs.FileType.File and not magic:
        if os.path.splitext(root)[1].lower() in MANIFEST_SUFFIXES:
            with fs.open_input_stream(root) as fh:
                text = fh.read().decode("utf-8")
            return _read_manifest(uri, text, "")
        return [uri]
    if info.type != pafs.FileType.Directory:
        raise InputError(f"--input {uri!r}: no such file or folder")
    infos = fs.get_file_info(pafs.FileSelector(root, recursive=True))
    files = [scheme + i.path for i in infos if i.type == pafs.FileType.File and _is_audio(i.path)]
    if magic:
        files = [f for f in files if fnmatch.fnmatch(f, uri)]
    return files


def read_bytes(path: str) -> bytes:
    """The whole file, local or through pyarrow.fs."""
    if is_remote(path):
        import pyarrow.fs as pafs

        fs, inner = pafs.FileSystem.from_uri(path)
        with fs.open_input_stream(inner) as fh:
            return fh.read()
    with open(_strip_file_scheme(path), "rb") as fh:
        return fh.read()
