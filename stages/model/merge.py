"""Streamed LoRA merge: base safetensors + PEFT LoRA adapter -> merged safetensors, one row chunk at a time.

Contract (tests/test_export_merge.py):
- Every floating tensor of the base is written in `job.dtype` (others as stored); a tensor with a LoRA pair gets
  W + scaling * B @ A, computed in fp32 (scaling = lora_alpha / r, or lora_alpha / sqrt(r) with use_rslora;
  rank_pattern and alpha_pattern resolved as PEFT resolves them) and cast once. The logits of the result equal
  `PeftModel(base, adapter)` in the same precision up to rounding.
- merge_into "dequantized": every weight the run quantized (each nn.Linear but the LM head, as
  stages.model.loading.quantize_meta swaps them) is first replaced by its NF4 round trip in `job.nf4_dtype`
  (blocksize 64, uint8 storage, no double quantization): the weight the adapter was trained against.
- Every LoRA pair of the adapter is applied exactly once, or nothing is written (UserError naming the first unused
  pair). The base's own layout is kept: its tensor names (a tied head the base does not store is not written),
  its non-floating dtypes, the order of its files. Config and tokenizer are not written (the caller does that).
- Output shards as save_pretrained cuts them (tensor bytes <= max_shard_bytes; a larger tensor alone):
  model.safetensors, or model-0000i-of-0000n.safetensors + model.safetensors.index.json.

Memory: the shards are planned from the files' headers, each output header written first, then every tensor is
streamed through in row chunks of <= CHUNK_BYTES of fp32 work (read with pread, no mmap: stages.model.loading),
so the process holds the adapter plus a few chunks, whatever the sizes of the base's files, its tensors or the
output shards; written bytes go to the page cache, not to the process.
"""

from __future__ import annotations

import json
import math
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from stages.base.errors import UserError
from stages.model import loading
from stages.model.loading import NF4_BLOCK, NF4_STORAGE, StoredTensor

CHUNK_BYTES = 64 * 2**20  # fp32 work per step: rows of one tensor read, round-tripped, merged and written together
MERGE_INTO = ("original", "dequantized")
INDEX = "model.safetensors.index.json"
_ST_NAMES = {v: k for k, v in loading._ST_DTYPES.items()}
_PREFIX, _A, _B = "base_model.model.", ".lora_A.weight", ".lora_B.weight"
_INITS = (True, False, "gaussian", "eva", "orthogonal")  # PEFT inits that leave the base weights untouched
_OFF = {  # adapter_config.json fields that make the adapter more than W + scaling * B @ A, when set
    "use_dora": "DoRA (use_dora)", "fan_in_fan_out": "fan_in_fan_out", "modules_to_save": "modules_to_save",
    "trainable_token_indices": "trainable_token_indices", "lora_bias": "lora_bias", "use_qalora": "QALoRA",
    "alora_invocation_tokens": "aLoRA", "layer_replication": "layer_replication",
    "target_parameters": "target_parameters", "use_bdlora": "use_bdlora", "arrow_config": "arrow_config",
    "kasa_config": "kasa_config", "velora_config": "velora_config", "monteclora_config": "monteclora_config",
    "megatron_config": "megatron_config"}


@dataclass(frozen=True)
class MergeJob:
    base: Path                 # HF model folder: config.json + model.safetensors or sharded *.safetensors + index
    adapter: Path | None       # PEFT LoRA folder (None: re-shard/cast only)
    dtype: torch.dtype         # dtype of the written floating tensors
    merge_into: str            # "original" | "dequantized" (NF4 round trip of each quantized Linear weight first)
    nf4_dtype: torch.dtype     # the run's compute dtype the NF4 codes were made from (dequantized only)
    max_shard_bytes: int       # output shards, like save_pretrained's max_shard_size
    trust_remote_code: bool = False


@dataclass(frozen=True)
class MergeReport:
    tensors: int               # tensors written
    merged: int                # of them, with a LoRA delta added
    dequantized: int           # of them, NF4 round-tripped first (merge_into "dequantized")
    shards: tuple[str, ...]    # safetensors files written, in order
    bytes: int                 # bytes written (shards + index)
    seconds: float


@dataclass(frozen=True)
class _Lora:
    a: str                     # adapter keys of the pair
    b: str
    scaling: float


@dataclass
class _Shard:
    file: str
    tensors: list[tuple[str, StoredTensor, torch.dtype]]  # name, where it is read, dtype written

    def header(self) -> bytes:
        """The safetensors header: u64 length + JSON (padded with spaces to 8 bytes, as safetensors does)."""
        meta, at = {"__metadata__": {"format": "pt"}}, 0
        for name, t, dtype in self.tensors:
            n = t.numel * dtype.itemsize
            meta[name] = {"dtype": _ST_NAMES[dtype], "shape": list(t.shape), "data_offsets": [at, at + n]}
            at += n
        text = json.dumps(meta, separators=(",", ":")).encode()
        text += b" " * (-len(text) % 8)
        return len(text).to_bytes(8, "little") + text

    def data_bytes(self) -> int:
        return sum(t.numel * dtype.itemsize for _, t, dtype in self.tensors)


# ------------------------------------------------------------------------------------------------ the adapter
def adapter_problem(adapter: Path) -> str | None:
    """Why this folder cannot be merged as plain LoRA deltas (one line with the fix), or None if it can."""
    adapter = Path(adapter)
    cfg_path, st_path = adapter / "adapter_config.json", adapter / "adapter_model.safetensors"
    if not adapter.is_dir():
        return f"adapter {adapter}: no such folder; pass the run folder's adapter/ (a PEFT LoRA folder)"
    if not cfg_path.is_file():
        return f"adapter {adapter}: no adapter_config.json there; pass a PEFT LoRA adapter folder"
    if not st_path.is_file():
        bin_only = (adapter / "adapter_model.bin").is_file()
        hint = " (only adapter_model.bin: re-save it with safetensors)" if bin_only else ""
        return f"adapter {adapter}: no adapter_model.safetensors{hint}; pass a complete PEFT LoRA adapter folder"
    try:
        cfg = json.loads(cfg_path.read_text())
    except (OSError, ValueError) as e:
        return f"adapter {cfg_path}: not readable JSON ({e}); restore the file the training run saved"
    return _config_problem(adapter, cfg) or _keys_problem(adapter, _adapter_keys(st_path))


def _config_problem(adapter: Path, cfg: dict) -> str | None:
    if cfg.get("peft_type") != "LORA":
        return (f"adapter {adapter}: peft_type {cfg.get('peft_type')!r}, not LORA; only LoRA adapters can be merged "
                "here (merge others with PEFT's merge_and_unload)")
    for field, what in _OFF.items():
        if cfg.get(field):
            return (f"adapter {adapter}: {what} is set, so it is more than W + scaling * B @ A; merge it with PEFT's "
                    "merge_and_unload instead")
    if cfg.get("bias", "none") != "none":
        return (f"adapter {adapter}: bias={cfg['bias']!r} trains base biases too; only bias='none' adapters can be "
                "merged here (merge it with PEFT's merge_and_unload)")
    if cfg.get("init_lora_weights", True) not in _INITS:
        return (f"adapter {adapter}: init_lora_weights={cfg['init_lora_weights']!r} changed the base weights at init; "
                "convert it to a plain LoRA first (PEFT: path_initial_model_for_weight_conversion)")
    if not isinstance(cfg.get("r"), int) or cfg["r"] <= 0 or not isinstance(cfg.get("lora_alpha"), (int, float)):
        return f"adapter {adapter}: adapter_config.json lacks a positive r or a lora_alpha; restore the saved file"
    return None


def _adapter_keys(st_path: Path) -> list[str]:
    from safetensors import safe_open

    with safe_open(str(st_path), framework="pt") as f:
        return list(f.keys())


def _keys_problem(adapter: Path, keys: list[str]) -> str | None:
    keys_set = set(keys)
    for k in sorted(keys):
        if not (k.startswith(_PREFIX) and k.endswith((_A, _B))):
            return (f"adapter {adapter}: tensor {k} is not a LoRA A/B weight (embedding LoRA, DoRA or trained base "
                    "weights?); only linear-layer LoRA can be merged here")
        other = k[:-len(_A)] + (_B if k.endswith(_A) else _A)
        if other not in keys_set:
            return f"adapter {adapter}: {k} has no {other[len(k) - len(_A) + 1:]} partner; the file is incomplete"
    if not keys:
        return f"adapter {adapter}: adapter_model.safetensors holds no LoRA weights; pass the trained adapter"
    return None


def _pattern_value(patterns: dict, module: str, default):
    """PEFT's get_pattern_key (peft/utils/other.py): the first pattern key whose regex ends the module name."""
    for key in patterns:
        if re.match(rf"(.*\.)?({key})$", module):
            return patterns[key]
    return default


def _pairs(adapter: Path, tensors: dict[str, torch.Tensor], base: dict[str, StoredTensor]) -> dict[str, _Lora]:
    """Base tensor name -> its LoRA pair, each pair used once; a UserError for any pair that does not fit."""
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    pairs = {}
    for a in sorted(k for k in tensors if k.endswith(_A)):
        module = a[len(_PREFIX):-len(_A)]
        b, name = a[:-len(_A)] + _B, module + ".weight"
        if name not in base:
            raise UserError(f"adapter {adapter}: LoRA pair {a} is unused: the base has no tensor {name}; pass the "
                            "base model this adapter was trained on")
        r = tensors[a].shape[0]
        want = (r, base[name].shape[1]), (base[name].shape[0], r)
        if len(base[name].shape) != 2 or (tuple(tensors[a].shape), tuple(tensors[b].shape)) != want:
            raise UserError(f"adapter {adapter}: {module} has lora_A {list(tensors[a].shape)}, lora_B "
                            f"{list(tensors[b].shape)} but base {name} is {list(base[name].shape)}; pass its own base")
        if _pattern_value(cfg.get("rank_pattern") or {}, module, cfg["r"]) != r:
            raise UserError(f"adapter {adapter}: {module} has rank {r} but adapter_config.json's r/rank_pattern say "
                            "otherwise; the folder's files do not belong together")
        alpha = _pattern_value(cfg.get("alpha_pattern") or {}, module, cfg["lora_alpha"])
        pairs[name] = _Lora(a, b, alpha / (math.sqrt(r) if cfg.get("use_rslora") else r))
    return pairs


def _load_adapter(job: MergeJob, base: dict[str, StoredTensor]) -> tuple[dict[str, torch.Tensor], dict[str, _Lora]]:
    if job.adapter is None:
        return {}, {}
    from safetensors.torch import load_file

    problem = adapter_problem(job.adapter)
    if problem:
        raise UserError(problem)
    tensors = load_file(str(Path(job.adapter) / "adapter_model.safetensors"))
    return tensors, _pairs(Path(job.adapter), tensors, base)


# ------------------------------------------------------------------------------------------------ the plan
def _check(job: MergeJob) -> None:
    if job.merge_into not in MERGE_INTO:
        raise UserError(f"merge_into {job.merge_into!r}: choose one of {', '.join(MERGE_INTO)}")
    if not job.dtype.is_floating_point or job.dtype not in _ST_NAMES:
        raise UserError(f"dtype {job.dtype}: not a floating dtype safetensors stores; use fp32, bf16 or fp16")
    if job.max_shard_bytes <= 0:
        raise UserError(f"max shard size {job.max_shard_bytes} bytes: must be positive, e.g. 5GB")
    if not sorted(Path(job.base).glob("*.safetensors")):
        raise UserError(f"base model {job.base}: no *.safetensors weights there; pass a safetensors model folder")


def _base_tensors(job: MergeJob) -> dict[str, StoredTensor]:
    """The base's tensors in file order, each file's by offset: the order they are read (and written) in."""
    found = loading.index_checkpoint(Path(job.base))
    return dict(sorted(found.items(), key=lambda kv: (kv[1].file.name, kv[1].offset)))


def _plan(job: MergeJob, base: dict[str, StoredTensor]) -> list[_Shard]:
    """save_pretrained's greedy cut: tensors in order, a new shard when the next would pass max_shard_bytes."""
    groups: list[list] = [[]]
    size = 0
    for name, t in base.items():
        dtype = job.dtype if t.dtype.is_floating_point else t.dtype
        n = t.numel * dtype.itemsize
        if groups[-1] and size + n > job.max_shard_bytes:
            groups.append([])
            size = 0
        groups[-1].append((name, t, dtype))
        size += n
    if len(groups) == 1:
        names = ["model.safetensors"]
    else:
        names = [f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors" for i in range(len(groups))]
    # widest dtypes first in each file, as safetensors orders them (keeps every tensor aligned to its element size)
    return [_Shard(f, sorted(g, key=lambda x: -x[2].itemsize)) for f, g in zip(names, groups)]


def _index(shards: list[_Shard]) -> bytes:
    weight_map = {name: s.file for s in shards for name, _, _ in s.tensors}
    total = sum(s.data_bytes() for s in shards)
    body = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    return (json.dumps(body, indent=2) + "\n").encode()


def output_bytes(job: MergeJob) -> int:
    """Exactly the bytes `merge` will write for this job (shards + index): for the caller's disk check."""
    _check(job)
    shards = _plan(job, _base_tensors(job))
    index = len(_index(shards)) if len(shards) > 1 else 0
    return sum(len(s.header()) + s.data_bytes() for s in shards) + index


def _quantized(job: MergeJob, base: dict[str, StoredTensor]) -> set[str]:
    """Checkpoint names of the weights a 4-bit run quantized: every nn.Linear's but the LM head's."""
    if job.merge_into != "dequantized":
        return set()
    model = loading.meta_model(str(job.base), job.nf4_dtype, job.trust_remote_code)
    head = model.get_output_embeddings()
    names = {f"{n}.weight" for n, m in model.named_modules() if type(m) is torch.nn.Linear and m is not head}
    missing = sorted(names - set(base))
    if missing:
        raise UserError(f"base model {job.base}: no tensor {missing[0]} (a Linear weight of its architecture) in its "
                        "*.safetensors files; pass a complete model folder")
    return names


# ------------------------------------------------------------------------------------------------ streaming
def merge(job: MergeJob, out: Path, say: Callable[[str], object] = print, resume: bool = False) -> MergeReport:
    """Write the merged safetensors shards (+ index when more than one) into `out`, an existing folder without
    weights (the caller writes config and tokenizer, before or after). Everything is checked before the first byte
    is written. Each shard is written as `.FILE.tmp` and renamed when whole; `resume`: `out` holds an earlier,
    interrupted merge of the SAME job (the caller checks that), whose whole shards are kept, not written again."""
    start = time.perf_counter()
    _check(job)
    out = Path(out)
    if not out.is_dir() or (not resume and (any(out.glob("*.safetensors")) or (out / INDEX).exists())):
        raise UserError(f"{out}: not a folder, or it holds safetensors already; merge writes into a new empty folder")
    base = _base_tensors(job)
    tensors, pairs = _load_adapter(job, base)
    nf4 = _quantized(job, base)
    shards = _plan(job, base)
    kept = {s.file for s in shards if resume and _whole(out / s.file, s)}
    if kept:
        say(f"merge: {len(kept)} of {len(shards)} shard(s) already written in {out}; {len(shards) - len(kept)} to go")
    for i, shard in enumerate(shards, 1):
        if shard.file in kept:
            continue
        t0 = time.perf_counter()
        _write_shard(out, shard, job, nf4, pairs, tensors)
        merged = sum(name in pairs for name, _, _ in shard.tensors)
        say(f"merge: {shard.file} ({i}/{len(shards)}): {len(shard.tensors)} tensors, {merged} with LoRA, "
            f"{shard.data_bytes() / 1e9:.2f} GB in {time.perf_counter() - t0:.1f}s")
    written = sum(len(s.header()) + s.data_bytes() for s in shards)
    if len(shards) > 1:
        written += (out / INDEX).write_bytes(_index(shards))
    return MergeReport(tensors=len(base), merged=len(pairs), dequantized=len(nf4), shards=tuple(s.file for s in shards),
                       bytes=written, seconds=time.perf_counter() - start)


def _whole(path: Path, shard: _Shard) -> bool:
    """A shard file with its final name is whole (written under a temporary name, then renamed) when it has the
    planned size and header."""
    head = shard.header()
    if not path.is_file() or path.stat().st_size != len(head) + shard.data_bytes():
        return False
    with open(path, "rb") as f:
        return f.read(len(head)) == head


def _write_shard(out: Path, shard: _Shard, job: MergeJob, nf4: set[str], pairs: dict, tensors: dict) -> None:
    tmp = out / f".{shard.file}.tmp"
    with open(tmp, "wb") as f:
        head = shard.header()
        f.write(head)
        for name, t, dtype in shard.tensors:
            _stream(f, t, dtype, job.nf4_dtype if name in nf4 else None, pairs.get(name), tensors)
        if f.tell() != len(head) + shard.data_bytes():
            raise AssertionError(f"{shard.file}: wrote {f.tell()} bytes, planned {len(head) + shard.data_bytes()}")
    tmp.replace(out / shard.file)


def _step(t: StoredTensor, nf4: bool) -> int:
    """Rows per chunk: <= CHUNK_BYTES of fp32, and (NF4) a whole number of 64-weight blocks, so every block is
    quantized exactly as in one piece (blocks run over the flattened matrix)."""
    row = max(1, math.prod(t.shape[1:]))
    step = max(1, CHUNK_BYTES // (4 * row))
    if nf4:
        unit = NF4_BLOCK // math.gcd(row, NF4_BLOCK)
        step = max(unit, step // unit * unit)
    return step


def _stream(f, t: StoredTensor, dtype: torch.dtype, nf4_dtype: torch.dtype | None, lora: _Lora | None,
            tensors: dict) -> None:
    """Read, (round-trip,) merge, cast and write one tensor, a row chunk at a time."""
    if not t.shape:  # a scalar
        _write(f, loading.read_flat(t, 0, 1).to(dtype))
        return
    a = b = None
    if lora is not None:
        a, b = tensors[lora.a].float(), tensors[lora.b].float()
    step = _step(t, nf4_dtype is not None)
    for r0 in range(0, t.shape[0], step):
        r1 = min(r0 + step, t.shape[0])
        w = _read(t, r0, r1)
        if nf4_dtype is not None:
            w = nf4_round_trip(w, nf4_dtype)
        if lora is not None:
            w = w.float().addmm_(b[r0:r1], a, alpha=lora.scaling)  # fp32: W + scaling * B @ A
        _write(f, w.to(dtype))
        del w


def _read(t: StoredTensor, start: int, stop: int) -> torch.Tensor:
    """Rows [start, stop) of a base tensor (tests wrap this to count what is held)."""
    return loading.read_rows(t, start, stop)


def _write(f, x: torch.Tensor) -> None:
    f.write(x.contiguous().reshape(-1).view(torch.uint8).numpy())


def nf4_round_trip(w: torch.Tensor, nf4_dtype: torch.dtype) -> torch.Tensor:
    """dequantize(quantize(w)) as the run's Linear4bit holds it: NF4 codes of w in nf4_dtype, blocks of 64 over the
    flattened values (w must start on a block), uint8 storage, fp32 absmax; returned in nf4_dtype."""
    from stages.model.quiet import import_bitsandbytes

    bf = import_bitsandbytes().functional
    flat = w.to(nf4_dtype).reshape(-1)
    packed, state = bf.quantize_4bit(flat, blocksize=NF4_BLOCK, quant_type="nf4", quant_storage=NF4_STORAGE)
    state = bf.QuantState(absmax=state.absmax.float(), shape=flat.shape, code=bf.get_4bit_type("nf4", device=w.device),
                          blocksize=NF4_BLOCK, quant_type="nf4", dtype=nf4_dtype)
    return bf.dequantize_4bit(packed, state).reshape(w.shape)
