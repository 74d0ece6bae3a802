"""Disks for disk-budget tests: a size-limited tmpfs (root only), and a model file of GB
size that takes no disk (its tensors are a hole).

A sparse model has the header of a generated model (``orchcore.modelgen``) and zeros for
every tensor: its facts, layout and byte ranges are those of a real model of that size,
while reading it costs no disk and writing a shard of it needs the real bytes.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import gguf
import numpy as np

from orchcore import modelgen, modelvocab

NEEDS_ROOT = "mounting a size-limited tmpfs needs root (the suite runs as root in CI)"


def can_mount() -> bool:
    return os.geteuid() == 0 and shutil.which("mount") is not None


@contextmanager
def small_disk(where: Path, size_mb: int) -> Iterator[Path]:
    """A tmpfs of ``size_mb`` MiB mounted at ``where`` (made), unmounted on exit."""
    where.mkdir(parents=True, exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_mb}m", "tmpfs", str(where)],
                   check=True, capture_output=True)
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], check=False, capture_output=True)


def write_sparse_model(path: Path, spec: modelgen.ModelSpec) -> Path:
    """``spec``'s header and tensor table, then holes where its tensors are."""
    writer = gguf.GGUFWriter(path, spec.arch)
    modelgen._add_hparams(writer, spec)  # the generator's own keys, so facts agree
    modelvocab.add_tokenizer(writer, spec.n_vocab)
    for t in modelgen.tensor_plan(spec):
        shape = gguf.quant_shape_to_byte_shape(t.shape, t.qtype)
        writer.add_tensor_info(t.name, shape, np.dtype(np.uint8), int(np.prod(shape)),
                               raw_dtype=t.qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    out = writer.fout[0]
    writer.write_padding(out, out.tell())
    end = out.tell()
    for t in writer.tensors[0].values():
        end += t.nbytes + (-t.nbytes % writer.data_alignment)
    out.truncate(end)
    writer.close()
    return path


# About 1.6 GB (four layers of a 7B-shaped model in F16) that take no disk.
GB_SPEC = modelgen.ModelSpec(n_layers=4, n_embd=4096, n_head=32, n_head_kv=8, n_ff=11008,
                             weight_type=modelgen.GType.F16)
