"""Every complete `fmjax` command in the docs still parses: its flags, its config and each override.

A command is complete when it names a real config file (no `--config=...` placeholder) and holds
no shell variable. The command's work is stubbed out (a run, a bench, a prepare); a sweep runs for
real with --print_commands, which expands every run and checks every key without starting one.
"""

import glob
import os
import re
import shlex

import pytest

from fmjax import bench, cli, data, dpo, finetune, sft, train

ROOT = os.path.join(os.path.dirname(__file__), "..")
DOCS = ["README.md", "benchmarks/README.md", "launch/README.md",
        *sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, "experiments", "*", "README.md")))]
STUBBED = {"train": (train, "run"), "finetune": (finetune, "run"), "sft": (sft, "run"), "dpo": (dpo, "run"),
           "bench": (bench, "run"), "data": (data, "prepare")}
COMMAND = re.compile(r"(?:^|[\s`(&])(fmjax (?:train|finetune|sft|dpo|bench|data prepare|sweep) [^`#\n]*)")


def doc_commands() -> list[tuple[str, str]]:
  found = []
  for doc in DOCS:
    text = open(os.path.join(ROOT, doc)).read().replace("\\\n", " ")
    for match in COMMAND.finditer(text):
      command = " ".join(match.group(1).split()).rstrip(" .,;:)")
      config = re.search(r"--config=(\S+?)(?::\S*)?(?:\s|$)", command)
      if config and os.path.isfile(os.path.join(ROOT, config.group(1))) and "$" not in command \
          and "..." not in command and "<" not in command:
        found.append((doc, command))
  return found


def test_the_docs_hold_complete_commands_of_every_kind():
  kinds = {command.split()[1] for _, command in doc_commands()}
  assert {"train", "finetune", "bench", "sweep"} <= kinds, kinds
  assert len(doc_commands()) >= 12, doc_commands()


@pytest.mark.parametrize("doc,command", doc_commands(), ids=lambda x: x if x.endswith(".md") else x[6:60])
def test_a_command_in_the_docs_parses(doc, command, tmp_path, monkeypatch, capsys):
  # In a scratch directory that holds the repository's configs, and the runs the doc trains before
  # (a sweep checks that a local init_from exists).
  for name in ("configs", "experiments"):
    os.symlink(os.path.join(ROOT, name), tmp_path / name)
  for _, earlier in doc_commands():
    trained = re.search(r"^fmjax train .*--workdir=([^\s:]+)(?:\s|$)", earlier)
    if _ == doc and trained and not os.path.isabs(trained.group(1)):
      os.makedirs(tmp_path / trained.group(1) / "checkpoints", exist_ok=True)
  monkeypatch.chdir(tmp_path)
  calls = []
  for module, name in STUBBED.values():
    monkeypatch.setattr(module, name, lambda *a, **k: calls.append(a) or {})
  argv = shlex.split(command)[1:]
  # Runs go to a scratch directory, and a sweep prints its runs' commands rather than starting them.
  argv = [f"--workdir={tmp_path / 'runs'}" if a.startswith("--workdir=") else a for a in argv]
  if argv[0] == "sweep" and "--print_commands" not in argv:
    argv.append("--print_commands")
  code = cli.main(argv)
  out = capsys.readouterr()
  assert code in (0, None), f"{doc}: `{command}` -> exit {code}: {out.err.strip()}"
  if argv[0] == "sweep":
    assert out.out.count("fmjax ") >= 1, out.out
  else:
    assert len(calls) == 1, f"{doc}: `{command}` did not reach its work"
