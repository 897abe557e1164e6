"""Small stand-ins for SD3's three tokenizers, built locally and deterministically (no hub).

They have the structure of the real checkpoints' tokenizers, only with a small vocabulary:

* CLIP-L (`tokenizer/`) and CLIP-G (`tokenizer_2/`): byte-level BPE with the `</w>` end-of-word
  suffix, NFC + whitespace-collapsing + lowercase normalization, the CLIP pre-tokenizer regex,
  `<|startoftext|>` ... `<|endoftext|>` around every prompt and model_max_length 77. The vocabulary
  is laid out like OpenAI's: the 256 byte symbols (so `!` is id 0), the same 256 with `</w>`, one
  entry per merge, then the two special tokens. CLIP-L pads with `<|endoftext|>`, CLIP-G with `!`
  (id 0), exactly like the SD3 checkpoints. The merges are learned by a plain BPE merge count over
  the built-in corpus below; every byte is in the vocabulary, so any text (CJK, emoji) tokenizes.
* T5 (`tokenizer_3/`): a sentencepiece-style Unigram model with Metaspace pre-tokenization,
  `<pad>`=0, `</s>`=1, `<unk>`=2, a few hundred pieces scored by log frequency over the corpus
  plus single characters, `</s>` appended by the post-processor, 100 `<extra_id_N>` sentinels at the
  end of the vocabulary (in reverse order, like the real one) and model_max_length 512.

The files are written by transformers' own `save_pretrained`, so they are exactly what
`CLIPTokenizer.from_pretrained` / `T5TokenizerFast.from_pretrained` read (and what
`StableDiffusion3Img2ImgPipeline.save_pretrained` writes again).
"""

from __future__ import annotations

import math
import re
from collections import Counter
from pathlib import Path

CLIP_MAX_LENGTH = 77
T5_MAX_LENGTH = 512
CLIP_MERGES = 320  # vocabulary: 512 byte symbols + merges + 2 special tokens
T5_WORD_PIECES = 260  # "▁word" pieces
T5_SUBWORD_PIECES = 140  # inner pieces (suffixes, common letter groups)
T5_EXTRA_IDS = 100
BOS, EOS = "<|startoftext|>", "<|endoftext|>"

# Prompt-like English: what the merges and pieces are learned from.
CORPUS = """\
a photo of a cat sitting on a wooden table next to a window, soft morning light
a painting of a mountain landscape at sunset with a lake and pine trees, oil on canvas
an astronaut riding a horse on the moon, highly detailed, digital art, trending on artstation
a portrait of an old man with a long white beard, dramatic lighting, black and white photography
a futuristic city at night with neon lights and flying cars, cyberpunk style, rain on the streets
a bowl of fresh fruit on a kitchen counter, still life, natural light, sharp focus
a red sports car driving along a coastal road, motion blur, cinematic, wide angle lens
a cozy cabin in the snowy forest with smoke rising from the chimney, warm light in the windows
a watercolor painting of a small village by the river, spring flowers, blue sky and white clouds
a close up photo of a dog with brown eyes looking at the camera, shallow depth of field, bokeh
a fantasy castle on a hill surrounded by clouds, epic scale, matte painting, concept art
a young woman reading a book in a library, golden hour, film grain, 35mm photograph
an illustration of a dragon flying over the ocean, vibrant colors, detailed scales and wings
a minimalist poster of a lighthouse on a rocky shore, flat design, pastel colors
a street market in the old town with people walking and colorful stalls, documentary photography
the interior of a modern living room with large windows, plants, wooden floor, architectural render
a bird sitting on a branch in the garden, macro photography, green leaves in the background
a sailing boat on a calm sea under a starry night sky, long exposure, the milky way
a bright yellow sunflower field in summer, blue sky, high resolution, award winning photo
a knight in shining armor standing in front of a burning village, dark fantasy, dramatic clouds
a robot making coffee in a small cafe, cute, 3d render, soft shadows, studio lighting
a plate of pasta with tomato sauce and basil, food photography, top view, on a white table
a snowy mountain peak above the clouds at sunrise, aerial view, crisp and clear
a black cat with green eyes sleeping on a red blanket, warm and cozy, detailed fur
an ancient temple in the jungle covered with moss and vines, light rays through the trees
a child flying a kite on the beach, summer day, happy, candid photo, bright and colorful
a steampunk airship above a victorian city, brass and copper, intricate details, sepia tones
a glass of red wine on a table in a restaurant, candle light, dark background, elegant
a field of lavender in provence with an old stone house, impressionist painting, soft brush strokes
a tiger walking through tall grass, wildlife photography, telephoto lens, golden light
the skyline of a big city reflected in the water at dusk, long exposure, blue hour
a hand drawn map of a fantasy kingdom with forests, rivers, mountains and small towns
a vintage bicycle leaning against a brick wall with flowers, film photo, faded colors
a portrait of a girl with freckles and red hair, natural light, close up, high detail
a waterfall in a green valley with a rainbow, mist, lush vegetation, landscape photography
a space station orbiting a blue planet, stars in the background, science fiction, realistic
an owl sitting on a tree at night under the full moon, mysterious, dark blue tones
a cup of tea and a slice of cake on a wooden tray, cozy afternoon, shallow focus
a busy train station with people and trains, black and white, street photography, motion
a small house by the sea with a white fence and a garden full of roses, summer afternoon
"""


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2 / CLIP byte -> printable character table (the byte-level alphabet, in vocabulary order)."""
    bs = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def _corpus_lines() -> list[str]:
    return [line for line in CORPUS.splitlines() if line.strip()]


def _learn_bpe(words: Counter, num_merges: int) -> list[tuple[str, str]]:
    """Classic BPE merge learning; ties broken by the pair's text, so the result is deterministic."""
    segs = {w: tuple(w[:-1]) + (w[-1] + "</w>",) for w in words}
    merges: list[tuple[str, str]] = []
    for _ in range(num_merges):
        pairs: Counter = Counter()
        for w, seg in segs.items():
            for a, b in zip(seg, seg[1:]):
                pairs[(a, b)] += words[w]
        if not pairs:
            break
        best = min(pairs, key=lambda p: (-pairs[p], p))
        if pairs[best] < 2:
            break
        merges.append(best)
        a, b = best
        for w, seg in segs.items():
            if len(seg) < 2:
                continue
            out, i = [], 0
            while i < len(seg):
                if i + 1 < len(seg) and seg[i] == a and seg[i + 1] == b:
                    out.append(a + b)
                    i += 2
                else:
                    out.append(seg[i])
                    i += 1
            segs[w] = tuple(out)
    return merges


def _clip_vocab_and_merges() -> tuple[dict[str, int], list[tuple[str, str]]]:
    from transformers import CLIPTokenizer

    # An empty CLIPTokenizer carries transformers' CLIP normalizer and pre-tokenizer: learn on its words.
    backend = CLIPTokenizer().backend_tokenizer
    words: Counter = Counter()
    for line in _corpus_lines():
        for word, _ in backend.pre_tokenizer.pre_tokenize_str(backend.normalizer.normalize_str(line)):
            words[word] += 1
    merges = _learn_bpe(words, CLIP_MERGES)
    alphabet = list(_bytes_to_unicode().values())
    vocab: dict[str, int] = {}
    for tok in alphabet + [c + "</w>" for c in alphabet] + [a + b for a, b in merges] + [BOS, EOS]:
        vocab.setdefault(tok, len(vocab))
    return vocab, merges


def _t5_vocab() -> list[tuple[str, float]]:
    """Sentencepiece-style pieces scored by log frequency: words, inner pieces and single characters."""
    words: Counter = Counter()
    for line in _corpus_lines():
        for raw in line.split():
            for part in re.findall(r"[A-Za-z]+|[0-9]+|[^\sA-Za-z0-9]", raw):
                words[part] += 1
    word_pieces = Counter({"▁" + w: c for w, c in words.items() if w.isalpha()})
    inner: Counter = Counter()
    for w, c in words.items():
        if w.isalpha() and len(w) > 3:
            for n in (2, 3, 4):
                for i in range(1, len(w) - n + 1):
                    inner[w[i : i + n]] += c
    chosen: Counter = Counter()
    for pieces, k in ((word_pieces, T5_WORD_PIECES), (inner, T5_SUBWORD_PIECES)):
        for p in sorted(pieces, key=lambda p: (-pieces[p], p))[:k]:
            chosen[p] += pieces[p]
    chars = Counter("".join(_corpus_lines()).replace(" ", ""))
    singles = (
        "▁abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"
        + "!\"#$%&'()*+,-./:;<=>?@[\\]^_`{|}~"
        + "àáâäãåçèéêëìíîïñòóôöõùúûüýÿßæøœÀÁÂÄÇÈÉÊÑÖÜ€£¥°–—…‘’“”«»"
    )
    for ch in singles:
        if ch not in chosen:
            chosen[ch] = chars.get(ch, 0) + 1
    chosen["▁"] += sum(words.values())
    total = sum(chosen.values())
    scored = sorted(((p, round(math.log(c / total), 4)) for p, c in chosen.items()), key=lambda x: (-x[1], x[0]))
    specials = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)]
    sentinels = [(f"<extra_id_{i}>", 0.0) for i in range(T5_EXTRA_IDS - 1, -1, -1)]
    return specials + scored + sentinels


def write_tiny_tokenizers(model_dir: Path) -> dict:
    """Write tokenizer/ (CLIP-L), tokenizer_2/ (CLIP-G), tokenizer_3/ (T5) under model_dir.

    Returns the facts the text-encoder configs need: vocabulary sizes and special token ids.
    """
    from transformers import CLIPTokenizer, T5TokenizerFast

    model_dir = Path(model_dir)
    vocab, merges = _clip_vocab_and_merges()
    clip_l = CLIPTokenizer(vocab=dict(vocab), merges=list(merges), pad_token=EOS, model_max_length=CLIP_MAX_LENGTH)
    clip_g = CLIPTokenizer(vocab=dict(vocab), merges=list(merges), pad_token="!", model_max_length=CLIP_MAX_LENGTH)
    t5 = T5TokenizerFast(vocab=_t5_vocab(), extra_ids=T5_EXTRA_IDS, model_max_length=T5_MAX_LENGTH)
    for sub, tok in (("tokenizer", clip_l), ("tokenizer_2", clip_g), ("tokenizer_3", t5)):
        tok.save_pretrained(model_dir / sub)

    facts = {
        "clip_vocab_size": len(clip_l),
        "clip_bos_id": clip_l.bos_token_id,
        "clip_eos_id": clip_l.eos_token_id,
        "clip_l_pad_id": clip_l.pad_token_id,
        "clip_g_pad_id": clip_g.pad_token_id,
        "t5_vocab_size": len(t5),
        "t5_pad_id": t5.pad_token_id,
        "t5_eos_id": t5.eos_token_id,
    }
    assert len(clip_g) == facts["clip_vocab_size"] and facts["clip_g_pad_id"] == 0, facts
    assert (facts["t5_pad_id"], facts["t5_eos_id"], t5.unk_token_id) == (0, 1, 2), facts
    return facts
