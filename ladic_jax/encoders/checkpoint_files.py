"""Reading checkpoint tensors from a directory: safetensors (single or sharded) and PyTorch `.bin` files; writing
a single safetensors file (`write_safetensors`, for `export.py`).

Tensors come back as host numpy arrays keyed by their checkpoint names. Safetensors files are parsed here rather
than with `safetensors.numpy`, which cannot represent bfloat16; the format is a little-endian u64 header length, a
JSON header {name: {dtype, shape, data_offsets}}, then the raw bytes, so the reader is a memory map plus views.
`.bin` files are opened with `torch.load(weights_only=True)` (no arbitrary unpickling); torch is imported only then.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import ml_dtypes
import numpy as np

SAFETENSORS = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"
TORCH_BIN = "pytorch_model.bin"
TORCH_BIN_INDEX = "pytorch_model.bin.index.json"

_SAFETENSORS_DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_,
}


def read_safetensors(path: Path) -> dict[str, np.ndarray]:
    """All tensors of one .safetensors file as read-only numpy arrays backed by a memory map."""
    data = np.memmap(path, dtype=np.uint8, mode="r")
    if data.size < 8:
        raise ValueError(f"{path} is too short to be a safetensors file")
    (header_len,) = struct.unpack("<Q", data[:8].tobytes())
    if 8 + header_len > data.size:
        raise ValueError(f"{path}: safetensors header length {header_len} runs past the end of the file")
    header = json.loads(data[8:8 + header_len].tobytes())
    body = data[8 + header_len:]
    tensors = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        if info["dtype"] not in _SAFETENSORS_DTYPES:
            raise ValueError(f"{path}: tensor {name!r} has unsupported dtype {info['dtype']}")
        dtype = np.dtype(_SAFETENSORS_DTYPES[info["dtype"]])
        begin, end = info["data_offsets"]
        shape = tuple(info["shape"])
        if end - begin != dtype.itemsize * int(np.prod(shape, dtype=np.int64)):
            raise ValueError(f"{path}: tensor {name!r} byte range does not match shape {shape} x {dtype}")
        tensors[name] = body[begin:end].view(dtype).reshape(shape)
    return tensors


def write_safetensors(path: Path, tensors: dict[str, np.ndarray], metadata: dict[str, str] | None = None) -> None:
    """Writes `tensors` (name -> numpy array, bfloat16 included) as one safetensors file, names in sorted order.

    Like the reader, it assumes a little-endian host (the format's byte order).
    """
    tags = {np.dtype(dtype): tag for tag, dtype in _SAFETENSORS_DTYPES.items()}
    values = {name: np.asarray(tensors[name], order="C") for name in sorted(tensors)}  # (keeps 0-d shapes)
    header: dict = {"__metadata__": dict(metadata)} if metadata else {}
    offset = 0
    for name, value in values.items():
        if value.dtype not in tags:
            raise ValueError(f"tensor {name!r} has dtype {value.dtype}, which safetensors cannot store")
        header[name] = {"dtype": tags[value.dtype], "shape": list(value.shape),
                        "data_offsets": [offset, offset + value.nbytes]}
        offset += value.nbytes
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)  # the format pads the header with spaces to align the data
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(encoded)) + encoded)
        for value in values.values():
            f.write(value.tobytes())


def read_torch_bin(path: Path) -> dict[str, np.ndarray]:
    """A PyTorch state dict saved with `torch.save`, loaded with `weights_only=True`."""
    import torch  # only needed for .bin checkpoints

    state = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(state, dict):
        raise ValueError(f"{path} holds a {type(state).__name__}, expected a state dict (name -> tensor)")
    tensors = {}
    for name, value in state.items():
        if not isinstance(value, torch.Tensor):
            raise ValueError(
                f"{path}: entry {name!r} is a {type(value).__name__}, not a tensor; expected a flat state dict"
            )
        value = value.detach().cpu().contiguous()
        if value.dtype == torch.bfloat16:
            tensors[name] = value.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
        else:
            tensors[name] = value.numpy()
    return tensors


def _read_index(directory: Path, index_name: str) -> list[Path]:
    index = json.loads((directory / index_name).read_text())
    if "weight_map" not in index:
        raise ValueError(f"{directory / index_name} has no 'weight_map'")
    return [directory / f for f in sorted(set(index["weight_map"].values()))]


def read_checkpoint(directory: Path) -> tuple[dict[str, np.ndarray], list[Path]]:
    """All tensors of the checkpoint in `directory`, preferring safetensors over .bin; also the files read."""
    directory = Path(directory)
    if (directory / SAFETENSORS_INDEX).exists():
        files, reader = _read_index(directory, SAFETENSORS_INDEX), read_safetensors
    elif (directory / SAFETENSORS).exists():
        files, reader = [directory / SAFETENSORS], read_safetensors
    elif (directory / TORCH_BIN_INDEX).exists():
        files, reader = _read_index(directory, TORCH_BIN_INDEX), read_torch_bin
    elif (directory / TORCH_BIN).exists():
        files, reader = [directory / TORCH_BIN], read_torch_bin
    else:
        present = sorted(p.name for p in directory.iterdir()) if directory.is_dir() else []
        raise FileNotFoundError(
            f"no checkpoint in {directory}: expected {SAFETENSORS}, {SAFETENSORS_INDEX}, {TORCH_BIN} or "
            f"{TORCH_BIN_INDEX}; found {present}"
        )
    tensors: dict[str, np.ndarray] = {}
    for path in files:
        if not path.exists():
            raise FileNotFoundError(f"checkpoint shard {path} listed in the index is missing")
        for name, value in reader(path).items():
            if name in tensors:
                raise ValueError(f"tensor {name!r} appears in more than one shard of {directory}")
            tensors[name] = value
    return tensors, files
