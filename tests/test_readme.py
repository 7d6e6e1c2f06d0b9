"""The README's commands are the user's path: its story runs exactly as written there (only
``--steps`` and ``--max-new-tokens`` made smaller), from a fresh directory with relative paths, and
every ``flexolmo`` command shown in the README and in docs/ parses."""
import glob
import os
import re
import shlex

import pytest

from flexolmo_jax import cli

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README = os.path.join(ROOT, "README.md")
MARK = "<!-- tests/e2e/test_readme_story.py runs the next block -->"
# The only changes the test makes to the story: sizes, through flags the README itself shows.
SIZES = {"--steps": "3", "--max-new-tokens": "8"}
# The user's path, in order: (sub-command, what its line must also contain).
STORY = [("data flexmix-mini", ""), ("data prepare", ""), ("pretrain", ""),
         ("train-expert", "--name code"), ("train-expert", "--name math"), ("merge", ""),
         ("eval", "--exclude"), ("generate", ""), ("tune-router", ""), ("export-hf", ""),
         ("import-hf", ""), ("launch", "--dry-run"), ("plan", ""), ("serve", "")]


def bash_blocks(text: str) -> list[tuple[str, str]]:
  """(the line before the fence, the block's text) of every ```bash block of a Markdown text."""
  blocks, lines, i = [], text.splitlines(), 0
  while i < len(lines):
    if lines[i].strip() == "```bash":
      end = lines.index("```", i + 1)
      blocks.append((lines[i - 1].strip() if i else "", "\n".join(lines[i + 1:end]) + "\n"))
      i = end
    i += 1
  return blocks


def story(text: str) -> str:
  marked = [block for before, block in bash_blocks(text) if before == MARK]
  assert len(marked) == 1, f"README.md must mark exactly one block with {MARK!r}"
  return marked[0]


def commands(script: str) -> list[str]:
  """The ``flexolmo`` command lines of a shell block, continuations joined, comments dropped."""
  joined = re.sub(r"\\\n\s*", " ", script)
  out = []
  for line in joined.splitlines():
    line = line.split(" #", 1)[0].strip().removesuffix("&").strip()   # `... &`: in the background
    if line.startswith("flexolmo "):
      out.append(line)
  return out


def parse(line: str):
  """The parsed arguments of one ``flexolmo ...`` line, as ``cli.main`` parses them."""
  argv = shlex.split(line)[1:]
  if argv[:1] == ["launch"] and "--" in argv:
    argv = argv[:argv.index("--")]
  argv, _ = cli.split_gin_flags(argv)
  argv, _ = cli.split_distributed_flags(argv)
  return cli.build_parser().parse_args(argv)


def test_the_story_is_the_users_path_with_relative_paths():
  lines = commands(story(open(README).read()))
  remaining = list(lines)
  for command, detail in STORY:
    found = next((line for line in remaining
                  if line.startswith(f"flexolmo {command} ") and detail in line), None)
    assert found, f"the README's story has no `flexolmo {command} ... {detail}` after the ones before"
    remaining = remaining[remaining.index(found) + 1:]
  for line in lines:
    assert not any(word.startswith(("/", "~")) for word in shlex.split(line)), line
  # Every size the test shrinks is written in the README (so the test changes sizes only).
  for flag in SIZES:
    assert re.search(rf"\s{flag} \d+", story(open(README).read())), flag


def test_every_command_in_the_readme_and_docs_parses():
  documents = [README, *glob.glob(os.path.join(ROOT, "docs", "*.md")),
               os.path.join(ROOT, "launch", "README.md")]
  checked = 0
  for path in documents:
    for _, block in bash_blocks(open(path).read()):
      for line in commands(block):
        try:
          parse(line)
        except SystemExit:
          pytest.fail(f"{os.path.relpath(path, ROOT)}: `{line}` does not parse (see above)")
        checked += 1
  assert checked >= 30, checked


def test_a_broken_flag_in_the_story_is_caught():
  text = open(README).read().replace("--out runs/merged", "--output runs/merged", 1)
  assert "--output runs/merged" in text
  bad = [line for line in commands(story(text)) if "--output" in line]
  with pytest.raises(SystemExit):
    parse(bad[0])
