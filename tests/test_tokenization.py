"""The runtime tokenizer (tokenizers + numpy) against transformers 5, on the tiny SD3 tokenizers."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from sd3trt.errors import Sd3trtError
from sd3trt.export.tiny_tokenizers import write_tiny_tokenizers
from sd3trt.runtime.tokenization import PromptTokenizer, TokenBatch, load_clip_tokenizer, load_t5_tokenizer

SUBDIRS = ("tokenizer", "tokenizer_2", "tokenizer_3")

LONG_ENGLISH = " ".join(
    (
        "a detailed photo of an old stone bridge over a quiet river in the mountains, morning fog, "
        "soft golden light, reflections in the water, pine trees, 35mm film, award winning"
    ).split()
    * 12
)  # about 300 words
LONG_SIMPLE = " ".join(["a", "cat"] * 150)  # 300 words, one token each in every tiny tokenizer

PROMPTS = [
    "",
    "a photo of a cat sitting on a wooden table",
    "Crème brûlée à la française, naïve café, Ångström, Straße",
    "東京の夜景、上海城市夜景 and 서울 at night",
    "a 🐱 wearing a 🎩, 🚀✨ 👩‍🚀 emoji",
    "!!! ?? ... --- (a), [b]; {c}: \"quoted\" 'single' @#$%^&* <tag> a/b\\c",
    "   lots   of\t\tspaces \n\n and   newlines   ",
    "A PHOTO OF A CAT IN UPPERCASE, Mixed Case Words",
    "1234567890 3.14159 2024-01-01 100% 4k 8K x1.5",
    "don't won't it's we're I'll they've she'd",
    "<|startoftext|> a cat <|endoftext|> !hello!",
    "<extra_id_0> a <extra_id_7> sentinel <pad></s><unk>",
    LONG_ENGLISH,
    LONG_SIMPLE,
    "🐱" * 60,
]


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("tiny_tokenizers")
    facts = write_tiny_tokenizers(d)
    (d / "facts.json").write_text(json.dumps(facts))
    return d


@pytest.fixture(scope="module")
def facts(tok_dir) -> dict:
    return json.loads((tok_dir / "facts.json").read_text())


@pytest.fixture(scope="module")
def hf(tok_dir):
    from transformers import CLIPTokenizer, T5TokenizerFast

    return {
        "tokenizer": CLIPTokenizer.from_pretrained(tok_dir / "tokenizer"),
        "tokenizer_2": CLIPTokenizer.from_pretrained(tok_dir / "tokenizer_2"),
        "tokenizer_3": T5TokenizerFast.from_pretrained(tok_dir / "tokenizer_3"),
    }


def _hf_ids(tok, prompts, length):
    out = tok(prompts, padding="max_length", max_length=length, truncation=True, add_special_tokens=True)
    return np.array(out["input_ids"], dtype=np.int64)


def _check_against_hf(rt: PromptTokenizer, hf_tok, prompts, length):
    batch = rt(prompts)
    assert isinstance(batch, TokenBatch)
    assert batch.ids.dtype == np.int64 and batch.ids.shape == (len(prompts), length)
    np.testing.assert_array_equal(batch.ids, _hf_ids(hf_tok, prompts, length))
    for i, p in enumerate(prompts):
        full = hf_tok(p, add_special_tokens=True)["input_ids"]
        assert batch.num_tokens[i] == len(full), p
        assert batch.truncated[i] == (len(full) > length), p
        if batch.truncated[i]:
            assert batch.dropped_text[i] and batch.dropped_text[i] in p
            assert p.rstrip().endswith(batch.dropped_text[i])
        else:
            assert batch.dropped_text[i] == ""
    return batch


def test_facts_and_files(tok_dir, facts, hf):
    assert facts == {
        "clip_vocab_size": len(hf["tokenizer"]),
        "clip_bos_id": hf["tokenizer"].bos_token_id,
        "clip_eos_id": hf["tokenizer"].eos_token_id,
        "clip_l_pad_id": hf["tokenizer"].eos_token_id,
        "clip_g_pad_id": 0,
        "t5_vocab_size": len(hf["tokenizer_3"]),
        "t5_pad_id": 0,
        "t5_eos_id": 1,
    }
    assert 500 < facts["clip_vocab_size"] <= 1000 and 300 < facts["t5_vocab_size"] <= 1000
    assert hf["tokenizer_2"].pad_token == "!" and hf["tokenizer"].pad_token == "<|endoftext|>"
    assert hf["tokenizer"].model_max_length == 77 and hf["tokenizer_3"].model_max_length == 512
    assert hf["tokenizer_3"].unk_token_id == 2
    for sub in SUBDIRS:
        assert (tok_dir / sub / "tokenizer.json").is_file() and (tok_dir / sub / "tokenizer_config.json").is_file()


def test_structure_like_real_sd3(hf):
    clip = hf["tokenizer"]
    assert clip.convert_ids_to_tokens(0) == "!"  # byte-level alphabet first, like OpenAI's vocab
    assert clip.tokenize("A Photo") == ["a</w>", "photo</w>"]  # lowercased, </w> end-of-word suffix
    assert all(t.endswith("</w>") or len(t) <= 4 for t in clip.tokenize("zqxj"))  # unknown word: bytes/pieces
    assert clip.unk_token_id not in clip("東京 🐱")["input_ids"][1:-1]  # every byte is in the vocabulary
    t5 = hf["tokenizer_3"]
    assert t5("a cat")["input_ids"][-1] == 1 and t5.tokenize("a cat") == ["▁a", "▁cat"]
    assert t5.convert_tokens_to_ids("<extra_id_0>") == len(t5) - 1


@pytest.mark.parametrize("sub", ["tokenizer", "tokenizer_2"])
def test_clip_matches_transformers(tok_dir, hf, sub):
    rt = load_clip_tokenizer(tok_dir / sub)
    assert rt.max_length == 77 and rt.pad_id == hf[sub].pad_token_id
    batch = _check_against_hf(rt, hf[sub], PROMPTS, 77)
    # padding uses the tokenizer's own pad id: <|endoftext|> for CLIP-L, "!" (0) for CLIP-G
    assert batch.ids[0, 2:].tolist() == [hf[sub].pad_token_id] * 75
    single = rt(PROMPTS[1])
    np.testing.assert_array_equal(single.ids, batch.ids[1:2])


@pytest.mark.parametrize("length", [32, 256, 512])
def test_t5_matches_transformers(tok_dir, hf, length):
    rt = load_t5_tokenizer(tok_dir / "tokenizer_3", length)
    assert rt.max_length == length and rt.pad_id == 0
    _check_against_hf(rt, hf["tokenizer_3"], PROMPTS, length)


def test_truncation_reporting(tok_dir):
    prompts = ["a photo of a cat", LONG_SIMPLE, LONG_ENGLISH, ""]
    words = LONG_SIMPLE.split()
    clip = load_clip_tokenizer(tok_dir / "tokenizer")(prompts)
    assert clip.truncated == (False, True, True, False)
    assert clip.dropped_text[1] == " ".join(words[75:])  # 75 words fit between <|startoftext|> and <|endoftext|>
    assert clip.num_tokens[1] == 302 and clip.any_truncated
    assert clip.dropped_tokens[:2] == (0, 302 - 77) and clip.dropped_tokens[3] == 0
    t5 = load_t5_tokenizer(tok_dir / "tokenizer_3")(prompts)  # default 256
    assert t5.ids.shape == (4, 256)
    assert t5.truncated == (False, True, True, False)
    assert t5.dropped_text[1] == " ".join(words[255:]) and t5.num_tokens[1] == 301
    full = load_t5_tokenizer(tok_dir / "tokenizer_3", 512)(prompts[:2])  # 301 tokens fit in 512
    assert full.truncated == (False, False) and full.dropped_text == ("", "")
    assert not full.any_truncated and full.dropped_tokens == (0, 0)
    # exactly at the boundary: 75 one-token words fit CLIP, 76 do not
    edge = load_clip_tokenizer(tok_dir / "tokenizer_2")([" ".join(["cat"] * 75), " ".join(["cat"] * 76)])
    assert edge.truncated == (False, True) and edge.dropped_text == ("", "cat")


def test_empty_batch(tok_dir):
    batch = load_clip_tokenizer(tok_dir / "tokenizer")([])
    assert batch.ids.shape == (0, 77) and batch.ids.dtype == np.int64 and batch.truncated == ()


def test_write_is_deterministic(tok_dir, tmp_path):
    again = write_tiny_tokenizers(tmp_path)
    assert again == json.loads((tok_dir / "facts.json").read_text())
    for sub in SUBDIRS:
        names = sorted(p.name for p in (tok_dir / sub).iterdir())
        assert names == sorted(p.name for p in (tmp_path / sub).iterdir())
        for name in names:
            assert (tok_dir / sub / name).read_bytes() == (tmp_path / sub / name).read_bytes(), f"{sub}/{name}"


def test_resaved_by_transformers_still_matches(tok_dir, hf, tmp_path):
    """What the pipeline's save_pretrained writes (transformers re-saves the tokenizers) loads the same."""
    for sub in SUBDIRS:
        hf[sub].save_pretrained(tmp_path / sub)
        assert (tmp_path / sub / "tokenizer.json").read_bytes() == (tok_dir / sub / "tokenizer.json").read_bytes()
    _check_against_hf(load_clip_tokenizer(tmp_path / "tokenizer_2"), hf["tokenizer_2"], PROMPTS, 77)
    _check_against_hf(load_t5_tokenizer(tmp_path / "tokenizer_3", 64), hf["tokenizer_3"], PROMPTS, 64)


def test_tokens_named_only_in_config(tok_dir, tmp_path):
    """Older exports list CLIP-G's pad token "!" only in tokenizer_config.json; it must still be special."""
    from transformers import CLIPTokenizer

    d = tmp_path / "tokenizer_2"
    shutil.copytree(tok_dir / "tokenizer_2", d)
    tj = json.loads((d / "tokenizer.json").read_text())
    tj["added_tokens"] = [t for t in tj["added_tokens"] if t["content"] != "!"]
    (d / "tokenizer.json").write_text(json.dumps(tj))
    cfg = json.loads((d / "tokenizer_config.json").read_text())
    flags = {"lstrip": False, "normalized": False, "rstrip": False, "single_word": False, "special": True}
    cfg["added_tokens_decoder"] = {"0": {"content": "!", **flags}}
    (d / "tokenizer_config.json").write_text(json.dumps(cfg))
    prompts = ["hello!! world!?", "a cat!", "!"]
    _check_against_hf(load_clip_tokenizer(d), CLIPTokenizer.from_pretrained(d), prompts, 77)


def _copy(tok_dir: Path, tmp_path: Path, sub: str = "tokenizer") -> Path:
    d = tmp_path / sub
    shutil.copytree(tok_dir / sub, d)
    return d


def test_missing_files(tok_dir, tmp_path):
    with pytest.raises(Sd3trtError, match="does not exist"):
        PromptTokenizer.from_dir(tmp_path / "nowhere")
    d = _copy(tok_dir, tmp_path)
    (d / "tokenizer.json").unlink()
    with pytest.raises(Sd3trtError, match=r"tokenizer\.json is missing"):
        load_clip_tokenizer(d)


@pytest.mark.parametrize(
    "fname, content, match",
    [
        ("tokenizer.json", "{not json", r"tokenizer\.json is damaged"),
        ("tokenizer.json", '{"model": {"type": "Nope"}}', r"tokenizer\.json is damaged"),
        ("tokenizer.json", b"\xff\xfe\x00garbage", r"tokenizer\.json"),
        ("tokenizer_config.json", "{broken", r"tokenizer_config\.json"),
        ("tokenizer_config.json", "[1, 2]", r"tokenizer_config\.json"),
    ],
)
def test_corrupt_files(tok_dir, tmp_path, fname, content, match):
    d = _copy(tok_dir, tmp_path)
    path = d / fname
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    with pytest.raises(Sd3trtError, match=match):
        load_clip_tokenizer(d)


def test_config_problems(tok_dir, facts, tmp_path):
    d = _copy(tok_dir, tmp_path)
    cfg = json.loads((d / "tokenizer_config.json").read_text())
    (d / "tokenizer_config.json").write_text(json.dumps({k: v for k, v in cfg.items() if k != "pad_token"}))
    with pytest.raises(Sd3trtError, match="no pad token"):
        load_clip_tokenizer(d)
    assert PromptTokenizer.from_dir(d, 77, pad_token="<|endoftext|>").pad_id == facts["clip_eos_id"]
    (d / "tokenizer_config.json").write_text(json.dumps({**cfg, "pad_token": "<nope>"}))
    with pytest.raises(Sd3trtError, match="not in the vocabulary"):
        load_clip_tokenizer(d)
    (d / "tokenizer_config.json").write_text(json.dumps({**cfg, "model_max_length": 1e30}))
    with pytest.raises(Sd3trtError, match="model_max_length"):
        PromptTokenizer.from_dir(d)
    assert PromptTokenizer.from_dir(d, 100).max_length == 100


def test_bad_lengths_and_prompts(tok_dir):
    t5 = tok_dir / "tokenizer_3"
    with pytest.raises(Sd3trtError, match="use 1 to 512"):
        load_t5_tokenizer(t5, 513)
    with pytest.raises(Sd3trtError, match="use 1 to 512"):
        load_t5_tokenizer(t5, 0)
    with pytest.raises(Sd3trtError, match="no room for text"):
        load_t5_tokenizer(t5, 1)
    with pytest.raises(Sd3trtError, match="at most 77"):
        PromptTokenizer.from_dir(tok_dir / "tokenizer", 78)
    with pytest.raises(Sd3trtError, match="at most 512"):
        PromptTokenizer.from_dir(t5, 600)
    assert PromptTokenizer.from_dir(t5).max_length == 512
    with pytest.raises(Sd3trtError, match="prompt 1 is a int"):
        load_clip_tokenizer(tok_dir / "tokenizer")(["ok", 3])
