"""Reading a local checkpoint folder: config.json and (possibly sharded) safetensors, validated before use.

The safetensors headers are parsed here (not only through `safe_open`) so that a truncated or corrupt
file is reported as one line naming the file, before any conversion starts.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open

from ..errors import ImpqError

_DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}


def read_json(path: Path, what: str) -> dict:
    if not path.is_file():
        raise ImpqError(path, f"missing {what}")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ImpqError(path, f"{what} is not valid JSON ({err})") from None
    if not isinstance(data, dict):
        raise ImpqError(path, f"{what} must hold a JSON object")
    return data


@dataclass(frozen=True)
class TensorInfo:
    file: Path
    dtype: str
    shape: tuple[int, ...]


def _read_header(path: Path) -> dict[str, TensorInfo]:
    try:
        size = path.stat().st_size
        with open(path, "rb") as handle:
            raw_len = handle.read(8)
            if len(raw_len) < 8:
                raise ImpqError(path, "truncated safetensors file (no header)")
            (header_len,) = struct.unpack("<Q", raw_len)
            if header_len > min(size - 8, 100 << 20):
                raise ImpqError(path, "corrupt safetensors file (header length out of range)")
            header = json.loads(handle.read(header_len))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ImpqError(path, f"corrupt safetensors file ({err})") from None
    data_size = size - 8 - header_len
    tensors: dict[str, TensorInfo] = {}
    for key, entry in header.items():
        if key == "__metadata__":
            continue
        try:
            dtype, shape, (begin, end) = entry["dtype"], tuple(entry["shape"]), entry["data_offsets"]
        except (KeyError, TypeError, ValueError):
            raise ImpqError(path, f"corrupt safetensors header entry for tensor '{key}'") from None
        if dtype not in _DTYPE_BYTES:
            raise ImpqError(path, f"tensor '{key}' has unsupported dtype {dtype}")
        numel = 1
        for dim in shape:
            numel *= dim
        if end - begin != numel * _DTYPE_BYTES[dtype] or begin < 0:
            raise ImpqError(path, f"corrupt safetensors header: tensor '{key}' byte range does not match its shape")
        if end > data_size:
            raise ImpqError(path, f"truncated safetensors file: tensor '{key}' ends at byte {end} "
                                  f"but the file holds {data_size} data bytes")
        tensors[key] = TensorInfo(path, dtype, shape)
    return tensors


class SafetensorsCheckpoint:
    """All tensors of a checkpoint folder, by name, across shards. Loads one tensor (or row range) at a time."""

    def __init__(self, folder: Path):
        self.folder = folder
        index_path = folder / "model.safetensors.index.json"
        if index_path.is_file():
            weight_map = read_json(index_path, "safetensors index").get("weight_map")
            if not isinstance(weight_map, dict):
                raise ImpqError(index_path, "safetensors index has no weight_map")
            files = sorted({folder / name for name in weight_map.values()})
            for file in files:
                if not file.is_file():
                    raise ImpqError(file, "missing safetensors shard named in model.safetensors.index.json")
        else:
            files = sorted(folder.glob("*.safetensors"))
        if not files:
            raise ImpqError(folder, "no *.safetensors weights found (pytorch .bin checkpoints are not read: "
                                    "they would execute pickled code)")
        self.files = files
        self.tensors: dict[str, TensorInfo] = {}
        for file in files:
            self.tensors.update(_read_header(file))

    def keys(self) -> list[str]:
        return list(self.tensors)

    def shape(self, key: str) -> tuple[int, ...]:
        return self.tensors[key].shape

    def load(self, key: str, rows: tuple[int, int] | None = None) -> torch.Tensor:
        info = self.tensors[key]
        try:
            with safe_open(info.file, framework="pt") as handle:
                tensor = handle.get_tensor(key) if rows is None else handle.get_slice(key)[rows[0]:rows[1]]
        except Exception as err:  # safetensors raises its own error types for damaged files
            raise ImpqError(info.file, f"cannot read tensor '{key}' ({err})") from None
        # a NaN or infinity would be exported, quantized and run without a word: refuse it where it is read
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            index = (~torch.isfinite(tensor)).nonzero()[0].tolist()
            value = tensor[tuple(index)].item()
            if rows is not None:
                index[0] += rows[0]
            raise ImpqError(info.file, f"tensor '{key}' holds {value} at index {index}: the checkpoint is damaged")
        return tensor
