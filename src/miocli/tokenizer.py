"""MIO's text tokenizer: sentencepiece plus the added multimodal tokens.

MIO's reference runs transformers' *slow* `LlamaTokenizer` (legacy mode). Recent transformers
releases no longer ship that class, and its quirks (how added tokens split the text, the
spaces its decoder puts around them) are part of the protocol: the model was trained on
those ids and the output parser expects those strings. So this module reproduces that
behaviour directly on top of sentencepiece, which also keeps transformers off the prompt
path (`--print-prompt` needs no model library at all).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from miocli.errors import ModelError

SPIECE_UNDERLINE = "\u2581"


@dataclass(frozen=True)
class AddedToken:
    content: str
    id: int
    special: bool = False
    lstrip: bool = False
    rstrip: bool = False


def _token_content(value: Any) -> str | None:
    if isinstance(value, str):
        return value
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        return value["content"]
    return None


class _Trie:
    """Leftmost-longest matcher for the added tokens (what the slow tokenizer splits on)."""

    def __init__(self, words: list[str]) -> None:
        self.root: dict[str, Any] = {}
        for word in words:
            node = self.root
            for char in word:
                node = node.setdefault(char, {})
            node[""] = True

    def split(self, text: str) -> list[str]:
        pieces: list[str] = []
        start = 0
        i = 0
        n = len(text)
        while i < n:
            node = self.root
            j = i
            match_end = -1
            while j < n and text[j] in node:
                node = node[text[j]]
                j += 1
                if "" in node:
                    match_end = j
            if match_end < 0:
                i += 1
                continue
            if i > start:
                pieces.append(text[start:i])
            pieces.append(text[i:match_end])
            start = i = match_end
        if start < n:
            pieces.append(text[start:])
        return pieces


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
        self.sp.Load(str(sp_model_path))
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
        self._trie = _Trie(list(self._added_by_content))
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
                content = _token_content(source.get(name))
                if content:
                    return content
            return default

        added: dict[int, AddedToken] = {}
        if (folder / "added_tokens.json").is_file():
            for content, token_id in _read_json(folder / "added_tokens.json").items():
                added[int(token_id)] = AddedToken(content, int(token_id))
        for token_id, spec in (config.get("added_tokens_decoder") or {}).items():
            if isinstance(spec, dict) and "content" in spec:
                added[int(token_id)] = AddedToken(
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
    def encode(self, text: str) -> list[int]:
        """Token ids of `text` (no BOS added: the prompt builder writes BOS as text)."""
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

    def __call__(
        self,
        texts: list[str],
        *,
        padding: bool = False,
        truncation: bool = False,
        max_length: int | None = None,
    ) -> dict[str, list[list[int]]]:
        """Batch encode like the reference: right truncation, left padding with the pad id."""
        rows = [self.encode(text) for text in texts]
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


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelError(f"{path} is not valid JSON: {exc}", hint="re-download the model files") from exc
    if not isinstance(data, dict):
        raise ModelError(f"{path} should hold a JSON object", hint="re-download the model files")
    return data
