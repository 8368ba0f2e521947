"""MIO's LLM as one GGUF file: weights, tokenizer (with the media tokens) and chat template.

What llama.cpp, llama-cpp-python and ollama load. Tensor names, the Q/K row order and the metadata
keys follow llama.cpp's own `convert_hf_to_gguf.py` (its `LlamaModel`); the file is written by the
`gguf` package, streamed: tensor infos first, then each tensor read from the safetensors files,
converted and written before the next is read, so the peak is one tensor, not the model.

Types: `f32`, `f16` and `q8_0` as the converter writes them (norms and other 1-D tensors stay f32);
`q4_0` quantizes the matrices to Q4_0 in Python (gguf.quants) and keeps the output head in Q8_0,
where `llama-quantize` would use Q6_K, which the gguf package cannot write. A matrix whose rows
do not split into 32-value blocks falls back to f16, as in the converter.

`cached_gguf` is the file `--engine llamacpp` uses: exported once next to the quantized-weights
cache (`$MIO_CACHE/quantized/`), keyed by the weight files' names, sizes and times and the type.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from miocli import protocol
from miocli.errors import EnvironmentProblem, ModelError, UsageError
from miocli.model import checkpoint

GGUF_TYPES = ("q4_0", "q8_0", "f16", "f32")
# Bumped when what is written changes: an older cached export is then made again.
EXPORT_VERSION = 1
# sentencepiece token types as llama.cpp reads them (gguf.TokenType)
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6
# Rows of a matrix converted at once (see _Plan.data).
CHUNK_ROWS = 2048
INSTALL_HINT = "pip install 'miocli[llamacpp]' (or just `pip install gguf`)"


def chat_template() -> str:
    """MIO's chat template (MIO_PROTOCOL §2) in Jinja, as GGUF readers render it: a first system turn is
    the system text, else the std system; BOS is not in it (add_bos_token puts it in)."""
    system = protocol.STD_SYSTEM.replace("'", "\\'")
    return (
        "{%- if messages and messages[0]['role'] == 'system' -%}"
        "{%- set system = messages[0]['content'] -%}{%- set turns = messages[1:] -%}"
        f"{{%- else -%}}{{%- set system = '{system}' -%}}{{%- set turns = messages -%}}{{%- endif -%}}"
        f"{protocol.IM_START}system\n{{{{ system }}}}{protocol.IM_END}"
        "{%- for message in turns -%}"
        f"{{{{ '\\n' }}}}{protocol.IM_START}{{{{ message['role'] }}}}\n{{{{ message['content'] }}}}{protocol.IM_END}"
        "{%- endfor -%}"
        f"{{%- if add_generation_prompt -%}}{{{{ '\\n' }}}}{protocol.IM_START}assistant{{{{ '\\n' }}}}{{%- endif -%}}"
    )


def _gguf() -> Any:
    try:
        import gguf
    except ImportError:
        raise EnvironmentProblem("writing GGUF needs the gguf package, which is not installed",
                                 hint=INSTALL_HINT) from None
    return gguf


def weight_files(model_dir: Path) -> list[Path]:
    from miocli.model.quantize import safetensors_files

    return safetensors_files(model_dir, "the GGUF export", "convert the LLM weights to safetensors first")


def _header(path: Path) -> list[tuple[str, str, list[int]]]:
    """(name, dtype, shape) of each tensor of a safetensors file, in the order of its data
    (the order `quantize.read_tensors` reads them)."""
    with open(path, "rb") as handle:
        size = int.from_bytes(handle.read(8), "little")
        header = json.loads(handle.read(size))
    entries = sorted(((k, v) for k, v in header.items() if k != "__metadata__"),
                     key=lambda item: item[1]["data_offsets"][0])
    return [(name, entry["dtype"], list(entry["shape"])) for name, entry in entries]


def _config(model_dir: Path) -> dict[str, Any]:
    try:
        config = json.loads((model_dir / "config.json").read_text())
    except (OSError, ValueError) as exc:
        raise ModelError(f"{model_dir / 'config.json'} cannot be read: {exc}",
                         hint=checkpoint.REDOWNLOAD_HINT) from None
    if config.get("model_type") != "llama":
        raise ModelError(f"{model_dir} holds a {config.get('model_type')!r} model; the GGUF export writes Llama ones",
                         hint="point --model at a MIO checkpoint")
    return config


def _rope_theta(config: dict[str, Any]) -> float:
    parameters = config.get("rope_parameters") or {}
    scaling = config.get("rope_scaling") or parameters
    if scaling.get("rope_type", scaling.get("type", "default")) not in ("default", None):
        raise ModelError(f"rope scaling {scaling.get('rope_type', scaling.get('type'))!r} is not exported",
                         hint="MIO's LLM has none; export the checkpoint as it was released")
    return float(config.get("rope_theta") or parameters.get("rope_theta") or 10000.0)


class _Plan:
    """Which GGUF name and type each safetensors tensor gets."""

    def __init__(self, gguf: Any, config: dict[str, Any], gguf_type: str) -> None:
        self.gguf = gguf
        self.config = config
        self.type = gguf_type
        self.names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, int(config["num_hidden_layers"]))
        self.heads = int(config["num_attention_heads"])
        self.kv_heads = int(config.get("num_key_value_heads") or self.heads)

    def name(self, key: str) -> str | None:
        if key.endswith(".rotary_emb.inv_freq"):
            return None  # recomputed by llama.cpp from rope.freq_base
        name = self.names.get_name(key, try_suffixes=(".weight", ".bias"))
        if name is None:
            raise ModelError(f"the LLM weights hold {key}, which a Llama GGUF has no place for",
                             hint="export a plain LlamaForCausalLM checkpoint")
        return name

    def qtype(self, name: str, shape: list[int]) -> Any:
        types = self.gguf.GGMLQuantizationType
        if len(shape) <= 1 or name.endswith("_norm.weight") or self.type == "f32":
            return types.F32
        if self.type == "f16":
            return types.F16
        wanted = types.Q8_0 if self.type == "q8_0" or name == "output.weight" else types.Q4_0
        block, _ = self.gguf.GGML_QUANT_SIZES[wanted]
        return wanted if shape[-1] % block == 0 else types.F16

    def nbytes(self, shape: list[int], qtype: Any) -> int:
        block, size = self.gguf.GGML_QUANT_SIZES[qtype]
        elements = 1
        for n in shape:
            elements *= n
        return elements // block * size

    def data(self, key: str, tensor: Any, qtype: Any) -> Any:
        """The tensor as the bytes GGUF stores: Q and K rows reordered for llama.cpp's rotary layout."""
        import torch

        if key.endswith(("q_proj.weight", "q_proj.bias")):
            tensor = _permute(tensor, self.heads)
        elif key.endswith(("k_proj.weight", "k_proj.bias")):
            tensor = _permute(tensor, self.kv_heads)
        if tensor.ndim < 2 or tensor.shape[0] <= CHUNK_ROWS:
            return self.gguf.quants.quantize(tensor.to(torch.float32).numpy(), qtype)
        import numpy

        # Block by block: quantizing works on several float32 copies of its input (1.25 GB each for MIO-7B's
        # embeddings in one piece); in pieces of rows, only the whole tensor's quantized bytes are held.
        return numpy.concatenate([self.gguf.quants.quantize(tensor[start : start + CHUNK_ROWS].to(torch.float32)
                                                            .numpy(), qtype)
                                  for start in range(0, tensor.shape[0], CHUNK_ROWS)])


def _permute(weights: Any, heads: int) -> Any:
    """HF's rotate-half row order → the interleaved pairs llama.cpp's (GPT-J style) rope expects."""
    return (weights.reshape(heads, 2, weights.shape[0] // heads // 2, *weights.shape[1:])
            .swapaxes(1, 2).reshape(weights.shape))


def vocabulary(model_dir: Path, vocab_size: int) -> tuple[list[bytes], list[float], list[int]]:
    """Tokens, scores and token types for GGUF's "llama" (sentencepiece) tokenizer, `vocab_size` long:
    the sentencepiece pieces, then the added tokens (media tokens are user-defined, so llama.cpp
    reads `<img5>` in a prompt as one token), the rest `[PADn]` as the converter pads."""
    import sentencepiece

    from miocli.model.pieces import load_sentencepiece, user_defined_pieces

    model_file = model_dir / "tokenizer.model"
    sp = sentencepiece.SentencePieceProcessor()
    load_sentencepiece(sp, model_file)
    user_defined = set(user_defined_pieces(model_file.read_bytes()))
    tokens = [f"[PAD{i}]".encode() for i in range(vocab_size)]
    scores = [-10000.0] * vocab_size
    types = [UNUSED] * vocab_size
    for i in range(min(sp.GetPieceSize(), vocab_size)):
        piece = sp.IdToPiece(i)
        tokens[i], scores[i] = piece.encode(), sp.GetScore(i)
        if sp.IsUnknown(i):
            types[i] = UNKNOWN
        elif sp.IsControl(i) or (piece.startswith("<|") and piece.endswith("|>")):
            types[i] = CONTROL
        elif sp.IsUnused(i):
            types[i] = UNUSED
        elif sp.IsByte(i):
            types[i] = BYTE
        else:
            types[i] = USER_DEFINED if piece in user_defined else NORMAL
    added: dict[int, tuple[str, bool]] = {}
    if (model_dir / "added_tokens.json").is_file():
        added.update({int(i): (content, False) for content, i in _json(model_dir / "added_tokens.json").items()})
    if (model_dir / "tokenizer_config.json").is_file():
        decoder = _json(model_dir / "tokenizer_config.json").get("added_tokens_decoder") or {}
        added.update({int(i): (spec["content"], bool(spec.get("special"))) for i, spec in decoder.items()})
    for i, (content, special) in added.items():
        if i >= vocab_size:
            raise ModelError(f"added token {content!r} has id {i}, past the LLM's {vocab_size} embeddings",
                             hint=checkpoint.REDOWNLOAD_HINT)
        tokens[i], scores[i] = content.encode(), -1000.0
        types[i] = CONTROL if special or (content.startswith("<|") and content.endswith("|>")) else USER_DEFINED
    return tokens, scores, types


def _json(path: Path) -> dict[str, Any]:
    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ModelError(f"{path} cannot be read: {exc}", hint=checkpoint.REDOWNLOAD_HINT) from None
    if not isinstance(value, dict):
        raise ModelError(f"{path} is not a JSON object", hint=checkpoint.REDOWNLOAD_HINT)
    return value


def _metadata(writer: Any, gguf: Any, model_dir: Path, config: dict[str, Any], gguf_type: str) -> None:
    from miocli.model.tokenizer import MioTokenizer

    file_types = {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
                  "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0, "q4_0": gguf.LlamaFileType.MOSTLY_Q4_0}
    variant = checkpoint.detect_variant(model_dir)
    writer.add_name(model_dir.name if not model_dir.name.startswith(("snapshot", "tiny")) else f"MIO {variant}")
    writer.add_file_type(file_types[gguf_type])
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    hidden, heads = int(config["hidden_size"]), int(config["num_attention_heads"])
    writer.add_context_length(int(config.get("max_position_embeddings") or 4096))
    writer.add_embedding_length(hidden)
    writer.add_feed_forward_length(int(config["intermediate_size"]))
    writer.add_block_count(int(config["num_hidden_layers"]))
    writer.add_head_count(heads)
    writer.add_head_count_kv(int(config.get("num_key_value_heads") or heads))
    writer.add_layer_norm_rms_eps(float(config.get("rms_norm_eps", 1e-6)))
    writer.add_rope_freq_base(_rope_theta(config))
    head_dim = int(config.get("head_dim") or hidden // heads)
    writer.add_rope_dimension_count(head_dim)
    if config.get("head_dim"):
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
    vocab_size = int(config["vocab_size"])
    writer.add_vocab_size(vocab_size)

    tokens, scores, types = vocabulary(model_dir, vocab_size)
    writer.add_tokenizer_model("llama")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_scores(scores)
    writer.add_token_types(types)
    tokenizer = MioTokenizer.from_dir(model_dir)
    writer.add_bos_token_id(tokenizer.token_to_id(tokenizer.bos_token))
    writer.add_eos_token_id(tokenizer.token_to_id(tokenizer.eos_token))
    writer.add_unk_token_id(tokenizer.token_to_id(tokenizer.unk_token))
    writer.add_pad_token_id(tokenizer.pad_id)
    # Every MIO prompt starts with BOS (MIO_PROTOCOL §2); the chat template leaves it to this flag.
    writer.add_add_bos_token(True)
    writer.add_add_eos_token(False)
    writer.add_add_space_prefix(bool(tokenizer.add_prefix_space))
    if variant == "instruct":
        # Instruct answers end with <|im_end|>: llama.cpp stops on an end-of-turn token.
        writer.add_eot_token_id(tokenizer.token_to_id(protocol.IM_END))
        writer.add_chat_template(chat_template())


def export_gguf(model_dir: Path, out: Path, gguf_type: str = "q4_0", *, force: bool = False,
                log: Callable[[str], None] | None = None) -> Path:
    """Write MIO's LLM in `model_dir` to `out` as GGUF of `gguf_type`; an existing `out` only with `force`.

    Written to a temporary file beside `out` and renamed at the end: an interrupted export leaves no
    half file under the name."""
    if gguf_type not in GGUF_TYPES:
        raise UsageError(f"unknown GGUF type {gguf_type!r}", hint=f"use one of {', '.join(GGUF_TYPES)}")
    out = Path(out)
    if out.exists() and not force:
        raise UsageError(f"{out} exists", hint="pass --force to replace it, or give another file name")
    if out.is_dir():
        raise UsageError(f"{out} is a folder", hint="give the GGUF file's name, e.g. mio-q4_0.gguf")
    import numpy

    gguf = _gguf()
    model_dir = Path(model_dir)
    config = _config(model_dir)
    files = weight_files(model_dir)
    plan = _Plan(gguf, config, gguf_type)
    temporary = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    writer = gguf.GGUFWriter(str(temporary), "llama")
    try:
        _metadata(writer, gguf, model_dir, config, gguf_type)
        layout: list[tuple[str, str, Any]] = []
        for path in files:
            for key, _dtype, shape in _header(path):
                name = plan.name(key)
                if name is None:
                    continue
                qtype = plan.qtype(name, shape)
                # the numpy dtype only tells it the shape is in elements (uint8 would mean bytes)
                writer.add_tensor_info(name, shape, numpy.dtype(numpy.float32), plan.nbytes(shape, qtype),
                                       raw_dtype=qtype)
                layout.append((key, name, qtype))
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        wanted = {key: (name, qtype) for key, name, qtype in layout}
        from miocli.model.quantize import read_tensors

        written = 0
        for path in files:
            for key, tensor in read_tensors(path, skip=lambda k: k not in wanted):
                writer.write_tensor_data(plan.data(key, tensor, wanted[key][1]))
                written += 1
                if log is not None and written % 32 == 0:
                    log(f"gguf: {written}/{len(layout)} tensors written")
        writer.close()
        os.replace(temporary, out)
    except BaseException:
        writer.close()
        temporary.unlink(missing_ok=True)
        raise
    if log is not None:
        log(f"gguf: wrote {out} ({gguf_type}, {len(layout)} tensors, {out.stat().st_size / 2**20:.1f} MiB)")
    return out


def cached_gguf(model_dir: Path, gguf_type: str, *, log: Callable[[str], None] | None = None) -> Path:
    """The GGUF of `model_dir` for `--engine llamacpp`: `$MIO_GGUF` when set, else the cached export,
    made on first use."""
    given = os.environ.get("MIO_GGUF")
    if given:
        path = Path(given)
        if not path.is_file():
            raise UsageError(f"$MIO_GGUF names {path}, which is not a file",
                             hint="export one with `mio export-gguf MODEL OUT.gguf`, or unset MIO_GGUF")
        return path
    from miocli.model.tiny import default_cache_dir

    stats = []
    for path in weight_files(Path(model_dir)):
        info = path.stat()
        stats.append([str(path.resolve()), info.st_size, info.st_mtime_ns])
    key = json.dumps([EXPORT_VERSION, gguf_type, stats])
    target = (default_cache_dir() / "quantized" /
              f"{hashlib.sha256(key.encode()).hexdigest()[:20]}-{gguf_type}.gguf")
    if not target.is_file():
        target.parent.mkdir(parents=True, exist_ok=True)
        if log is not None:
            log(f"exporting the LLM to {target} ({gguf_type}), once")
        export_gguf(Path(model_dir), target, gguf_type, force=True, log=log)
    return target
