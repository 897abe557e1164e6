"""Prompt encoding exactly as StableDiffusion3 pipelines assemble it, with a cache for repeated prompts.

prompt_embeds = concat_seq( pad_to_T5_width( concat_feat(CLIP-L penultimate, CLIP-G penultimate) ), T5 )
pooled        = concat_feat(CLIP-L pooled projection, CLIP-G pooled projection)
Without T5 the T5 part is zeros of [max_sequence_length, joint_attention_dim], as diffusers does.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from sd3trt.runtime.tokenization import PromptTokenizer, load_clip_tokenizer, load_t5_tokenizer
from sd3trt.spec import ModelFacts


@dataclass
class PromptEmbedding:
    embeds: np.ndarray  # [1, 77 + t5_len, joint_attention_dim] float32
    pooled: np.ndarray  # [1, pooled_projection_dim] float32
    dropped: dict[str, int] = field(default_factory=dict)  # encoder -> tokens truncation cut off (only those that cut)

    def truncation_note(self, what: str = "prompt") -> str | None:
        """One short line naming how many tokens each encoder dropped (never the text), or None."""
        if not self.dropped:
            return None
        return f"{what} truncated: " + ", ".join(f"{n} dropped {k} tokens" for n, k in self.dropped.items())


class PromptEncoder:
    """Owns the tokenizers and calls the text-encoder runners through `get_runner(name)`.

    Keeps the last `cache_size` embeddings (0: none); safe to call from several threads (the cache and
    the lazily made T5 tokenizers are guarded by a lock; two threads may encode the same new prompt twice).
    """

    def __init__(self, facts: ModelFacts, tokenizer_dirs: dict[str, Path], get_runner, cache_size: int = 16):
        self.facts = facts
        self.clip = {n: load_clip_tokenizer(tokenizer_dirs[n]) for n in ("clip_l", "clip_g")}
        self.t5_dir = tokenizer_dirs.get("t5")
        self.t5: dict[int, PromptTokenizer] = {}
        self.get_runner = get_runner
        self.cache: OrderedDict[tuple, PromptEmbedding] = OrderedDict()
        self.cache_size = cache_size
        self._lock = threading.Lock()

    def _t5_tokenizer(self, length: int) -> PromptTokenizer:
        with self._lock:
            if length not in self.t5:
                self.t5[length] = load_t5_tokenizer(self.t5_dir, length)
            return self.t5[length]

    def clear(self) -> None:
        with self._lock:
            self.cache.clear()

    def encode(self, prompt: str, t5_length: int) -> PromptEmbedding:
        key = (prompt, t5_length)
        with self._lock:
            if key in self.cache:
                self.cache.move_to_end(key)
                return self.cache[key]
        f = self.facts
        dropped: dict[str, int] = {}
        hidden, pooled = [], []
        for name, tok in self.clip.items():
            batch = tok([prompt])
            dropped[name] = batch.dropped_tokens[0]
            out = self.get_runner(name).run({"input_ids": batch.ids})
            pooled.append(out["text_embeds"].astype(np.float32))
            hidden.append(out["hidden_states"].astype(np.float32))
        clip = np.concatenate(hidden, axis=-1)
        clip = np.pad(clip, ((0, 0), (0, 0), (0, f.joint_attention_dim - clip.shape[-1])))
        if self.t5_dir is not None:
            batch = self._t5_tokenizer(t5_length)([prompt])
            dropped["t5"] = batch.dropped_tokens[0]
            t5 = self.get_runner("t5").run({"input_ids": batch.ids})["last_hidden_state"].astype(np.float32)
        else:
            t5 = np.zeros((1, t5_length, f.joint_attention_dim), np.float32)
        emb = PromptEmbedding(np.concatenate([clip, t5], axis=1), np.concatenate(pooled, axis=-1),
                              {n: k for n, k in dropped.items() if k})
        if self.cache_size > 0:
            with self._lock:
                self.cache[key] = emb
                while len(self.cache) > self.cache_size:
                    self.cache.popitem(last=False)
        return emb
