"""Tiny random MIO checkpoints with the real layout, for tests and `mio demo`.

A tiny checkpoint is a model folder laid out exactly like `m-a-p/MIO-7B-*` (MIO_PROTOCOL §1)
but with a few-kilobyte LLM, tokenizer and codecs, so every code path that loads and runs the
real model runs here in seconds. Outputs are noise: the weights are random.

Each component writes its own part of the folder; the codecs contribute theirs through
`COMPONENT_BUILDERS` (module path and function), so adding a codec does not touch the LLM part.
"""

from __future__ import annotations

import importlib
import io
import json
import shutil
import tempfile
from collections.abc import Iterable
from pathlib import Path

from miocli import protocol

MARKER_FILE = "mio_tiny.json"
TINY_FORMAT_VERSION = 2

# Name → "module:function" taking (model_dir: Path, seed: int).
COMPONENT_BUILDERS: dict[str, str] = {
    "llm": "miocli.model.tiny:build_tiny_llm",
    "speech": "miocli.codecs.speech.tiny:build_tiny",
    "seed": "miocli.codecs.seed.tiny:build_tiny",
    "unclip": "miocli.codecs.seed.unclip_tiny:build_tiny",
}

YI_USER_DEFINED_SYMBOLS = ["<|Human|>", "<|Assistant|>", "<|System|>", "<|im_start|>", "<|im_end|>", "<|im_sep|>"]

# Enough varied English for a small BPE vocabulary; the task prompts are in it so that they
# encode to few tokens, as they would with the real vocabulary.
_CORPUS_LINES = [
    protocol.STD_SYSTEM,
    protocol.VOICE_SYSTEM,
    "Please provide an accurate and detailed description of this image.",
    "Please transcribe this speech.",
    "Please generate an image according to the caption.",
    "The transcription is ``hello world''. Please generate a speech according to the given transcription.",
    "Please generate a video for ``a dog running on the beach''.",
    "Generate a visual story about a fox who learns to fly.",
    "Question: what is the capital of France? Answer: Paris is the capital of France.",
    "A red kite flies over the green hill while the children laugh and run in the warm summer wind.",
    "The quick brown fox jumps over the lazy dog near the quiet river bank.",
    "She sells sea shells by the sea shore, and the shells she sells are surely sea shells.",
    "In the morning the market is busy with people buying bread, fruit, fish and flowers.",
    "A small robot walks through the city at night, looking at the lights and the rain.",
    "What is in this picture? A cat is sleeping on a blue chair next to the window.",
    "Numbers like 1, 2, 3, 42 and 2024 appear in text; so do symbols such as +, -, = and ?.",
]


def build_tiny_llm(model_dir: Path, seed: int = 0, variant: str = "instruct", hidden_size: int = 64) -> None:
    """Tokenizer files and a tiny LlamaForCausalLM with MIO's vocabulary layout.

    Its 4 attention heads are `hidden_size / 4` wide: 128 gives head size 32, the smallest vLLM's
    CPU attention accepts (the engine tests use it).
    """
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    vocab_size = write_tiny_tokenizer(model_dir)
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=4096,
        rms_norm_eps=1e-5,
        rope_theta=5_000_000.0,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    model.save_pretrained(model_dir, safe_serialization=True)
    config_path = model_dir / "config.json"
    data = json.loads(config_path.read_text())
    data["mio_variant"] = variant
    config_path.write_text(json.dumps(data, indent=2))


def write_tiny_tokenizer(model_dir: Path, base_vocab: int | None = None) -> int:
    """Write a Yi-style sentencepiece tokenizer plus every MIO added token; returns the vocab size.

    `base_vocab` pads the sentencepiece model with unused pieces to that many (Yi's 64,000 for a
    real-size checkpoint), so the media tokens get their real ids.
    """
    import sentencepiece

    model_dir.mkdir(parents=True, exist_ok=True)
    buffer = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(_CORPUS_LINES * 3),
        model_writer=buffer,
        model_type="bpe",
        vocab_size=500,
        hard_vocab_limit=False,
        character_coverage=1.0,
        byte_fallback=True,
        split_digits=True,
        allow_whitespace_only_pieces=True,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        add_dummy_prefix=False,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        unk_piece="<unk>",
        bos_piece=protocol.BOS,
        eos_piece=protocol.EOS,
        user_defined_symbols=YI_USER_DEFINED_SYMBOLS,
        num_threads=1,
        minloglevel=2,
    )
    proto = buffer.getvalue()
    if base_vocab is not None:
        proto = _pad_pieces(proto, base_vocab)
    (model_dir / "tokenizer.model").write_bytes(proto)
    sp = sentencepiece.SentencePieceProcessor(model_proto=proto)
    next_id = sp.GetPieceSize()

    added = (
        [f"<img{i}>" for i in range(protocol.IMAGE_CODEBOOK_SIZE)]
        + [f"<spch{i}>" for i in range(protocol.SPEECH_CODEBOOK_SIZE * protocol.SPEECH_LAYERS_IN_OUTPUT)]
        + [protocol.IMAGE_BEGIN, protocol.IMAGE_END, protocol.SPEECH_BEGIN, protocol.SPEECH_END]
    )
    added_ids = {token: next_id + i for i, token in enumerate(added)}
    (model_dir / "added_tokens.json").write_text(json.dumps(added_ids, indent=0))

    def spec(content: str, special: bool) -> dict[str, object]:
        return {"content": content, "lstrip": False, "normalized": not special, "rstrip": False,
                "single_word": False, "special": special}

    decoder = {str(sp.PieceToId(t)): spec(t, True) for t in ("<unk>", protocol.BOS, protocol.EOS)}
    decoder.update({str(i): spec(t, False) for t, i in added_ids.items()})
    special_map = {
        "bos_token": protocol.BOS,
        "eos_token": protocol.EOS,
        "unk_token": "<unk>",
        "pad_token": "<unk>",
    }
    tokenizer_config = {
        "add_bos_token": False,
        "add_eos_token": False,
        "add_prefix_space": True,
        "added_tokens_decoder": decoder,
        "clean_up_tokenization_spaces": False,
        "legacy": True,
        "model_max_length": 4096,
        "sp_model_kwargs": {},
        "tokenizer_class": "LlamaTokenizer",
        **special_map,
    }
    (model_dir / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=1))
    (model_dir / "special_tokens_map.json").write_text(json.dumps(special_map, indent=1))
    return next_id + len(added)


def _pad_pieces(proto: bytes, size: int) -> bytes:
    """The sentencepiece model with UNUSED pieces appended up to `size` (encoding never produces them)."""
    from sentencepiece import sentencepiece_model_pb2

    model = sentencepiece_model_pb2.ModelProto()
    model.ParseFromString(proto)
    for number in range(len(model.pieces), size):
        piece = model.pieces.add()
        piece.piece = f"<unused{number}>"
        piece.score = 0.0
        piece.type = sentencepiece_model_pb2.ModelProto.SentencePiece.UNUSED
    return model.SerializeToString()


def build_tiny_checkpoint(
    dest: Path,
    *,
    variant: str = "instruct",
    components: Iterable[str] | None = None,
    seed: int = 0,
) -> Path:
    """Build a tiny checkpoint into `dest` (created; must not exist or be empty)."""
    dest = Path(dest)
    names = list(components) if components is not None else list(COMPONENT_BUILDERS)
    unknown = [n for n in names if n not in COMPONENT_BUILDERS]
    if unknown:
        raise ValueError(f"unknown tiny components {unknown}; known: {sorted(COMPONENT_BUILDERS)}")
    dest.mkdir(parents=True, exist_ok=True)
    for name in names:
        module_name, function_name = COMPONENT_BUILDERS[name].split(":")
        builder = getattr(importlib.import_module(module_name), function_name)
        if name == "llm":
            builder(dest, seed, variant)
        else:
            builder(dest, seed)
    marker = {"format": TINY_FORMAT_VERSION, "variant": variant, "components": names, "seed": seed}
    (dest / MARKER_FILE).write_text(json.dumps(marker, indent=1))
    return dest


def default_cache_dir() -> Path:
    import os

    root = os.environ.get("MIO_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "miocli"
    )
    return Path(root)


def ensure_tiny_checkpoint(variant: str = "instruct", cache_dir: Path | None = None) -> Path:
    """The cached tiny checkpoint for `variant`, built once (atomically) when absent or stale."""
    cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    components = sorted(COMPONENT_BUILDERS)
    target = cache_dir / f"tiny-{variant}-v{TINY_FORMAT_VERSION}"
    marker = target / MARKER_FILE
    if marker.is_file():
        try:
            if sorted(json.loads(marker.read_text()).get("components", [])) == components:
                return target
        except (OSError, json.JSONDecodeError):
            pass
    cache_dir.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".tiny-{variant}-", dir=cache_dir))
    try:
        build_tiny_checkpoint(staging, variant=variant, components=components)
        if target.exists():
            shutil.rmtree(target)
        staging.rename(target)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    return target
