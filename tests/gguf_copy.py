"""A GGUF file written again with the ``gguf`` package, changed where a test needs it.

Shared by ``tests/test_gguf.py`` (odd variants of tiny files) and
``scripts/make_gguf_reference.py`` (an F32 copy for llama.cpp, run in a venv
without mlx): it needs only ``gguf`` and ``numpy``.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import gguf
import numpy as np

# (tensor, its numpy shape) -> (data, raw GGML type or None for a numpy dtype)
TensorFn = Callable[
    [gguf.ReaderTensor, tuple[int, ...]],
    tuple[np.ndarray, gguf.GGMLQuantizationType | None],
]


def copy_gguf(
    src: Path,
    dest: Path,
    tensor: TensorFn,
    arch: str | None = None,
    file_type: gguf.LlamaFileType | None = None,
) -> None:
    """Write GGUF ``src`` as ``dest``: the same metadata, each tensor ``tensor(t, shape)``.

    ``arch`` renames the architecture and its keys; ``file_type`` replaces
    ``general.file_type``.
    """
    reader = gguf.GGUFReader(src)
    old = reader.fields["general.architecture"].contents()
    arch = arch or old
    writer = gguf.GGUFWriter(str(dest), arch)
    for key, field in reader.fields.items():
        if key.startswith("GGUF.") or key == "general.architecture":
            continue
        if key == "general.file_type" and file_type is not None:
            writer.add_file_type(file_type)
            continue
        sub = field.types[-1] if field.types[0] == gguf.GGUFValueType.ARRAY else None
        new_key = arch + key[len(old) :] if key.startswith(old + ".") else key
        writer.add_key_value(new_key, field.contents(), field.types[0], sub_type=sub)
    for t in reader.tensors:
        data, raw_dtype = tensor(t, tuple(int(n) for n in reversed(t.shape.tolist())))
        writer.add_tensor(t.name, data, raw_dtype=raw_dtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
