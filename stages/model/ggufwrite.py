"""GGUF for llama.cpp from a merged Hugging Face folder (issue 25 item 5), written with the `gguf` package.

Follows llama.cpp's convert_hf_to_gguf.py for the llama / qwen2 / mistral families (Mistral is written as
architecture `llama`, as llama.cpp does): its hyperparameter keys, its tensor names (`gguf.get_tensor_name_map`),
llama's Q/K row permutation (HF's rotate-half order -> llama.cpp's pairwise rope order; transformers' GGUF reader
reverses it), no `output.weight` for tied embeddings, qwen2's qkv biases, the llama3 rope as a `rope_freqs`
tensor, and the tokenizer as `gpt2` byte-level BPE (tokens, token types, merges, special ids, add_bos, chat
template). Tensors of two or more dimensions are written in the chosen type (f32 / f16 / bf16); 1-D tensors
(norms, biases, rope factors) stay f32, as llama.cpp writes them. A SentencePiece tokenizer is refused.

Streamed: header, metadata and tensor infos first, then the data tensor by tensor, one safetensors file open
(memory-mapped) at a time: the peak is about one tensor's converted copy plus the vocabulary, never the model.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from stages.base.errors import UserError

try:
    import gguf
except ImportError:  # not a dependency of this project (`make` installs it for the demo); gguf_problem says so
    gguf = None

GGUF_ARCHS = ("llama", "qwen2", "mistral")  # config.json model_type values we write
GGUF_TYPES = ("f32", "f16", "bf16")  # no quantized types
GGUF_INSTALL = "pip install gguf==0.19.0"
_ARCH = {"llama": "LLAMA", "mistral": "LLAMA", "qwen2": "QWEN2"}  # gguf.MODEL_ARCH member; Mistral as llama.cpp
_FILE_TYPE = {"f32": "ALL_F32", "f16": "MOSTLY_F16", "bf16": "MOSTLY_BF16"}  # gguf.LlamaFileType member
_SOURCE_DTYPES = ("F32", "F16", "BF16")
_ROPE_TYPES = ("default", "linear", "yarn", "llama3")
_SCALAR_BYTES = {"UINT8": 1, "INT8": 1, "BOOL": 1, "UINT16": 2, "INT16": 2, "UINT32": 4, "INT32": 4, "FLOAT32": 4,
                 "UINT64": 8, "INT64": 8, "FLOAT64": 8}  # by gguf.GGUFValueType name

# tokenizer.json pre-tokenizer -> llama.cpp's `tokenizer.ggml.pre` name (llama.cpp identifies it by hashing the
# encoding of a test text, which only works for the published tokenizers it lists; we read the pipeline itself).
_SPLITS = {
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+":
        "qwen2",
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
    r"|\s+(?!\S)|\s+": "llama-bpe",
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+|[^\r\n\p{L}\p{N}]?"
    r"[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+"
    r"|\s+(?!\S)|\s+": "tekken",
}


class _Refused(Exception):
    """Why a folder cannot be written (the one line gguf_problem returns)."""


@dataclass(frozen=True)
class GgufReport:
    """What write_gguf wrote: the file, its general.architecture, tensor type, tensor count, size in bytes, the
    tokenizer's pre-tokenizer name and the vocabulary size, and the seconds it took."""

    path: Path
    arch: str
    tensor_type: str
    n_tensors: int
    n_bytes: int
    tokenizer_pre: str
    vocab_size: int
    seconds: float


@dataclass(frozen=True)
class _Tensor:
    gguf_name: str
    shape: tuple[int, ...]
    qtype: gguf.GGMLQuantizationType
    file: str | None = None  # safetensors file holding hf_name; None: `data` is computed here
    hf_name: str = ""
    rope_heads: int = 0  # > 0: permute the rows for llama.cpp's rope with this many heads
    data: torch.Tensor | None = None

    @property
    def nbytes(self) -> int:
        block, size = gguf.GGML_QUANT_SIZES[self.qtype]
        return math.prod(self.shape) // block * size


def gguf_problem(model_dir: Path) -> str | None:
    """One line saying why `model_dir` (a merged HF folder) cannot be written as GGUF, or None if it can."""
    try:
        _check(Path(model_dir))
    except _Refused as why:
        return str(why)
    return None


def gguf_bytes(model_dir: Path, tensor_type: str, name: str | None = None) -> int:
    """Exact size in bytes of the file write_gguf(model_dir, ..., tensor_type, name=name) writes (disk check)."""
    writer, _, _ = _plan(Path(model_dir), tensor_type, name)
    return _file_size(writer)


def write_gguf(model_dir: Path, out_file: Path, tensor_type: str, say: Callable[[str], object] = print,
               name: str | None = None) -> GgufReport:
    """Write `model_dir` (config.json, tokenizer.json, safetensors, maybe sharded) as one GGUF file at `out_file`
    (that path only; the caller renames it). `name` is general.name (default: the folder's name). Raises
    UserError (one line) for a folder gguf_problem refuses or an unknown tensor_type."""
    start = time.monotonic()
    model_dir, out_file = Path(model_dir), Path(out_file)
    writer, tensors, pre = _plan(model_dir, tensor_type, name)
    n_bytes = _file_size(writer)
    say(f"writing GGUF {out_file.name} ({tensor_type}, {len(tensors)} tensors, {n_bytes / 2**20:.1f} MiB)")
    try:  # header, metadata and every tensor's info first; then the data, one source file at a time
        writer.write_header_to_file(path=out_file)
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        _write_data(writer, model_dir, tensors)
    except BaseException:
        writer.close()
        out_file.unlink(missing_ok=True)  # no half-written file left at the given path
        raise
    writer.close()
    vocab = len(writer.kv_data[0][gguf.Keys.Tokenizer.LIST].value)
    return GgufReport(out_file, writer.arch, tensor_type, len(tensors), out_file.stat().st_size, pre, vocab,
                      time.monotonic() - start)


def _write_data(writer: gguf.GGUFWriter, model_dir: Path, tensors: list[_Tensor]) -> None:
    """Each tensor's data in writing order, one safetensors file open (memory-mapped) at a time."""
    from safetensors import safe_open

    for file, group in itertools.groupby(tensors, key=lambda t: t.file):
        with safe_open(str(model_dir / file), framework="pt") if file else contextlib.nullcontext() as source:
            for t in group:
                writer.write_tensor_data(_encode(t.data if file is None else source.get_tensor(t.hf_name), t))


def _plan(model_dir: Path, tensor_type: str, name: str | None):
    """(writer holding every key and tensor info, no file yet; tensors in writing order; pre-tokenizer name)."""
    if tensor_type not in GGUF_TYPES:
        raise UserError(f"GGUF tensor type {tensor_type!r} is not one of {', '.join(GGUF_TYPES)}; pick one of those")
    try:
        cfg, tokenizer_json = _check(model_dir)
    except _Refused as why:
        raise UserError(str(why)) from None
    arch = gguf.MODEL_ARCH[_ARCH[cfg.model_type]]
    writer = gguf.GGUFWriter(path=None, arch=gguf.MODEL_ARCH_NAMES[arch])
    writer.add_type(gguf.GGUFType.MODEL)
    writer.add_name(name or model_dir.name)
    writer.add_file_type(gguf.LlamaFileType[_FILE_TYPE[tensor_type]])
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    _add_hparams(writer, cfg, arch)
    pre = _add_vocab(writer, model_dir, cfg, tokenizer_json)
    tensors = _extra_tensors(cfg, arch) + _source_tensors(model_dir, cfg, arch, tensor_type)
    for t in tensors:
        writer.add_tensor_info(t.gguf_name, t.shape, np.dtype(np.float32), t.nbytes, raw_dtype=t.qtype)
    return writer, tensors, pre


def _check(model_dir: Path):
    """(transformers config, tokenizer.json as a dict) of a folder we can write; raises _Refused otherwise."""
    if gguf is None:
        raise _Refused(f"GGUF export needs the `gguf` package, which is not installed; run `{GGUF_INSTALL}`")
    where = model_dir / "config.json"
    try:
        model_type = json.loads(where.read_text()).get("model_type")
    except (OSError, ValueError) as e:
        raise _Refused(f"cannot read {where} ({type(e).__name__}); give a Hugging Face model folder") from None
    if model_type not in GGUF_ARCHS:
        raise _Refused(f"GGUF export supports model_type {', '.join(GGUF_ARCHS)}; {where} says {model_type!r}; "
                       f"export without --gguf")
    from transformers import AutoConfig

    try:
        cfg = AutoConfig.from_pretrained(str(model_dir))
    except Exception as e:  # transformers validates the config: say what it found, on one line
        raise _Refused(f"transformers cannot load {where}: {str(e).splitlines()[0][:100]}") from None
    if getattr(cfg, "quantization_config", None):
        raise _Refused(f"{where} describes a quantized checkpoint; GGUF export needs f32/f16/bf16 weights")
    rope_type = _rope(cfg)["rope_type"]
    if rope_type not in _ROPE_TYPES or (rope_type == "llama3" and _ARCH[model_type] != "LLAMA"):
        raise _Refused(f"{where}: rope type {rope_type!r} is not supported for GGUF export of {model_type} "
                       f"(supported: {', '.join(_ROPE_TYPES[:3])}; llama3 for llama and mistral)")
    tokenizer_json = _check_tokenizer(model_dir, cfg.vocab_size)
    _source_tensors(model_dir, cfg, gguf.MODEL_ARCH[_ARCH[model_type]], GGUF_TYPES[0])  # names, dtypes: headers only
    return cfg, tokenizer_json


def _check_tokenizer(model_dir: Path, vocab_size: int) -> dict:
    """tokenizer.json of a byte-level BPE tokenizer whose pre-tokenizer we can name and whose ids fit the model."""
    where = model_dir / "tokenizer.json"
    if not where.is_file():
        raise _Refused(f"{model_dir} has no tokenizer.json (a SentencePiece-only tokenizer?); GGUF export "
                       f"writes byte-level BPE tokenizers only")
    tok = json.loads(where.read_text(encoding="utf-8"))
    if tok.get("model", {}).get("type") != "BPE" or _pre_name(tok.get("pre_tokenizer")) is None:
        kind = "SentencePiece-style" if "Metaspace" in json.dumps(tok.get("pre_tokenizer")) else "unrecognised"
        raise _Refused(f"{where}: {kind} tokenizer; GGUF export writes byte-level BPE tokenizers only "
                       f"(qwen2, llama-bpe, tekken, smollm or gpt-2 pre-tokenizers)")
    ids = list(tok["model"]["vocab"].values()) + [t["id"] for t in tok.get("added_tokens", [])]
    if max(ids) >= vocab_size:
        raise _Refused(f"{where}: token id {max(ids)} >= the model's vocab_size {vocab_size}; resize the "
                       f"embeddings before exporting")
    return tok


def _pre_name(pre: dict | None) -> str | None:
    """llama.cpp's name for a byte-level pre-tokenizer pipeline, or None if it is not one we know."""
    steps = [] if pre is None else pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
    kinds = [s.get("type") for s in steps]
    if any(s.get("add_prefix_space") for s in steps):  # a space llama.cpp's byte-level pre-tokenizers do not add
        return None
    if kinds == ["ByteLevel"] and steps[0].get("use_regex", True):
        return "gpt-2"
    if kinds == ["Digits", "ByteLevel"] and steps[0].get("individual_digits") and steps[1].get("use_regex", True):
        return "smollm"
    if kinds == ["Split", "ByteLevel"] and not steps[1].get("use_regex", True) and not steps[0].get("invert"):
        return _SPLITS.get(steps[0].get("pattern", {}).get("Regex"))
    return None


def _rope(cfg) -> dict:
    """The config's rope settings as one dict with rope_type and rope_theta (transformers 5 or older configs)."""
    params = dict(getattr(cfg, "rope_parameters", None) or getattr(cfg, "rope_scaling", None) or {})
    params.setdefault("rope_theta", getattr(cfg, "rope_theta", 10000.0))
    params["rope_type"] = params.get("rope_type", params.get("type")) or "default"
    return params


def _head_dim(cfg) -> int:
    return getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads


def _add_hparams(writer: gguf.GGUFWriter, cfg, arch: gguf.MODEL_ARCH) -> None:
    """llama.cpp's TextModel (+ LlamaModel) hyperparameter keys."""
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_head_count(cfg.num_attention_heads)
    writer.add_head_count_kv(getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads)
    rope = _rope(cfg)
    if rope["rope_type"] == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(rope["factor"])
    elif rope["rope_type"] == "yarn":
        writer.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        writer.add_rope_scaling_factor(rope["factor"])
        writer.add_rope_scaling_orig_ctx_len(rope["original_max_position_embeddings"])
        for key, suffix in (("extrapolation_factor", "ext_factor"), ("attention_factor", "attn_factor"),
                            ("beta_fast", "beta_fast"), ("beta_slow", "beta_slow")):
            if rope.get(key) is not None:
                getattr(writer, f"add_rope_scaling_yarn_{suffix}")(rope[key])
    writer.add_rope_freq_base(rope["rope_theta"])
    writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    writer.add_key_length(_head_dim(cfg))
    writer.add_value_length(_head_dim(cfg))
    if arch == gguf.MODEL_ARCH.LLAMA:
        writer.add_vocab_size(cfg.vocab_size)
        writer.add_rope_dimension_count(_head_dim(cfg))


def _add_vocab(writer: gguf.GGUFWriter, model_dir: Path, cfg, tokenizer_json: dict) -> str:
    """gpt2-style vocabulary as llama.cpp's get_vocab_base + SpecialVocab write it; returns the pre name."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    by_id = {i: token for token, i in tokenizer.get_vocab().items()}
    added = tokenizer.added_tokens_decoder
    tokens, types = [], []
    for i in range(cfg.vocab_size):
        token, kind = by_id.get(i), gguf.TokenType.NORMAL
        if token is None:  # embedding rows no token uses
            token, kind = f"[PAD{i}]", gguf.TokenType.UNUSED
        elif i in added:
            if not added[i].normalized:  # llama.cpp expects added tokens pre-normalized
                token = tokenizer.decode(tokenizer.encode(token, add_special_tokens=False))
            kind = gguf.TokenType.CONTROL if added[i].special or _looks_special(token) else gguf.TokenType.USER_DEFINED
        tokens.append(token)
        types.append(kind)
    pre = _pre_name(tokenizer_json.get("pre_tokenizer"))
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    special = gguf.SpecialVocab(model_dir, load_merges=True, n_vocab=len(tokens))
    # add_bos / add_eos as the tokenizer really behaves (llama.cpp guesses them from the post-processor)
    probe = tokenizer("a").input_ids
    special.add_special_token["bos"] = tokenizer.bos_token_id is not None and probe[0] == tokenizer.bos_token_id
    special.add_special_token["eos"] = tokenizer.eos_token_id is not None and probe[-1] == tokenizer.eos_token_id
    special.add_to_gguf(writer, quiet=True)
    return pre


def _looks_special(token: str) -> bool:
    """llama.cpp's does_token_look_special: added tokens it marks CONTROL even when not flagged special."""
    ends = (("<|", "|>"), ("<｜", "｜>"), ("<unused", ">"))
    return token in ("<pad>", "<mask>", "<2mass>", "[@BOS@]") or any(token.startswith(a) and token.endswith(b)
                                                                     for a, b in ends)


def _source_files(model_dir: Path) -> list[str]:
    """The safetensors files of the folder (from its index when sharded), sorted."""
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    else:
        files = sorted(p.name for p in model_dir.glob("model*.safetensors"))
    missing = [f for f in files if not (model_dir / f).is_file()]
    if not files or missing:
        raise _Refused(f"{model_dir} lacks safetensors weights ({', '.join(missing) or 'model*.safetensors'}); "
                       f"GGUF export reads a saved safetensors model")
    return files


def _source_tensors(model_dir: Path, cfg, arch: gguf.MODEL_ARCH, tensor_type: str) -> list[_Tensor]:
    """Every checkpoint tensor to write, by file, with its GGUF name, type and llama rope permutation."""
    from safetensors import safe_open

    names = gguf.get_tensor_name_map(arch, cfg.num_hidden_layers)
    heads = {"q_proj": cfg.num_attention_heads,
             "k_proj": getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads}
    tied = bool(getattr(cfg, "tie_word_embeddings", False))
    out = []
    for file in _source_files(model_dir):
        with safe_open(str(model_dir / file), framework="pt") as source:
            for hf_name in source.keys():
                if hf_name.endswith("rotary_emb.inv_freq") or (tied and hf_name == "lm_head.weight"):
                    continue
                part = source.get_slice(hf_name)
                shape, dtype = tuple(part.get_shape()), part.get_dtype()
                gguf_name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
                if gguf_name is None or dtype not in _SOURCE_DTYPES:
                    why = f"dtype {dtype}" if gguf_name else f"no GGUF name for {gguf.MODEL_ARCH_NAMES[arch]}"
                    raise _Refused(f"tensor {hf_name} in {model_dir / file}: {why}; GGUF export takes the plain "
                                    f"f32/f16/bf16 checkpoint of a {'/'.join(GGUF_ARCHS)} model")
                module = hf_name.split(".")[-2]
                rope_heads = heads.get(module, 0) if arch == gguf.MODEL_ARCH.LLAMA else 0
                qtype = gguf.GGMLQuantizationType[tensor_type.upper() if len(shape) > 1 else "F32"]
                out.append(_Tensor(gguf_name, shape, qtype, file, hf_name, rope_heads))
    return out


def _extra_tensors(cfg, arch: gguf.MODEL_ARCH) -> list[_Tensor]:
    """llama.cpp's generate_extra_tensors: Llama 3.1's rope scaling as per-frequency factors `rope_freqs`."""
    rope = _rope(cfg)
    if rope["rope_type"] != "llama3":
        return []
    dim, base = _head_dim(cfg), rope["rope_theta"]
    freqs = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    factor, low, high = rope.get("factor", 8.0), rope.get("low_freq_factor", 1.0), rope.get("high_freq_factor", 4.0)
    old_context = rope.get("original_max_position_embeddings", 8192)
    factors = []
    for freq in freqs.tolist():
        wavelen = 2 * math.pi / freq
        if wavelen < old_context / high:
            factors.append(1.0)
        elif wavelen > old_context / low:
            factors.append(factor)
        else:
            smooth = (old_context / wavelen - low) / (high - low)
            factors.append(1 / ((1 - smooth) / factor + smooth))
    data = torch.tensor(factors, dtype=torch.float32)
    name = gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.ROPE_FREQS] + ".weight"
    return [_Tensor(name, tuple(data.shape), gguf.GGMLQuantizationType.F32, data=data)]


def _encode(values: torch.Tensor, t: _Tensor) -> np.ndarray:
    """One tensor's bytes as GGUF stores them: rope rows permuted for llama, cast to the tensor's type."""
    x = values.to(torch.float32)
    if t.rope_heads:  # HF rotate-half halves -> llama.cpp's consecutive pairs, per head
        x = x.reshape(t.rope_heads, 2, x.shape[0] // t.rope_heads // 2, *x.shape[1:]).transpose(1, 2).reshape(x.shape)
    if t.qtype == gguf.GGMLQuantizationType.F16:
        return x.to(torch.float16).contiguous().numpy()
    if t.qtype == gguf.GGMLQuantizationType.BF16:
        return x.to(torch.bfloat16).contiguous().view(torch.int16).numpy()
    return x.contiguous().numpy()


def _value_bytes(value, vtype: gguf.GGUFValueType, sub_type: gguf.GGUFValueType | None = None) -> int:
    """Bytes one metadata value takes in the file (GGUF v3 encoding, as GGUFWriter packs it)."""
    if vtype == gguf.GGUFValueType.STRING:
        return 8 + len(value.encode("utf-8") if isinstance(value, str) else value)
    if vtype == gguf.GGUFValueType.ARRAY:
        item = sub_type or gguf.GGUFValueType.get_type(value[0])
        return 4 + 8 + sum(_value_bytes(v, item) for v in value)
    return _SCALAR_BYTES[vtype.name]


def _file_size(writer: gguf.GGUFWriter) -> int:
    """Size of the file `writer` will write: header, metadata, tensor infos, then aligned tensor data."""
    align = writer.data_alignment
    kv = sum(_value_bytes(key, gguf.GGUFValueType.STRING) + 4 + _value_bytes(v.value, v.type, v.sub_type)
             for key, v in writer.kv_data[0].items())
    infos = sum(_value_bytes(name, gguf.GGUFValueType.STRING) + 4 + 8 * len(info.shape) + 4 + 8
                for name, info in writer.tensors[0].items())
    data = sum(-(-info.nbytes // align) * align for info in writer.tensors[0].values())
    return -(-(4 + 4 + 8 + 8 + kv + infos) // align) * align + data
