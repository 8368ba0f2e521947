"""MIO's text tokenizer: sentencepiece plus the added multimodal tokens.

MIO's reference runs transformers' *slow* `LlamaTokenizer` (legacy mode). Recent transformers
releases no longer ship that class, and its quirks (how added tokens split the text, the
spaces its decoder puts around them) are part of the protocol: the model was trained on
those ids and the output parser expects those strings. So this module reproduces that
behaviour directly on top of sentencepiece, which also keeps transformers off the prompt
path (`--print-prompt` needs no model library at all).
"""

from __future__ import annotations

import functools
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from miocli.errors import ModelError
from miocli.model.pieces import (
    REDOWNLOAD_HINT,
    AddedToken,
    Trie,
    load_sentencepiece,
    token_content,
    user_defined_pieces,
)

SPIECE_UNDERLINE = "\u2581"


class MioTokenizer:
    """Encode and decode exactly like MIO's reference tokenizer (slow LlamaTokenizer, legacy)."""

    def __init__(
        self,
        sp_model_path: Path,
        added_tokens: list[AddedToken],
        *,
        bos_token: str = "<|startoftext|>",
        eos_token: str = "<|endoftext|>",
        unk_token: str = "<unk>",
        pad_token: str | None = "<unk>",
        add_prefix_space: bool = True,
        legacy: bool = True,
        model_max_length: int = 4096,
    ) -> None:
        import sentencepiece

        self.sp = sentencepiece.SentencePieceProcessor()
        load_sentencepiece(self.sp, Path(sp_model_path))
        self.bos_token, self.eos_token, self.unk_token = bos_token, eos_token, unk_token
        self.pad_token = pad_token or unk_token
        self.add_prefix_space = add_prefix_space
        self.legacy = legacy
        self.model_max_length = model_max_length
        self.sp_size = self.sp.GetPieceSize()

        self._added_by_content: dict[str, AddedToken] = {}
        self._added_by_id: dict[int, AddedToken] = {}
        for token in added_tokens:
            self._added_by_content[token.content] = token
            self._added_by_id[token.id] = token
        # The special tokens always split the text, even when the files do not list them as added.
        for content in {bos_token, eos_token, unk_token, self.pad_token}:
            if content not in self._added_by_content:
                piece_id = self.sp.PieceToId(content)
                token = AddedToken(content, piece_id, special=True)
                self._added_by_content[content] = token
                self._added_by_id[piece_id] = token
        self.all_special_tokens = {bos_token, eos_token, unk_token, self.pad_token}
        # Added tokens that the decoder keeps apart from the sentencepiece text (and joins with spaces).
        self._separately_decoded = set(self._added_by_content) - self.all_special_tokens
        self._trie = Trie(list(self._added_by_content))
        self.vocab_size = max([self.sp_size - 1, *self._added_by_id]) + 1

    # ---- loading -------------------------------------------------------------------------
    @classmethod
    def from_dir(cls, folder: Path) -> MioTokenizer:
        folder = Path(folder)
        model_file = folder / "tokenizer.model"
        if not model_file.is_file():
            raise ModelError(
                f"{model_file} is missing", hint="the model folder needs the sentencepiece tokenizer.model"
            )
        config = _read_json(folder / "tokenizer_config.json") if (folder / "tokenizer_config.json").is_file() else {}
        special = (
            _read_json(folder / "special_tokens_map.json") if (folder / "special_tokens_map.json").is_file() else {}
        )

        def pick(name: str, default: str | None) -> str | None:
            for source in (config, special):
                content = token_content(source.get(name))
                if content:
                    return content
            return default

        added: dict[int, AddedToken] = {}
        if (folder / "added_tokens.json").is_file():
            added_path = folder / "added_tokens.json"
            for content, token_id in _read_json(added_path).items():
                added[_token_id(token_id, added_path)] = AddedToken(content, _token_id(token_id, added_path))
        decoder = config.get("added_tokens_decoder") or {}
        if not isinstance(decoder, dict):
            raise ModelError(f"{folder / 'tokenizer_config.json'}: added_tokens_decoder is not a JSON object",
                             hint=REDOWNLOAD_HINT)
        for token_id, spec in decoder.items():
            if isinstance(spec, dict) and isinstance(spec.get("content"), str):
                added[_token_id(token_id, folder / "tokenizer_config.json")] = AddedToken(
                    spec["content"],
                    int(token_id),
                    special=bool(spec.get("special", False)),
                    lstrip=bool(spec.get("lstrip", False)),
                    rstrip=bool(spec.get("rstrip", False)),
                )
        return cls(
            model_file,
            sorted(added.values(), key=lambda t: t.id),
            bos_token=pick("bos_token", "<|startoftext|>") or "<|startoftext|>",
            eos_token=pick("eos_token", "<|endoftext|>") or "<|endoftext|>",
            unk_token=pick("unk_token", "<unk>") or "<unk>",
            pad_token=pick("pad_token", None),
            add_prefix_space=bool(config.get("add_prefix_space", True)),
            legacy=bool(config.get("legacy", True)),
            model_max_length=int(config.get("model_max_length", 4096)),
        )

    # ---- ids -----------------------------------------------------------------------------
    def token_to_id(self, token: str) -> int:
        added = self._added_by_content.get(token)
        if added is not None:
            return added.id
        piece_id = self.sp.PieceToId(token)
        if piece_id == self.sp.unk_id() and token != self.unk_token:
            raise KeyError(token)
        return piece_id

    def id_to_token(self, token_id: int) -> str:
        added = self._added_by_id.get(token_id)
        if added is not None:
            return added.content
        if 0 <= token_id < self.sp_size:
            return self.sp.IdToPiece(token_id)
        return self.unk_token

    @functools.cached_property
    def longest_piece(self) -> int:
        """The most characters one token of plain text can stand for (a bound for length checks)."""
        return max((len(self.sp.IdToPiece(i)) for i in range(self.sp_size)), default=1) or 1

    @property
    def bos_id(self) -> int:
        return self.token_to_id(self.bos_token)

    @property
    def eos_id(self) -> int:
        return self.token_to_id(self.eos_token)

    @property
    def pad_id(self) -> int:
        return self.token_to_id(self.pad_token)

    # ---- encoding ------------------------------------------------------------------------
    def encode(self, text: str, *, plain: Sequence[tuple[int, int]] = ()) -> list[int]:
        """Token ids of `text` (no BOS added: the prompt builder writes BOS as text).

        `plain` lists (start, end) spans of user text: their characters are encoded as what they
        are, so a special-token string typed by a user (`<|im_end|>`, `<img5>`) gives the ids of
        its characters, never the token it names. Text without such spans encodes exactly as the
        reference does, and so does user text that holds no token string.
        """
        if plain:
            return self._encode_marked(text, plain)
        chunks = self._trie.split(text)
        # Added tokens may eat the whitespace beside them (lstrip/rstrip flags of the files).
        for i, chunk in enumerate(chunks):
            token = self._added_by_content.get(chunk)
            if token is None:
                continue
            if token.rstrip and i + 1 < len(chunks) and chunks[i + 1] not in self._added_by_content:
                chunks[i + 1] = chunks[i + 1].lstrip()
            if token.lstrip and i > 0 and chunks[i - 1] not in self._added_by_content:
                chunks[i - 1] = chunks[i - 1].rstrip()
        ids: list[int] = []
        for chunk in chunks:
            if not chunk:
                continue
            token = self._added_by_content.get(chunk)
            if token is not None:
                ids.append(token.id)
            else:
                ids.extend(self.sp.EncodeAsIds(chunk))
        return ids

    def _encode_marked(self, text: str, plain: Sequence[tuple[int, int]]) -> list[int]:
        mask = bytearray(len(text))
        for start, end in plain:
            start, end = max(start, 0), min(end, len(text))
            mask[start:end] = b"\x01" * max(end - start, 0)
        # Added tokens are taken only where the template wrote them; in user text they stay inside
        # the surrounding text, which sentencepiece then reads as characters.
        pieces = self._trie.split_spans(text, lambda start, end: mask.find(1, start, end) < 0)
        bounds = [[start, end] for start, end, _ in pieces]
        # Added tokens may eat the whitespace beside them (lstrip/rstrip flags of the files), as in `encode`.
        for i, (start, end, is_token) in enumerate(pieces):
            if not is_token:
                continue
            token = self._added_by_content[text[start:end]]
            if token.rstrip and i + 1 < len(pieces) and not pieces[i + 1][2]:
                after = bounds[i + 1]
                while after[0] < after[1] and text[after[0]].isspace():
                    after[0] += 1
            if token.lstrip and i > 0 and not pieces[i - 1][2]:
                before = bounds[i - 1]
                while before[1] > before[0] and text[before[1] - 1].isspace():
                    before[1] -= 1
        ids: list[int] = []
        for (start, end, is_token), (chunk_start, chunk_end) in zip(pieces, bounds):
            if is_token:
                ids.append(self._added_by_content[text[start:end]].id)
            elif chunk_start < chunk_end:
                ids.extend(self._encode_chunk(text, chunk_start, chunk_end, mask))
        return ids

    def _encode_chunk(self, text: str, start: int, end: int, mask: bytearray) -> list[int]:
        """Sentencepiece ids of text[start:end], never reading a user-defined piece out of user text.

        Sentencepiece itself reads its user-defined pieces anywhere in the text (`<|im_start|>` and
        `<|im_end|>` are such pieces in Yi's vocabulary). Where one would be read from user text, the
        text is cut after the piece's first character, so the characters on either side are text.
        """
        if mask.find(1, start, end) < 0 or self._user_defined is None:
            return self.sp.EncodeAsIds(text[start:end])
        ids: list[int] = []
        position = start
        while position < end:
            cut = self._first_forged_piece(text, position, end, mask)
            stop = end if cut is None else cut + 1
            segment = text[position:stop]
            ids.extend(self.sp.EncodeAsIds(segment) if position == start else self._encode_continuation(segment))
            position = stop
        return ids

    def _first_forged_piece(self, text: str, start: int, end: int, mask: bytearray) -> int | None:
        """Where sentencepiece would first read a user-defined piece touching user text in text[start:end]."""
        pieces = self._user_defined
        assert pieces is not None
        i = start
        while i < end:
            ends = pieces.ends_at(text, i, end)
            if not ends:
                i += 1
            elif mask.find(1, i, ends[-1]) >= 0:
                return i
            else:
                i = ends[-1]
        return None

    def _encode_continuation(self, text: str) -> list[int]:
        """Ids of text that continues a chunk: without the dummy prefix sentencepiece puts at a chunk's start."""
        if not self._adds_dummy_prefix:
            return self.sp.EncodeAsIds(text)
        # The non-legacy Llama tokenizer's way: encode behind the unk string, which is read as
        # characters, and drop the ids of that string.
        lead = len(self.sp.EncodeAsIds(self.unk_token))
        return self.sp.EncodeAsIds(self.unk_token + text)[lead:]

    @functools.cached_property
    def _adds_dummy_prefix(self) -> bool:
        pieces = self.sp.EncodeAsPieces("a")
        return bool(pieces) and pieces[0].startswith(SPIECE_UNDERLINE)

    @functools.cached_property
    def _user_defined(self) -> Trie | None:
        """Sentencepiece's user-defined pieces of more than one character (a single one is its own text)."""
        words = [piece for piece in user_defined_pieces(self.sp.serialized_model_proto()) if len(piece) > 1]
        return Trie(words) if words else None

    def __call__(
        self,
        texts: list[str],
        *,
        padding: bool = False,
        truncation: bool = False,
        max_length: int | None = None,
        plain: Sequence[Sequence[tuple[int, int]]] | None = None,
    ) -> dict[str, list[list[int]]]:
        """Batch encode like the reference: right truncation, left padding with the pad id.

        `plain` gives each text's user-text spans (see `encode`).
        """
        spans = plain if plain is not None else [()] * len(texts)
        rows = [self.encode(text, plain=row_plain) for text, row_plain in zip(texts, spans)]
        if truncation:
            limit = max_length if max_length is not None else self.model_max_length
            rows = [row[:limit] for row in rows]
        masks = [[1] * len(row) for row in rows]
        if padding:
            width = max((len(row) for row in rows), default=0)
            pad = self.pad_id
            masks = [[0] * (width - len(row)) + mask for row, mask in zip(rows, masks)]
            rows = [[pad] * (width - len(row)) + row for row in rows]
        return {"input_ids": rows, "attention_mask": masks}

    # ---- decoding ------------------------------------------------------------------------
    def _pieces_to_string(self, tokens: list[str]) -> str:
        # Mirrors the legacy Llama decoder, including where it inserts spaces around special
        # tokens: the spacing ends up in the model's outputs the parser reads.
        tokens = list(tokens)
        if tokens and tokens[0].startswith(SPIECE_UNDERLINE) and self.add_prefix_space:
            tokens[0] = tokens[0][1:]
        pending: list[str] = []
        out = ""
        prev_is_special = False
        for i, token in enumerate(tokens):
            if token in self.all_special_tokens:
                if not prev_is_special and i != 0 and self.legacy:
                    out += " "
                out += self.sp.DecodePieces(pending) + token
                prev_is_special = True
                pending = []
            else:
                if (
                    prev_is_special
                    and i == 1
                    and self.add_prefix_space
                    and not token.startswith(SPIECE_UNDERLINE)
                ):
                    out += " "
                pending.append(token)
                prev_is_special = False
        return out + self.sp.DecodePieces(pending)

    def decode(self, ids: list[int]) -> str:
        """Text of `ids` with special tokens kept, as the reference's batch_decode gives it."""
        parts: list[str] = []
        pending: list[str] = []
        for token_id in ids:
            token = self.id_to_token(int(token_id))
            if token in self._separately_decoded:
                if pending:
                    text = self._pieces_to_string(pending)
                    if text:
                        parts.append(text)
                    pending = []
                parts.append(token)
            else:
                pending.append(token)
        if pending:
            parts.append(self._pieces_to_string(pending))
        return " ".join(parts)

    def batch_decode(self, rows: list[list[int]]) -> list[str]:
        return [self.decode(row) for row in rows]


def _token_id(value: Any, path: Path) -> int:
    """An added token's id as the files give it (an int, or a str key of added_tokens_decoder)."""
    try:
        token_id = int(value)
    except (TypeError, ValueError):
        token_id = -1
    if token_id < 0 or isinstance(value, bool | float):
        raise ModelError(f"{path} gives a token the id {value!r}, not a non-negative integer", hint=REDOWNLOAD_HINT)
    return token_id


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelError(f"{path} is not valid JSON: {exc}", hint="re-download the model files") from exc
    if not isinstance(data, dict):
        raise ModelError(f"{path} should hold a JSON object", hint="re-download the model files")
    return data
