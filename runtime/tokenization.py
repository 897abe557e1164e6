"""Prompt tokenization for the runtime: the `tokenizers` library and numpy only (no torch, no transformers).

A `PromptTokenizer` reads a tokenizer directory as transformers saves it (tokenizer.json plus
tokenizer_config.json, optionally special_tokens_map.json) and reproduces what the SD3 pipeline
asks transformers for: `tok(prompts, padding="max_length", max_length=L, truncation=True,
add_special_tokens=True)`. The ids are identical; in addition every prompt that did not fit is
reported with the text that was cut off, so callers can warn instead of truncating silently.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tokenizers import AddedToken, Tokenizer

from sd3trt.errors import Sd3trtError
from sd3trt.spec import CLIP_MAX_LENGTH, T5_DEFAULT_LENGTH, T5_MAX_LENGTH

TOKENIZER_JSON = "tokenizer.json"
TOKENIZER_CONFIG = "tokenizer_config.json"
SPECIAL_TOKENS_MAP = "special_tokens_map.json"
_SPECIAL_KEYS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")
_UNSET_MAX_LENGTH = 10**12  # transformers writes a huge number (1e30) when a tokenizer has no limit


@dataclass(frozen=True)
class TokenBatch:
    """Token ids of a batch of prompts, padded/truncated to one length, plus what truncation dropped."""

    ids: np.ndarray  # int64 [batch, max_length]
    truncated: tuple[bool, ...]  # per prompt: did it need more than max_length tokens?
    dropped_text: tuple[str, ...]  # per prompt: the part of the prompt that was cut off ("" if none)
    num_tokens: tuple[int, ...]  # per prompt: tokens it needs untruncated, special tokens included

    @property
    def any_truncated(self) -> bool:
        return any(self.truncated)

    @property
    def dropped_tokens(self) -> tuple[int, ...]:
        """Per prompt: how many tokens truncation cut off (0 if none)."""
        length = self.ids.shape[1]
        return tuple(max(0, n - length) if cut else 0 for cut, n in zip(self.truncated, self.num_tokens))


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise Sd3trtError(
            f"cannot read tokenizer file {path} ({e}); the file is damaged, re-export the bundle"
        ) from None
    if not isinstance(data, dict):
        raise Sd3trtError(
            f"tokenizer file {path} does not hold a JSON object; the file is damaged, re-export the bundle"
        )
    return data


def _token_text(value) -> str | None:
    """A special token as transformers writes it: a plain string or an AddedToken dict."""
    if isinstance(value, str):
        return value
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        return value["content"]
    return None


class PromptTokenizer:
    """Tokenizes prompts exactly like transformers' padding="max_length", truncation=True call."""

    def __init__(
        self,
        tokenizer: Tokenizer,
        max_length: int,
        pad_token: str,
        *,
        padding_side: str = "right",
        truncation_side: str = "right",
        source: str = "tokenizer",
    ):
        pad_id = tokenizer.token_to_id(pad_token)
        if pad_id is None:
            raise Sd3trtError(
                f"{source}: pad token {pad_token!r} is not in the vocabulary; the tokenizer files are damaged"
            )
        specials = tokenizer.num_special_tokens_to_add(False)
        if not isinstance(max_length, int) or isinstance(max_length, bool) or max_length <= specials:
            raise Sd3trtError(
                f"{source}: max_length {max_length!r} leaves no room for text "
                f"(the tokenizer adds {specials} special tokens); use a larger max_length"
            )
        for what, side in (("padding_side", padding_side), ("truncation_side", truncation_side)):
            if side not in ("left", "right"):
                raise Sd3trtError(f"{source}: {what} {side!r} is not supported; it must be 'left' or 'right'")
        self.max_length = max_length
        self.pad_token = pad_token
        self.pad_id = pad_id
        self.source = source
        self.vocab_size = tokenizer.get_vocab_size(with_added_tokens=True)
        self._tok = tokenizer
        self._tok.no_padding()
        self._tok.enable_truncation(max_length, stride=0, strategy="longest_first", direction=truncation_side)
        self._tok.enable_padding(direction=padding_side, pad_id=pad_id, pad_token=pad_token, length=max_length)

    @classmethod
    def from_dir(
        cls,
        path: str | Path,
        max_length: int | None = None,
        *,
        limit: int | None = None,
        pad_token: str | None = None,
    ) -> "PromptTokenizer":
        """Load a saved tokenizer directory.

        max_length: padded/truncated length; default the tokenizer's model_max_length.
        limit: largest max_length accepted (default the model_max_length from tokenizer_config.json).
        pad_token: overrides the pad token named in the config files.
        """
        path = Path(path)
        tj = path / TOKENIZER_JSON
        if not path.is_dir():
            raise Sd3trtError(f"tokenizer directory {path} does not exist; re-export the bundle")
        if not tj.is_file():
            raise Sd3trtError(f"{tj} is missing; re-export the bundle (the runtime needs the fast tokenizer file)")
        cfg_path = path / TOKENIZER_CONFIG
        config = _read_json(cfg_path) if cfg_path.is_file() else {}
        stm_path = path / SPECIAL_TOKENS_MAP
        special_map = _read_json(stm_path) if stm_path.is_file() else {}
        try:
            text = tj.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise Sd3trtError(f"cannot read tokenizer file {tj} ({e}); re-export the bundle") from None
        try:
            tokenizer = Tokenizer.from_str(text)
        except Exception as e:  # the tokenizers library raises plain Exception for bad files
            raise Sd3trtError(f"tokenizer file {tj} is damaged ({e}); re-export the bundle") from None
        _register_config_tokens(tokenizer, config, special_map, cfg_path)

        if pad_token is None:
            pad_token = _token_text(config.get("pad_token")) or _token_text(special_map.get("pad_token"))
        if pad_token is None:
            raise Sd3trtError(
                f"{path} names no pad token (neither {TOKENIZER_CONFIG} nor {SPECIAL_TOKENS_MAP} has 'pad_token'); "
                "re-export the bundle from a complete model directory"
            )
        model_max = config.get("model_max_length")
        if not isinstance(model_max, (int, float)) or isinstance(model_max, bool) or model_max >= _UNSET_MAX_LENGTH:
            model_max = None
        else:
            model_max = int(model_max)
        if limit is None:
            limit = model_max
        if max_length is None:
            if model_max is None:
                raise Sd3trtError(f"{cfg_path} gives no model_max_length; pass the sequence length explicitly")
            max_length = model_max
        if limit is not None and isinstance(max_length, int) and max_length > limit:
            raise Sd3trtError(
                f"sequence length {max_length} is more than the {limit} tokens the tokenizer in {path} supports; "
                f"use at most {limit}"
            )
        return cls(
            tokenizer,
            max_length,
            pad_token,
            padding_side=config.get("padding_side") or "right",
            truncation_side=config.get("truncation_side") or "right",
            source=str(path),
        )

    def __call__(self, prompts: str | list[str] | tuple[str, ...]) -> TokenBatch:
        if isinstance(prompts, str):
            prompts = [prompts]
        prompts = list(prompts)
        for i, p in enumerate(prompts):
            if not isinstance(p, str):
                raise Sd3trtError(f"prompt {i} is a {type(p).__name__}, not text; pass prompts as strings")
        if not prompts:
            return TokenBatch(np.zeros((0, self.max_length), np.int64), (), (), ())
        encs = self._tok.encode_batch(prompts, add_special_tokens=True)
        ids = np.array([e.ids for e in encs], dtype=np.int64)
        truncated, dropped, counts = [], [], []
        for prompt, enc in zip(prompts, encs):
            kept = sum(enc.attention_mask)
            over = [t for o in enc.overflowing for t in zip(o.special_tokens_mask, o.offsets)]
            extra = sum(1 for special, _ in over if not special)
            truncated.append(extra > 0)
            counts.append(kept + extra)
            dropped.append(_dropped_text(prompt, over) if extra else "")
        return TokenBatch(ids, tuple(truncated), tuple(dropped), tuple(counts))


def _dropped_text(prompt: str, overflow: list) -> str:
    spans = [(a, b) for special, (a, b) in overflow if not special]
    start = min(a for a, _ in spans)
    end = max(b for _, b in spans)
    return prompt[start:end]


def _register_config_tokens(tokenizer: Tokenizer, config: dict, special_map: dict, cfg_path: Path) -> None:
    """Make the tokens transformers treats as added/special ones match in the text here too.

    transformers adds the tokens of tokenizer_config.json's added_tokens_decoder and the named special
    tokens (e.g. SD3 CLIP-G's pad token "!") to the tokenizer, even where tokenizer.json (an older
    export) does not list them; files written by transformers 5 already list them all.
    """
    have = {t.content for t in tokenizer.get_added_tokens_decoder().values()}
    decoder = config.get("added_tokens_decoder") or {}
    if not isinstance(decoder, dict):
        raise Sd3trtError(
            f"{cfg_path}: added_tokens_decoder is not a mapping; the file is damaged, re-export the bundle"
        )
    for key, entry in sorted(decoder.items(), key=lambda kv: int(kv[0]) if str(kv[0]).isdigit() else -1):
        content = _token_text(entry)
        if content is None or not str(key).isdigit():
            raise Sd3trtError(f"{cfg_path}: added_tokens_decoder entry {key!r} is damaged; re-export the bundle")
        if content in have:
            continue
        flags = entry if isinstance(entry, dict) else {}
        special = bool(flags.get("special", True))
        token = AddedToken(
            content,
            single_word=bool(flags.get("single_word", False)),
            lstrip=bool(flags.get("lstrip", False)),
            rstrip=bool(flags.get("rstrip", False)),
            normalized=bool(flags.get("normalized", not special)),
            special=special,
        )
        (tokenizer.add_special_tokens if special else tokenizer.add_tokens)([token])
        if tokenizer.token_to_id(content) != int(key):
            raise Sd3trtError(
                f"{cfg_path}: token {content!r} has id {key} there but {tokenizer.token_to_id(content)} in "
                f"{TOKENIZER_JSON}; the tokenizer files do not belong together, re-export the bundle"
            )
        have.add(content)
    for source in (config, special_map):
        for key in _SPECIAL_KEYS:
            content = _token_text(source.get(key))
            if content and content not in have and tokenizer.token_to_id(content) is not None:
                tokenizer.add_special_tokens([AddedToken(content, normalized=False, special=True)])
                have.add(content)


def load_clip_tokenizer(path: str | Path) -> PromptTokenizer:
    """CLIP-L / CLIP-G: always 77 tokens, like the SD3 pipeline."""
    return PromptTokenizer.from_dir(path, CLIP_MAX_LENGTH, limit=CLIP_MAX_LENGTH)


def load_t5_tokenizer(path: str | Path, max_length: int = T5_DEFAULT_LENGTH) -> PromptTokenizer:
    """T5: max_length tokens (the pipeline's max_sequence_length), 512 at most."""
    if isinstance(max_length, bool) or not isinstance(max_length, int) or not 1 <= max_length <= T5_MAX_LENGTH:
        raise Sd3trtError(
            f"T5 sequence length {max_length!r} is out of range; use 1 to {T5_MAX_LENGTH} (default {T5_DEFAULT_LENGTH})"
        )
    return PromptTokenizer.from_dir(path, max_length, limit=T5_MAX_LENGTH)
