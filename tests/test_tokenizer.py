import numpy as np
import pytest
from hypothesis import given, strategies as st

from minirlhf.tokenizer import BOS, CHARS, EOS, PAD, VOCAB_SIZE, decode, encode, encode_example, pad_batch


@given(st.text(alphabet=CHARS, max_size=40))
def test_round_trip(text):
    assert decode(encode(text)) == text


def test_reserved_ids_are_distinct_and_unused_by_characters():
    assert len({PAD, BOS, EOS}) == 3
    ids = encode(CHARS)
    assert set(ids).isdisjoint({PAD, BOS, EOS})
    assert sorted(ids) == list(range(3, VOCAB_SIZE))


def test_example_layout_and_decode_stops_at_eos():
    ids = encode_example("hi", "yo")
    assert ids[0] == BOS and ids[-1] == EOS
    assert decode(ids) == "hiyo"
    assert decode(ids + encode("zz")) == "hiyo"
    assert decode(ids + encode("zz"), stop_at_eos=False) == "hiyozz"


def test_unknown_character_names_it_and_its_position():
    with pytest.raises(ValueError, match=r"'Q' at position 3"):
        encode("abcQ")


def test_pad_batch_both_sides():
    tokens, mask = pad_batch([[5, 6, 7], [8]], side="right")
    np.testing.assert_array_equal(tokens, [[5, 6, 7], [8, PAD, PAD]])
    np.testing.assert_array_equal(mask, [[1, 1, 1], [1, 0, 0]])
    tokens, mask = pad_batch([[5, 6, 7], [8]], side="left")
    np.testing.assert_array_equal(tokens, [[5, 6, 7], [PAD, PAD, 8]])
    np.testing.assert_array_equal(mask, [[1, 1, 1], [0, 0, 1]])
    with pytest.raises(ValueError, match="does not fit"):
        pad_batch([[1, 2, 3]], length=2)
    with pytest.raises(ValueError, match="side"):
        pad_batch([[1]], side="middle")
    with pytest.raises(ValueError, match="outside the vocabulary"):
        decode([VOCAB_SIZE])

