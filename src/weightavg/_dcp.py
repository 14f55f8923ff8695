"""Reading ``torch.distributed.checkpoint`` (DCP) directories safely, and exporting them for serving.

A DCP checkpoint is a directory with one ``.metadata`` file (a pickle of
:class:`torch.distributed.checkpoint.metadata.Metadata`) and data files (``__<rank>_<i>.distcp``)
in which every tensor chunk is a ``torch.save`` record at a byte offset. ``FileSystemReader``
unpickles ``.metadata`` with the plain :mod:`pickle`, so opening a checkpoint one did not write
runs whatever code it holds. Here the metadata goes through an unpickler that only builds the DCP
metadata classes, dtypes, ``torch.Size`` and paths (anything else is refused before it runs), tensor
records are read with ``torch.load(weights_only=True)``, and non-tensor entries (pickled objects)
are never read at all.

:func:`iter_dcp_tensors` yields the checkpoint's tensors whole, one at a time, assembled from the
chunks the ranks wrote (any number of ranks, uneven shards, replicas written once), so reading
costs about one tensor of memory whatever the model's size. :func:`export_dcp` streams them into a
safetensors file or a Hugging Face-style directory (sharded files plus an index), atomically.
"""

from __future__ import annotations

import io
import json
import os
import pickle
import re
from collections.abc import Callable, Generator, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, ClassVar

import torch
from torch import Tensor

from ._errors import WeightAvgError

__all__ = ["DCPReader", "DCPTensorInfo", "export_dcp", "is_dcp_checkpoint", "iter_dcp_tensors", "read_dcp_metadata"]

_METADATA = ".metadata"
_MAX_METADATA_BYTES = 256 << 20  # a pickle this large is not DCP metadata
_DEFAULT_SHARD = 5 * 10**9  # Hugging Face's default max_shard_size ("5GB")


def _checkpoint_error(message: str) -> WeightAvgError:
    # the CLI's error class, so `weightavg` reports these like other unreadable checkpoints
    from .cli._average import CheckpointError

    return CheckpointError(message)


# ----------------------------------------------------------------------------- safe metadata


def _allowed_globals() -> dict[tuple[str, str], Any]:
    import pathlib

    from torch.distributed.checkpoint import filesystem, metadata

    out: dict[tuple[str, str], Any] = {}
    for name in ("Metadata", "TensorStorageMetadata", "BytesStorageMetadata", "ChunkStorageMetadata",
                 "TensorProperties", "StorageMeta", "MetadataIndex", "_MEM_FORMAT_ENCODING"):
        out[("torch.distributed.checkpoint.metadata", name)] = getattr(metadata, name)
    out[("torch.distributed.checkpoint.filesystem", "_StorageInfo")] = filesystem._StorageInfo
    out[("torch", "Size")] = torch.Size
    out[("torch.serialization", "_get_layout")] = torch.serialization._get_layout
    out[("collections", "OrderedDict")] = __import__("collections").OrderedDict
    # StorageMeta.checkpoint_id is the path the writer was given
    for cls in ("PosixPath", "PurePosixPath", "WindowsPath", "PureWindowsPath", "Path"):
        out[("pathlib", cls)] = getattr(pathlib, cls)
    return out


class _MetadataUnpickler(pickle._Unpickler):
    """Builds DCP metadata and nothing else.

    Every global outside the allow-list is refused before it is called, and BUILD (set an
    object's state) only applies to *instances* of the allowed metadata classes: a pickle cannot
    set attributes on a class (which would change DCP's classes for the rest of the process) or
    on any other object. The pure-Python unpickler is used because it lets BUILD be checked.
    """

    dispatch: ClassVar[dict[int, Any]] = dict(pickle._Unpickler.dispatch)
    stack: list[Any]

    def __init__(self, file: IO[bytes], where: Path) -> None:
        super().__init__(file)
        self._allowed = _allowed_globals()
        self._buildable = tuple(cls for (mod, _), cls in self._allowed.items()
                                if mod.startswith("torch.distributed.checkpoint."))
        self._where = where

    def find_class(self, module: str, name: str) -> Any:
        obj = self._allowed.get((module, name))
        if obj is not None:
            return obj
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        raise _checkpoint_error(
            f"{self._where}: refusing to load {module}.{name}: a DCP metadata file holds only "
            "checkpoint metadata, and this one asks to build something else (it may run code). "
            "Only open checkpoints from a source you trust."
        )

    def persistent_load(self, pid: Any) -> Any:
        raise _checkpoint_error(f"{self._where}: unexpected persistent reference in DCP metadata")

    def _load_build(self) -> None:
        inst = self.stack[-2]  # BUILD pops the state and applies it to the object below
        if isinstance(inst, type) or not isinstance(inst, self._buildable):
            raise _checkpoint_error(
                f"{self._where}: refusing to set the state of {inst!r}: DCP metadata only sets the "
                "state of its own metadata objects"
            )
        pickle._Unpickler.load_build(self)  # type: ignore[attr-defined]

    dispatch[pickle.BUILD[0]] = _load_build


@dataclass(frozen=True)
class DCPTensorInfo:
    """One tensor of a DCP checkpoint: global shape, dtype, and the chunks the ranks wrote.

    ``chunks`` holds ``(offsets, sizes, relative_path, byte_offset, byte_length)`` per chunk.
    """

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    chunks: tuple[tuple[tuple[int, ...], tuple[int, ...], str, int, int], ...]

    @property
    def nbytes(self) -> int:
        """Size of the whole tensor in bytes."""
        n = 1
        for s in self.shape:
            n *= s
        return n * self.dtype.itemsize


def is_dcp_checkpoint(path: str | os.PathLike[str]) -> bool:
    """True if ``path`` is a directory holding a DCP ``.metadata`` file (nothing is read)."""
    p = Path(path)
    return p.is_dir() and (p / _METADATA).is_file()


def _inside(root: Path, rel: str, what: str) -> Path:
    """``root / rel`` if it names a regular file inside ``root`` (no absolute path, no ``..``, no
    symlink leading out)."""
    if not rel or os.path.isabs(rel) or any(part in ("..", "") for part in Path(rel).parts) or "\\" in rel:
        raise _checkpoint_error(f"{what}: data file {rel!r} is not a plain name inside the checkpoint")
    target = (root / rel).resolve()
    if not target.is_relative_to(root.resolve()):
        raise _checkpoint_error(f"{what}: data file {rel!r} leads outside the checkpoint directory")
    if not target.is_file():
        raise _checkpoint_error(f"{what}: data file {rel!r} is missing")
    return target


def _load_metadata(path: Path) -> Any:
    from torch.distributed.checkpoint.metadata import Metadata

    meta_file = path / _METADATA
    if not meta_file.is_file():
        raise _checkpoint_error(f"{path}: not a DCP checkpoint (no {_METADATA} file)")
    if meta_file.stat().st_size > _MAX_METADATA_BYTES:
        raise _checkpoint_error(f"{meta_file}: too large for DCP metadata")
    try:
        with open(meta_file, "rb") as f:
            md = _MetadataUnpickler(f, meta_file).load()
    except WeightAvgError:
        raise
    except Exception as err:  # truncated or malformed pickle, bad constructor arguments
        raise _checkpoint_error(f"{meta_file}: not readable DCP metadata ({type(err).__name__}: {err})") from err
    if not isinstance(md, Metadata) or not isinstance(md.state_dict_metadata, Mapping):
        raise _checkpoint_error(f"{meta_file}: does not hold DCP Metadata (got {type(md).__name__})")
    if not isinstance(md.storage_data, Mapping):
        raise _checkpoint_error(
            f"{meta_file}: no file index (storage_data); only checkpoints written by "
            "torch.distributed.checkpoint's FileSystemWriter can be read"
        )
    return md


def read_dcp_metadata(path: str | os.PathLike[str], *, prefix: str = "") -> dict[str, DCPTensorInfo]:
    """The tensors of a DCP checkpoint, by name, without reading any tensor data.

    Args:
        path: the checkpoint directory (the ``checkpoint_id`` given to ``dcp.save``).
        prefix: keep only names starting with it, and strip it (e.g. ``"averages.default."``).
            DCP names nested dictionaries by joining keys with dots.

    Returns:
        ``{name: DCPTensorInfo}`` in name order. Non-tensor entries (counters, configuration:
        stored pickled) are left out and never read.

    Raises:
        CheckpointError: not a DCP checkpoint, metadata asking to build anything but DCP metadata,
            a data file outside the directory, chunks that do not fit their tensor, or no tensor.
    """
    from torch.distributed.checkpoint.filesystem import _StorageInfo
    from torch.distributed.checkpoint.metadata import MetadataIndex, TensorStorageMetadata

    root = Path(path)
    md = _load_metadata(root)
    where: dict[tuple[str, tuple[int, ...]], Any] = {}
    for key, info in md.storage_data.items():
        if not isinstance(key, MetadataIndex) or not isinstance(info, _StorageInfo):
            raise _checkpoint_error(f"{root}: malformed DCP file index entry {key!r}")
        where[(key.fqn, tuple(key.offset) if key.offset is not None else ())] = info
    out: dict[str, DCPTensorInfo] = {}
    for fqn in sorted(md.state_dict_metadata):
        tmd = md.state_dict_metadata[fqn]
        if not isinstance(tmd, TensorStorageMetadata) or not fqn.startswith(prefix):
            continue
        name = fqn[len(prefix):]
        shape = tuple(int(s) for s in tmd.size)
        dtype = tmd.properties.dtype
        if not isinstance(dtype, torch.dtype) or any(s < 0 for s in shape):
            raise _checkpoint_error(f"{root}: tensor {fqn!r} has a malformed description")
        chunks = []
        covered = 0
        for c in tmd.chunks:
            offs, sizes = tuple(int(x) for x in c.offsets), tuple(int(x) for x in c.sizes)
            if len(offs) != len(shape) or len(sizes) != len(shape) or any(
                o < 0 or s < 0 or o + s > n for o, s, n in zip(offs, sizes, shape, strict=True)
            ):
                raise _checkpoint_error(
                    f"{root}: tensor {fqn!r}: chunk at {list(offs)} of size {list(sizes)} does not fit "
                    f"its shape {list(shape)}"
                )
            info = where.get((fqn, offs))
            if info is None:
                raise _checkpoint_error(f"{root}: tensor {fqn!r}: chunk at {list(offs)} has no data entry")
            if info.transform_descriptors:
                raise _checkpoint_error(
                    f"{root}: tensor {fqn!r} is stored transformed ({list(info.transform_descriptors)}); "
                    "only plain DCP checkpoints can be read"
                )
            _inside(root, str(info.relative_path), str(root))
            numel = 1
            for s in sizes:
                numel *= s
            covered += numel
            chunks.append((offs, sizes, str(info.relative_path), int(info.offset), int(info.length)))
        total = 1
        for s in shape:
            total *= s
        if covered != total:
            raise _checkpoint_error(
                f"{root}: tensor {fqn!r}: its chunks hold {covered} elements, its shape {list(shape)} needs {total}"
            )
        out[name] = DCPTensorInfo(name, shape, dtype, tuple(chunks))
    if not out:
        raise _checkpoint_error(
            f"{root}: no tensor" + (f" under prefix {prefix!r}" if prefix else "") + " in this DCP checkpoint"
        )
    return out


# ----------------------------------------------------------------------------- tensor data


class _FileSlice(io.RawIOBase):
    """A read-only, seekable window [start, start + length) of an open file."""

    def __init__(self, f: IO[bytes], start: int, length: int) -> None:
        super().__init__()
        self._f, self._start, self._len, self._pos = f, start, length, 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, pos: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: self._len}[whence]
        self._pos = max(0, min(self._len, base + pos))
        return self._pos

    def readinto(self, b: Any) -> int:
        n = min(len(b), self._len - self._pos)
        if n <= 0:
            return 0
        self._f.seek(self._start + self._pos)
        got = self._f.readinto(memoryview(b)[:n])  # type: ignore[attr-defined]
        self._pos += got or 0
        return got or 0


def _read_chunk(f: IO[bytes], info: DCPTensorInfo, chunk: tuple[Any, ...], where: str) -> Tensor:
    _offs, sizes, _rel, start, length = chunk
    f.seek(start)
    if f.read(4) != b"PK\x03\x04":
        raise _checkpoint_error(
            f"{where}: tensor {info.name!r}: chunk is not a torch.save record (only DCP's default "
            "torch_save serialization can be read)"
        )
    try:
        t = torch.load(io.BufferedReader(_FileSlice(f, start, length)), map_location="cpu", weights_only=True)
    except Exception as err:
        raise _checkpoint_error(
            f"{where}: tensor {info.name!r}: unreadable chunk ({type(err).__name__}: {err})"
        ) from err
    if not isinstance(t, Tensor) or tuple(t.shape) != tuple(sizes) or t.dtype != info.dtype:
        got = f"{t.dtype} {list(t.shape)}" if isinstance(t, Tensor) else type(t).__name__
        raise _checkpoint_error(
            f"{where}: tensor {info.name!r}: chunk holds {got}, expected {info.dtype} {list(sizes)}"
        )
    return t


def _assemble(root: Path, info: DCPTensorInfo, files: dict[str, IO[bytes]]) -> Tensor:
    whole = len(info.chunks) == 1 and info.chunks[0][1] == info.shape
    out = None if whole else torch.zeros(info.shape, dtype=info.dtype)
    for chunk in info.chunks:
        rel = chunk[2]
        if rel not in files:
            files[rel] = open(_inside(root, rel, str(root)), "rb")  # noqa: SIM115 - closed by the caller
        t = _read_chunk(files[rel], info, chunk, str(root))
        if out is None:
            return t.contiguous()
        view = out
        for d, (o, s) in enumerate(zip(chunk[0], chunk[1], strict=True)):
            view = view.narrow(d, o, s)
        view.copy_(t)
        del t
    assert out is not None
    return out


def iter_dcp_tensors(
    path: str | os.PathLike[str], *, prefix: str = "", names: list[str] | None = None
) -> Generator[tuple[str, Tensor], None, None]:
    """Yield ``(name, tensor)`` for each tensor of a DCP checkpoint, whole, one at a time.

    Each tensor is assembled from the chunks every rank wrote (uneven shards, any number of
    ranks; replicated tensors are stored once), on the CPU, in the dtype it was saved in. Only one
    tensor (plus one chunk being read) is in memory at a time: drop each before taking the next.

    Args:
        path: the checkpoint directory.
        prefix: keep only names starting with it, and strip it.
        names: read only these (stripped) names, in this order (default: all, in name order).

    Raises:
        CheckpointError: as :func:`read_dcp_metadata`; or a chunk that is not a tensor of the
            described shape and dtype; or an unknown name in ``names``.
    """
    with DCPReader(path, prefix=prefix) as reader:
        if names is None:
            names = list(reader.infos)
        unknown = [n for n in names if n not in reader.infos]
        if unknown:
            raise _checkpoint_error(f"{reader.path}: no tensor named {unknown[:5]} in this DCP checkpoint")
        for n in names:
            yield n, reader.read(n)


class DCPReader:
    """Random access to the tensors of a DCP checkpoint, one whole tensor per :meth:`read`.

    The metadata is read once (safely, see :func:`read_dcp_metadata`); data files are opened on
    first use and kept open until :meth:`close` (or the end of a ``with`` block). Each
    :meth:`read` assembles one tensor from its chunks and keeps no reference to it.

    Args:
        path: the checkpoint directory.
        prefix: only names starting with it, stripped.

    Raises:
        CheckpointError: as :func:`read_dcp_metadata`.
    """

    def __init__(self, path: str | os.PathLike[str], *, prefix: str = "") -> None:
        self.path = Path(path)
        self.infos: dict[str, DCPTensorInfo] = read_dcp_metadata(self.path, prefix=prefix)
        self._files: dict[str, IO[bytes]] = {}

    def read(self, name: str) -> Tensor:
        """The whole tensor ``name`` (CPU, saved dtype).

        Raises:
            CheckpointError: an unknown name, or a chunk that is not the described tensor.
        """
        info = self.infos.get(name)
        if info is None:
            raise _checkpoint_error(f"{self.path}: no tensor named {name!r} in this DCP checkpoint")
        return _assemble(self.path, info, self._files)

    def close(self) -> None:
        """Close the data files (the reader can still be used: they reopen on demand)."""
        files, self._files = self._files, {}
        for f in files.values():
            f.close()

    def __enter__(self) -> DCPReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# ----------------------------------------------------------------------------- export

_ST_DTYPES = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
    torch.bool: "BOOL", torch.float8_e4m3fn: "F8_E4M3", torch.float8_e5m2: "F8_E5M2",
    torch.uint16: "U16", torch.uint32: "U32", torch.uint64: "U64",
}


def _size_arg(value: int | str | None) -> int:
    if value is None:
        return _DEFAULT_SHARD
    if isinstance(value, int) and not isinstance(value, bool) and value > 0:
        return value
    if isinstance(value, str):
        m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B|B)?\s*", value, re.IGNORECASE)
        if m:
            unit = (m.group(2) or "B").upper()
            scale = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
                     "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}[unit]
            n = int(float(m.group(1)) * scale)
            if n > 0:
                return n
    from ._errors import bad_arg

    raise bad_arg("max_shard_size", value, 'a positive number of bytes or a size such as "5GB" or "500MiB"')


def _plan_shards(infos: list[DCPTensorInfo], nbytes: dict[str, int], limit: int) -> list[list[DCPTensorInfo]]:
    shards: list[list[DCPTensorInfo]] = [[]]
    size = 0
    for info in infos:
        if shards[-1] and size + nbytes[info.name] > limit:
            shards.append([])
            size = 0
        shards[-1].append(info)
        size += nbytes[info.name]
    return shards


def _write_safetensors(
    file: Path, items: list[DCPTensorInfo], tensors: Iterator[tuple[str, Tensor]],
    dtypes: dict[str, torch.dtype], metadata: dict[str, str],
) -> None:
    """Write one safetensors file from a stream of tensors whose shapes are known in advance."""
    header: dict[str, Any] = {"__metadata__": metadata} if metadata else {}
    off = 0
    for info in items:
        dt = dtypes[info.name]
        n = info.nbytes // info.dtype.itemsize * dt.itemsize
        header[info.name] = {"dtype": _ST_DTYPES[dt], "shape": list(info.shape), "data_offsets": [off, off + n]}
        off += n
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    with open(file, "wb") as f:
        f.write(len(raw).to_bytes(8, "little"))
        f.write(raw)
        for info in items:
            name, t = next(tensors)
            assert name == info.name
            t = t.to(dtypes[name]).contiguous()
            if t.numel():
                f.write(t.reshape(-1).view(torch.uint8).numpy().data)
            del t
        f.flush()
        os.fsync(f.fileno())


def export_dcp(
    path: str | os.PathLike[str],
    output: str | os.PathLike[str],
    *,
    prefix: str = "",
    dtype: torch.dtype | Mapping[torch.dtype, torch.dtype] | None = None,
    max_shard_size: int | str | None = None,
    metadata: Mapping[str, str] | None = None,
    force: bool = False,
) -> Path:
    """Write the tensors of a DCP checkpoint as safetensors, streaming one tensor at a time.

    Peak memory is about the largest tensor (plus one chunk being read), never the model: each
    tensor is assembled from the ranks' chunks, converted, written and dropped before the next.

    Args:
        path: the DCP checkpoint directory.
        output: a ``*.safetensors`` file, or a directory (Hugging Face layout: ``model.safetensors``,
            or ``model-0000i-of-0000N.safetensors`` files plus ``model.safetensors.index.json``
            when the tensors exceed ``max_shard_size``).
        prefix: export only names starting with it, stripped (e.g. the averages of one rule).
        dtype: convert floating-point tensors to this dtype (e.g. ``torch.bfloat16`` for serving),
            or a mapping source dtype -> output dtype; other tensors keep their dtype.
        max_shard_size: bytes per file in a directory output (int, or "5GB", "500MiB"); default 5GB.
        metadata: string pairs stored in each file's ``__metadata__`` (``format: pt`` is added).
        force: replace ``output`` if it exists.

    Returns:
        The output path. It appears in one rename: on any failure nothing is left behind.

    Raises:
        CheckpointError: unreadable or unsafe checkpoint (see :func:`read_dcp_metadata`).
        weightavg._files.OutputError: the output exists (without ``force``), is inside or contains
            the checkpoint, or cannot be written; nothing is replaced then.
        ConfigError: a bad ``dtype``, ``max_shard_size`` or ``metadata``.
    """
    from ._errors import bad_arg

    root, out = Path(path), Path(output)
    limit = _size_arg(max_shard_size)
    if metadata is not None and not (isinstance(metadata, Mapping) and all(
            isinstance(k, str) and isinstance(v, str) for k, v in metadata.items())):
        raise bad_arg("metadata", metadata, "a mapping of str -> str")
    meta = {"format": "pt", **(dict(metadata) if metadata else {})}
    infos = list(read_dcp_metadata(root, prefix=prefix).values())
    dtypes: dict[str, torch.dtype] = {}
    for info in infos:
        target = info.dtype
        if info.dtype.is_floating_point:
            if isinstance(dtype, torch.dtype):
                target = dtype
            elif isinstance(dtype, Mapping):
                target = dtype.get(info.dtype, info.dtype)
            elif dtype is not None:
                raise bad_arg("dtype", dtype, "a torch.dtype, a mapping dtype -> dtype, or None")
        if target not in _ST_DTYPES:
            raise _checkpoint_error(f"{root}: tensor {info.name!r} is {target}, which safetensors cannot store")
        dtypes[info.name] = target
    if root.resolve() == out.resolve() or out.resolve().is_relative_to(root.resolve()):
        raise _checkpoint_error(f"{out} is inside the checkpoint {root}: choose another output")

    write_stream(out, infos, dtypes, lambda names: iter_dcp_tensors(root, prefix=prefix, names=names), meta,
                 limit=limit, force=force, inputs=[root])
    return out



def write_stream(
    out: Path, infos: list[DCPTensorInfo], dtypes: dict[str, torch.dtype],
    open_stream: Callable[[list[str]], Generator[tuple[str, Tensor], None, None]], meta: dict[str, str], *,
    limit: int = _DEFAULT_SHARD, force: bool = False, inputs: Sequence[Path] = (),
) -> None:
    """Write tensors produced one at a time as safetensors, atomically (what :func:`export_dcp` writes).

    ``out`` ending in ``.safetensors`` is one file; anything else a directory (``model.safetensors``
    or ``model-0000i-of-0000N.safetensors`` files of at most ``limit`` bytes plus
    ``model.safetensors.index.json``). ``infos`` give each tensor's shape in output order (the
    headers are written before the data), ``dtypes`` the dtype written; ``open_stream(names)``
    must yield ``(name, tensor)`` for exactly those names in that order.

    Raises:
        weightavg._files.OutputError: as :func:`weightavg._files.atomic_output`.
    """
    from ._files import _umask, atomic_output

    if out.suffix == ".safetensors":
        with atomic_output(out, force=force, inputs=inputs) as tmp:
            stream = open_stream([i.name for i in infos])
            try:
                _write_safetensors(tmp, infos, stream, dtypes, meta)
            finally:
                stream.close()
        return
    nbytes = {i.name: i.nbytes // i.dtype.itemsize * dtypes[i.name].itemsize for i in infos}
    shards = _plan_shards(infos, nbytes, limit)
    with atomic_output(out, directory=True, force=force, inputs=inputs) as tmp:
        stream = open_stream([i.name for s in shards for i in s])
        try:
            if len(shards) == 1:
                _write_safetensors(tmp / "model.safetensors", shards[0], stream, dtypes, meta)
            else:
                weight_map: dict[str, str] = {}
                for k, shard in enumerate(shards, 1):
                    fname = f"model-{k:05d}-of-{len(shards):05d}.safetensors"
                    _write_safetensors(tmp / fname, shard, stream, dtypes, meta)
                    weight_map.update({i.name: fname for i in shard})
                index = {"metadata": {"total_size": sum(nbytes.values())}, "weight_map": weight_map}
                (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
        finally:
            stream.close()
        for p in tmp.iterdir():
            os.chmod(p, 0o644 & ~_umask())
