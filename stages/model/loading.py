"""Sharded loading: no rank ever holds more of the model than its own shard, plus one tensor's slice in flight.

  config -> the model on the meta device (no memory) -> NF4: bitsandbytes Linear4bit layers whose packed codes are
  uint8 -> adapter / new LoRA: its small weights made on CPU, exactly as PEFT makes them -> FSDP2 per decoder layer
  -> each rank allocates only its own shards -> per tensor: read this rank's rows from the safetensors files (pread,
  no mmap, so nothing else of the file is resident), convert to the load dtype (NF4: quantize exactly those rows,
  block-aligned) and copy them in -> NF4: the absmax of every rank's blocks, all-reduced, whole on every rank
  (FSDP2 shards parameters; bitsandbytes keeps the quant state on the module) -> rotary buffers recomputed.

Contract (tests/test_loading.py): the values equal `from_pretrained` followed by `shard_model` - bit for bit for
fp32/bf16 weights and NF4 codes and absmax - and at world size N each rank materializes at most model/N bytes of
parameters plus what FSDP2 pads (<= one row per tensor). One process takes the same path with no sharding.
Why not rank 0 loading + broadcast (accelerate's RAM-efficient loading): rank 0 would hold the whole model in host
memory (145 GB at 72B in bf16, 8x per 8-GPU node if every node does it); reading slices costs each rank 1/N of the
file bytes and no collective beyond the NF4 absmax.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import struct
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from stages.base.errors import UserError
from stages.model.quiet import import_bitsandbytes

NF4_BLOCK = 64  # bitsandbytes' NF4 blocksize: one absmax per 64 consecutive weights of the flattened matrix
NF4_STORAGE = torch.uint8  # packed codes: 2 per byte (FSDP2 copies integer shards byte for byte)
_ST_DTYPES = {"F64": torch.float64, "F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16,
              "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
              "BOOL": torch.bool}
LOAD_STATS = {"bytes_read": 0, "largest_read": 0}  # file bytes this process read (all, one pread): tests count them


@dataclass(frozen=True)
class StoredTensor:
    """Where one tensor's bytes lie in a safetensors file."""
    file: Path
    dtype: torch.dtype
    shape: tuple[int, ...]
    offset: int  # absolute byte offset of the first element

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


def index_checkpoint(folder: Path) -> dict[str, StoredTensor]:
    """Every tensor of every *.safetensors file in the folder, from the files' JSON headers alone."""
    found: dict[str, StoredTensor] = {}
    for path in sorted(folder.glob("*.safetensors")):
        with path.open("rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(n))
        for name, info in header.items():
            if name == "__metadata__":
                continue
            if info["dtype"] not in _ST_DTYPES:
                raise UserError(f"{path}: tensor {name} has dtype {info['dtype']}, which cannot be loaded")
            found[name] = StoredTensor(path, _ST_DTYPES[info["dtype"]], tuple(info["shape"]),
                                       8 + n + info["data_offsets"][0])
    return found


def read_flat(t: StoredTensor, start: int, stop: int) -> torch.Tensor:
    """Elements [start, stop) of the flattened tensor, read with one pread (no mmap: only these bytes are touched)."""
    size = torch.empty((), dtype=t.dtype).element_size()
    buf = bytearray((stop - start) * size)
    view, got = memoryview(buf), 0
    fd = os.open(t.file, os.O_RDONLY)
    try:
        while got < len(buf):  # one call returns at most 2 GiB on Linux: go on where it stopped
            n = os.preadv(fd, [view[got:]], t.offset + start * size + got)
            if n == 0:
                raise UserError(f"{t.file}: ends inside a tensor (read {got} of {len(buf)} bytes); the file is "
                                "cut short")
            got += n
    finally:
        os.close(fd)
    LOAD_STATS["bytes_read"] += len(buf)
    LOAD_STATS["largest_read"] = max(LOAD_STATS["largest_read"], len(buf))
    return torch.frombuffer(buf, dtype=t.dtype) if buf else torch.empty(0, dtype=t.dtype)


def read_rows(t: StoredTensor, start: int, stop: int) -> torch.Tensor:
    """Rows [start, stop) along dim 0."""
    row = math.prod(t.shape[1:])
    return read_flat(t, start * row, stop * row).reshape(stop - start, *t.shape[1:])


def local_rows(param) -> tuple[torch.Tensor, int]:
    """(this rank's local tensor, its first row in the full tensor) for a plain or FSDP2-sharded (DTensor) tensor.
    FSDP2 shards dim 0 as torch.chunk does: chunk c = ceil(rows / n), shard k holds rows [k*c, k*c + its size)."""
    from torch.distributed.tensor import DTensor, Shard

    if not isinstance(param, DTensor):
        return param.data, 0
    offset = 0
    for mesh_dim, placement in enumerate(param.placements):
        if isinstance(placement, Shard):
            assert placement.dim == 0, "FSDP2 shards dim 0"
            n = param.device_mesh.size(mesh_dim)
            offset = param.device_mesh.get_local_rank(mesh_dim) * math.ceil(param.shape[0] / n)
    return param.to_local(), offset


@contextlib.contextmanager
def lora_off_meta():
    """PEFT moves each new adapter to its base layer's device; on a meta base that would throw away the values PEFT
    has just drawn (or read from an adapter folder). While PEFT wraps the model, a move to meta keeps the module where
    it is (a dtype cast still applies): the LoRA weights stay on CPU, to be sharded and copied in later."""
    original = torch.nn.Module.to

    def to_but_not_meta(self, *args, **kwargs):
        device, dtype, *_ = torch._C._nn._parse_to(*args, **kwargs)
        if device is not None and device.type == "meta":
            return original(self, dtype=dtype) if dtype is not None else self
        return original(self, *args, **kwargs)

    torch.nn.Module.to = to_but_not_meta
    try:
        yield
    finally:
        torch.nn.Module.to = original


def meta_model(path: str, dtype: torch.dtype, trust_remote_code: bool):
    """The architecture from config.json with every parameter and buffer on the meta device: no memory, no init."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, trust_remote_code=trust_remote_code)
    model.tie_weights()  # tied LM head = the embedding, one parameter (absent from the checkpoint)
    return model


def quantize_meta(model, compute_dtype: torch.dtype) -> int:
    """Swap every nn.Linear but the LM head for a bitsandbytes NF4 Linear4bit whose codes are packed as uint8
    [ceil(n/2), 1] (the layout `from_pretrained(quantization_config=...)` produces); still on meta. Returns how many.
    uint8 storage: FSDP2 copies uint8 shards byte for byte, while bf16-stored codes go through float on CUDA, which
    rewrites NaN bit patterns (bitsandbytes #1945)."""
    bnb = import_bitsandbytes()

    head = model.get_output_embeddings()
    swaps = [(name, m) for name, m in model.named_modules() if type(m) is torch.nn.Linear and m is not head]
    for name, lin in swaps:
        q = bnb.nn.Linear4bit(lin.in_features, lin.out_features, bias=lin.bias is not None, compute_dtype=compute_dtype,
                              compress_statistics=False, quant_type="nf4", quant_storage=NF4_STORAGE, device="meta")
        packed = torch.empty((lin.in_features * lin.out_features + 1) // 2, 1, dtype=NF4_STORAGE, device="meta")
        q.weight = bnb.nn.Params4bit(packed, requires_grad=False, blocksize=NF4_BLOCK, compress_statistics=False,
                                     quant_type="nf4", quant_storage=NF4_STORAGE, module=q, bnb_quantized=True)
        if lin.bias is not None:
            q.bias = torch.nn.Parameter(torch.empty_like(lin.bias, device="meta"), requires_grad=False)
        parent, _, leaf = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, leaf, q)
    return len(swaps)


def checkpoint_name(name: str) -> str:
    """Model parameter name -> checkpoint key: drop PEFT's wrappers (base_model.model., .base_layer)."""
    name = name.removeprefix("base_model.model.")
    return name.replace(".base_layer.", ".")


@torch.no_grad()
def materialize(model, folder: Path, device: torch.device, dtype: torch.dtype, env) -> list[str]:
    """Allocate this rank's shards on `device` and fill them: base weights from the checkpoint (this rank's rows
    only), values that already existed (LoRA, made on CPU) copied back, NF4 quant state built, rotary recomputed.
    Returns the checkpoint's tensors the model has no place for (the caller says how many)."""
    stored = index_checkpoint(folder)
    used = {checkpoint_name(n) for n, _ in _tensors(model)}
    kept = {n: local_rows(p)[0].detach().clone() for n, p in _tensors(model) if not p.is_meta}
    model.to_empty(device=device)
    _base(model).tie_weights()  # to_empty makes new tensors, which unties them
    for name, p in _tensors(model):
        local, first = local_rows(p)
        if name in kept:
            local.copy_(kept[name])
        elif _is_nf4(model, name):
            _fill_nf4(_owner(model, name), local, first, _stored(stored, name, folder), env)
        elif _recomputed(model, name):
            continue  # rotary buffers: recomputed below
        else:
            t = _stored(stored, name, folder)
            if tuple(p.shape) != t.shape:
                raise UserError(f"{folder}: {checkpoint_name(name)} has shape {list(t.shape)} in the checkpoint but "
                                f"{list(p.shape)} in config.json; the folder's files do not belong together")
            local.copy_(read_rows(t, first, first + local.shape[0]).to(local.dtype) if local.dim() else
                        read_flat(t, 0, 1).reshape(()).to(local.dtype))
    _init_rotary(model)
    return sorted(set(stored) - used)


def _base(model):
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def _tensors(model):
    yield from model.named_parameters()
    yield from model.named_buffers()


def _owner(model, name: str):
    return model.get_submodule(name.rpartition(".")[0])


def _stored(stored: dict, name: str, folder: Path) -> StoredTensor:
    key = checkpoint_name(name)
    if key not in stored:
        raise UserError(f"{folder}: no tensor {key} in its *.safetensors files (the architecture expects it); "
                        "pass a complete model folder")
    return stored[key]


def _recomputed(model, name: str) -> bool:
    """A non-persistent buffer (not in any checkpoint): only rotary embeddings' are known how to recompute."""
    owner, leaf = _owner(model, name), name.rpartition(".")[2]
    if leaf not in owner._non_persistent_buffers_set:
        return False
    if "RotaryEmbedding" not in type(owner).__name__:
        raise UserError(f"{type(owner).__name__}.{leaf}: a buffer that no checkpoint holds and that this loader cannot "
                        "recompute; open an issue for this architecture")
    return True


def _is_nf4(model, name: str) -> bool:
    bnb = sys.modules.get("bitsandbytes")  # not imported: no Linear4bit anywhere (and no import just to look)
    return bnb is not None and name.endswith(".weight") and isinstance(_owner(model, name), bnb.nn.Linear4bit)


def _fill_nf4(module, local: torch.Tensor, first: int, t: StoredTensor, env) -> None:
    """Quantize this rank's packed rows [first, first + len) = weights [2*first, 2*(first + len)) of the flattened
    matrix, from the block-aligned range around them (so every block is quantized exactly as in one piece); then
    the absmax of the blocks that START in this rank's range (each block starts in exactly one), all-reduced with
    max (HSDP replicas hold the same blocks; max keeps them exact where a sum would not)."""
    bnb = import_bitsandbytes()
    bf = bnb.functional

    from stages.model.distributed import all_reduce_max_

    n, blocks = t.numel, math.ceil(t.numel / NF4_BLOCK)
    lo, hi = 2 * first, min(2 * (first + local.shape[0]), n)
    absmax = torch.zeros(blocks, dtype=torch.float32, device=local.device)
    if hi > lo:
        a0, a1 = lo // NF4_BLOCK * NF4_BLOCK, min(math.ceil(hi / NF4_BLOCK) * NF4_BLOCK, n)
        values = read_flat(t, a0, a1).to(device=local.device, dtype=module.compute_dtype)
        packed, state = bf.quantize_4bit(values, blocksize=NF4_BLOCK, quant_type="nf4", quant_storage=NF4_STORAGE)
        skip = (lo - a0) // 2
        local.copy_(packed.reshape(-1, 1)[skip:skip + local.shape[0]])
        own = slice(math.ceil(lo / NF4_BLOCK), math.ceil(hi / NF4_BLOCK))  # blocks whose first weight is ours
        absmax[own] = state.absmax.float()[own.start - a0 // NF4_BLOCK:own.stop - a0 // NF4_BLOCK]
    absmax = all_reduce_max_(absmax, env)
    code = bf.get_4bit_type("nf4", device=local.device)
    module.quant_state = bf.QuantState(absmax=absmax, shape=torch.Size(t.shape), code=code, blocksize=NF4_BLOCK,
                                       quant_type="nf4", dtype=module.compute_dtype)
    if module.weight.data_ptr() == local.data_ptr():  # one process, not sharded: a Params4bit as from_pretrained's
        module.weight = bnb.nn.Params4bit(local, requires_grad=False, quant_state=module.quant_state,
                                          blocksize=NF4_BLOCK, compress_statistics=False, quant_type="nf4",
                                          quant_storage=NF4_STORAGE, module=module, bnb_quantized=True)


def _init_rotary(model) -> None:
    """Rotary embeddings keep non-persistent buffers computed from the config; recompute them as transformers does
    after its own meta-device loading."""
    base = _base(model)
    for module in base.modules():
        if "RotaryEmbedding" in type(module).__name__ and hasattr(module, "original_inv_freq"):
            base._init_weights(module)
