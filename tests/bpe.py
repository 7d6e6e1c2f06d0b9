"""Byte-level BPE tokenizers trained here on text already on the machine (no hub): GPT-2's scheme,
or OLMo-2's (its pre-tokenizer pattern and its special tokens at its ids), written as a
``tokenizer.json`` with a ``tokenizer_config.json``.

``python -m tests.bpe OUT_DIR --olmo2`` writes the ~100k-entry OLMo-2-style one (for benchmarks).
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import sysconfig

EOS, PAD = "<|endoftext|>", "<|pad|>"
# OLMo-2's tokenizer (cl100k's pieces): 100257 trained entries, then its special tokens at
# 100257-100277, ids 100261-100275 reserved.
OLMO2_TRAINED = 100_257
OLMO2_SPECIALS = (EOS, "<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>",
                  *(f"<|reserved_{i}|>" for i in range(100_261, 100_276)),
                  "<|endofprompt|>", PAD)
OLMO2_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}|"
                 r" ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")


def stdlib_texts(max_bytes: int):
  """The standard library's Python sources, up to ``max_bytes`` of them."""
  total = 0
  for path in sorted(glob.glob(os.path.join(sysconfig.get_paths()["stdlib"], "**", "*.py"),
                               recursive=True)):
    if total >= max_bytes:
      return
    with open(path, encoding="utf-8", errors="replace") as fh:
      text = fh.read()
    total += len(text)
    yield text


def write_bpe(directory: str, vocab_size: int = 1000, texts=None, olmo2: bool = False,
              config: dict | None = None) -> str:
  """Trains a byte-level BPE of ``vocab_size`` entries (special tokens included, added after the
  trained ones: id 0 is "!" as in OLMo-2's) and writes it with its tokenizer_config.json.
  Returns the tokenizer.json path."""
  from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

  specials = OLMO2_SPECIALS if olmo2 else (EOS, PAD)
  tok = Tokenizer(models.BPE())
  if olmo2:
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(OLMO2_PATTERN), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
  else:
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(vocab_size=vocab_size - len(specials), show_progress=False,
                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
  tok.train_from_iterator(texts if texts is not None else stdlib_texts(1 << 20), trainer)
  tok.add_special_tokens(list(specials))
  os.makedirs(directory, exist_ok=True)
  path = os.path.join(directory, "tokenizer.json")
  tok.save(path)
  with open(os.path.join(directory, "tokenizer_config.json"), "w") as fh:
    json.dump(config if config is not None else {
        "tokenizer_class": "PreTrainedTokenizerFast", "eos_token": EOS, "pad_token": PAD,
        "bos_token": EOS, "model_max_length": 4096}, fh)
  return path


def main():
  p = argparse.ArgumentParser(description=__doc__)
  p.add_argument("out")
  p.add_argument("--olmo2", action="store_true", help="OLMo-2's pattern, specials and size")
  p.add_argument("--text-bytes", type=int, default=64 << 20)
  args = p.parse_args()
  size = OLMO2_TRAINED + len(OLMO2_SPECIALS) if args.olmo2 else 1000
  print(write_bpe(args.out, size, stdlib_texts(args.text_bytes), olmo2=args.olmo2))


if __name__ == "__main__":
  main()
