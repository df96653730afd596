"""A user's GGUF model: one ``.gguf`` file, or the numbered parts of one model, found, hashed and joined.

Parts follow llama.cpp's naming, ``<stem>-00001-of-00004.gguf``. They are either ``gguf-split`` shards
(each part is a GGUF of its own; the first holds the metadata) or byte chunks of one file (only the first
starts with the GGUF magic bytes); :func:`join_gguf_parts` turns both into one GGUF file for transformers.
"""

from __future__ import annotations

import hashlib
import logging
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

GGUF_MAGIC = b"GGUF"
SPLIT_PART = re.compile(r"^(?P<stem>.+)-(?P<index>\d{5})-of-(?P<count>\d{5})\.gguf$", re.IGNORECASE)


@dataclass(frozen=True)
class GGUFModelFiles:
    """The file or files holding one GGUF model, parts in order."""

    stem: str
    parts: tuple[Path, ...]

    @property
    def display_name(self) -> str:
        """The file name, or the first part's name with the part count."""
        first = self.parts[0].name
        return first if len(self.parts) == 1 else f"{first} ({len(self.parts)} parts)"

    @property
    def cache_stem(self) -> str:
        """The stem with everything but letters, digits, ``.``, ``_`` and ``-`` replaced, for a folder name."""
        return re.sub(r"[^A-Za-z0-9._-]", "_", self.stem)


def is_gguf_path(path: Path) -> bool:
    """Whether a path names a GGUF file by its suffix (case-insensitive)."""
    return path.suffix.lower() == ".gguf"


def gguf_files_in(folder: Path) -> list[Path]:
    """The ``.gguf`` files directly inside ``folder``, sorted by name."""
    return sorted(path for path in folder.iterdir() if path.is_file() and is_gguf_path(path))


def _model_key(path: Path) -> tuple[str, int]:
    """(stem, part count) of a file: parts of one model share a key; a single file has count 0."""
    split = SPLIT_PART.match(path.name)
    return (split["stem"], int(split["count"])) if split else (path.stem, 0)


def _part_index(path: Path) -> int:
    """The index of a part (``x-00002-of-00003.gguf`` -> 2)."""
    split = SPLIT_PART.match(path.name)
    assert split is not None, path  # only files named like a part have a part count, so only they get here
    return int(split["index"])


def find_gguf_files(path: Path) -> GGUFModelFiles:
    """The one GGUF model that a ``.gguf`` file or a folder of ``.gguf`` files holds.

    A file named like a part (``x-00001-of-00003.gguf``) brings its sibling parts. A folder must hold one
    model: a single file, or every part of one split model.
    """
    folder = path.parent if path.is_file() else path
    if path.is_file() and not _model_key(path)[1]:
        candidates = [path]
    elif path.is_file():
        candidates = [file for file in gguf_files_in(folder) if _model_key(file) == _model_key(path)]
    else:
        candidates = gguf_files_in(folder)
    models: dict[tuple[str, int], list[Path]] = {}
    for file in candidates:
        models.setdefault(_model_key(file), []).append(file)
    if len(models) > 1:
        listing = "\n".join(
            f"  {files[0].name}" + (f" (+{len(files) - 1} more parts)" if count else "")
            for (_, count), files in models.items()
        )
        raise ValueError(
            f"The folder {str(folder)!r} holds {len(models)} different GGUF models:\n{listing}\n"
            f"Fix: name the file to use as the model (data.expert.name or data.target.name), e.g. "
            f"{folder / next(iter(models.values()))[0].name}"
        )
    (stem, count), parts = next(iter(models.items()))
    if count:
        indices = {_part_index(part) for part in parts}
        missing = sorted(set(range(1, count + 1)) - indices)
        if missing:
            raise FileNotFoundError(
                f"The GGUF model {stem!r} in {str(folder)!r} is split in {count} parts but part(s) "
                f"{', '.join(map(str, missing))} are missing. Fix: download every part into that folder."
            )
        parts.sort(key=_part_index)
    with open(parts[0], "rb") as handle:
        if handle.read(len(GGUF_MAGIC)) != GGUF_MAGIC:
            raise ValueError(
                f"{str(parts[0])!r} does not start with the GGUF magic bytes, so it is not a GGUF file (a Git LFS "
                f"pointer or an interrupted download?). Fix: download the file again (`git lfs pull` in a clone)."
            )
    return GGUFModelFiles(stem=stem, parts=tuple(parts))


def gguf_sha256(model: GGUFModelFiles, chunk: int = 1 << 22) -> str:
    """Hex sha256 of the bytes of all parts in order (for one file: that file's sha256)."""
    digest = hashlib.sha256()
    for part in model.parts:
        with open(part, "rb") as handle:
            for block in iter(lambda: handle.read(chunk), b""):
                digest.update(block)
    return digest.hexdigest()


def gguf_architecture(path: Path) -> str:
    """The ``general.architecture`` a GGUF file states."""
    import gguf

    field = gguf.GGUFReader(path).get_field(gguf.Keys.General.ARCHITECTURE)
    return field.contents() if field is not None else "(none stated)"


def join_gguf_parts(model: GGUFModelFiles, work_dir: Path) -> Path:
    """One GGUF file holding the whole model: the file itself, or its parts joined into ``work_dir``."""
    if len(model.parts) == 1:
        return model.parts[0]
    target = work_dir / f"{model.cache_stem}.gguf"
    log.info("Joining the %d parts of %s into one GGUF file", len(model.parts), model.stem)
    with open(model.parts[1], "rb") as handle:
        shards = handle.read(len(GGUF_MAGIC)) == GGUF_MAGIC
    if shards:
        _merge_shards(model.parts, target)
    else:
        with open(target, "wb") as out:
            for part in model.parts:
                with open(part, "rb") as chunk:
                    shutil.copyfileobj(chunk, out, 1 << 22)
    return target


def _merge_shards(parts: tuple[Path, ...], target: Path) -> None:
    """Write llama.cpp ``gguf-split`` shards as one GGUF: the first shard's metadata, every shard's tensors."""
    import gguf

    readers = [gguf.GGUFReader(part) for part in parts]
    first = readers[0]
    architecture_field = first.get_field(gguf.Keys.General.ARCHITECTURE)
    if architecture_field is None:
        raise ValueError(
            f"{str(parts[0])!r} has no {gguf.Keys.General.ARCHITECTURE} field, so it is not the first "
            f"shard of a gguf-split model. Fix: download every part of the model again."
        )
    architecture = architecture_field.contents()
    writer = gguf.GGUFWriter(target, architecture, endianess=first.endianess)
    alignment = first.get_field(gguf.Keys.General.ALIGNMENT)
    if alignment is not None:
        writer.data_alignment = alignment.contents()
    for field in first.fields.values():
        # the writer adds the architecture itself; GGUF.* are the reader's header fields; split.* describe the shards
        if field.name == gguf.Keys.General.ARCHITECTURE or field.name.startswith(("GGUF.", "split.")):
            continue
        value_type = field.types[0]
        sub_type = field.types[-1] if value_type == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(field.name, field.contents(), value_type, sub_type=sub_type)
    tensors = [(tensor, reader.endianess) for reader in readers for tensor in reader.tensors]
    for tensor, _ in tensors:
        data = tensor.data
        writer.add_tensor_info(tensor.name, data.shape, data.dtype, data.nbytes, tensor.tensor_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    for tensor, endianess in tensors:
        writer.write_tensor_data(tensor.data, tensor_endianess=endianess)
    writer.close()
