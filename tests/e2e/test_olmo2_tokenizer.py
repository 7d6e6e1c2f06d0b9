"""An OLMo-2-style tokenizer at OLMo-2's size: ~100k byte-level BPE entries trained here on the
standard library's sources, OLMo-2's pre-tokenizer pattern and its special tokens at its ids. Our
vocabulary gives AutoTokenizer's ids, and the packed input stream holds exactly those ids."""
import os

import pytest

from flexolmo_jax.data import vocabularies
from tests.e2e.fixtures import OLMO2_TOKENIZER_USERS
from tests.test_vocabularies import TEXTS


pytestmark = OLMO2_TOKENIZER_USERS


@pytest.mark.slow
def test_olmo2_sized_tokenizer_gives_autotokenizers_ids(olmo2_tokenizer):
  from transformers import AutoTokenizer

  ours = vocabularies.load(olmo2_tokenizer)
  theirs = AutoTokenizer.from_pretrained(os.path.dirname(olmo2_tokenizer))
  # OLMo-2's layout: 100278 ids, EOS 100257, PAD 100277, "!" at 0.
  assert ours.vocab_size == len(theirs) == 100_278
  assert (ours.eos_id, ours.tokenizer_pad_id) == (100_257, 100_277) == (theirs.eos_token_id,
                                                                         theirs.pad_token_id)
  assert ours.encode("!") == [0]
  for name, text in TEXTS.items():
    ids = ours.encode(text)
    assert ids == theirs.encode(text, add_special_tokens=False), name
    if name != "special":
      assert ours.decode(ids) == text, name
  # Common code words are single entries, as in a tokenizer of this size.
  assert len(ours.encode(" return")) == 1 and len(ours.encode(" import")) == 1
