"""CLIP tokenizer loading, padding and truncation, against transformers' own batch encoding."""

import numpy as np
import pytest

from tests.helpers import BOS, EOS, vocabulary, write_tokenizer
from sdjax.tokenizer import load_tokenizer, tokenize

V = vocabulary()


@pytest.fixture(scope="module")
def sd1_tokenizer(tmp_path_factory):
    folder = tmp_path_factory.mktemp("sd1") / "tokenizer"
    write_tokenizer(folder, {"pad_token": EOS, "model_max_length": 77})
    return load_tokenizer(folder.parent)


def test_sd1_tokenizer_pads_with_end_of_text_to_77(sd1_tokenizer):
    ids = tokenize(sd1_tokenizer, ["a photo of a cat", "A  DOG!"])
    assert ids.shape == (2, 77) and ids.dtype == np.int32
    words = [V[BOS], V["a</w>"], V["photo</w>"], V["of</w>"], V["a</w>"], V["cat</w>"], V[EOS]]
    np.testing.assert_array_equal(ids[0], words + [V[EOS]] * (77 - len(words)))
    np.testing.assert_array_equal(ids[1, :5], [V[BOS], V["a</w>"], V["dog</w>"], V["!</w>"], V[EOS]])
    np.testing.assert_array_equal(ids[1, 5:], V[EOS])


def test_padding_sd2_pads_with_exclamation_mark(tmp_path):
    tok = load_tokenizer(write_tokenizer(tmp_path, {"pad_token": "!", "model_max_length": 77}))
    ids = tokenize(tok, ["a cat"])
    np.testing.assert_array_equal(ids[0, :4], [V[BOS], V["a</w>"], V["cat</w>"], V[EOS]])
    np.testing.assert_array_equal(ids[0, 4:], V["!"])
    assert V["!"] == 0


def test_max_length_forced_to_77(tmp_path):
    tok = load_tokenizer(write_tokenizer(tmp_path, {"model_max_length": 10**30}))
    assert tok.model_max_length == 77


def test_matches_transformers_and_warns_on_long_prompt(sd1_tokenizer):
    long_prompt = " ".join(["cat"] * 80)  # 82 tokens with BOS and EOS
    prompts = ["a dog", long_prompt]
    with pytest.warns(UserWarning, match=r"Prompt 1 is 82 tokens long.* 5 tokens were dropped"):
        ids = tokenize(sd1_tokenizer, prompts)
    ref = sd1_tokenizer(prompts, padding="max_length", max_length=77, truncation=True)["input_ids"]
    np.testing.assert_array_equal(ids, np.asarray(ref))
    assert ids[1, -1] == V[EOS] and (ids[1, 1:-1] == V["cat</w>"]).all()


def test_no_warning_at_exactly_77_tokens(sd1_tokenizer, recwarn):
    ids = tokenize(sd1_tokenizer, [" ".join(["cat"] * 75)])
    assert ids[0, -1] == V[EOS] and ids[0, -2] == V["cat</w>"]
    assert not [w for w in recwarn if issubclass(w.category, UserWarning)]


def test_missing_files_raise(tmp_path):
    (tmp_path / "tokenizer").mkdir()
    (tmp_path / "tokenizer" / "vocab.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match="merges.txt"):
        load_tokenizer(tmp_path)


def test_single_string_rejected(sd1_tokenizer):
    with pytest.raises(TypeError, match=r"\[prompt\]"):
        tokenize(sd1_tokenizer, "a cat")


def test_no_prompts_give_no_rows(sd1_tokenizer):
    """A host that holds none of a padded batch's captions tokenizes an empty list."""
    ids = tokenize(sd1_tokenizer, [])
    assert ids.shape == (0, 77) and ids.dtype == np.int32
