"""Release bundles: what a model is, what it was trained on, and under which terms it may be used.

  fmjax release --workdir=W --out=DIR --card=card.json

The bundle:

  DIR/MODEL_CARD.md     filled from the run: architecture, parameter count, data sources and their
                        declared licenses, tokens seen, steps, evaluation results, intended use,
                        limitations, license and use restrictions, the PII summary
  DIR/data_report.json  PII scan (`fmjax.data.pii.scan`) of a sample of the training data: counts
                        per kind, sample size, whether scrubbing was on in training. The data is
                        what the run trained on: the pretraining text, an SFT run's (prompt,
                        completion) rows, a fine-tuning run's task examples; for a run that
                        started from another fmjax run (init_from), that run's report as well
  DIR/hf/               Hugging Face weights, config and tokenizer, as `fmjax export` writes them
                        (a fine-tuning run's LoRA merged, its head as the HF classifier)
  DIR/fmjax/            the fmjax checkpoint step, its config.json (tokenizer at fmjax/tokenizer/,
                        recorded relative to fmjax/, so the bundle may move) and metrics.jsonl
                        up to that step: a workdir `generate`/`eval`/`finetune` read
  DIR/SHA256SUMS        the SHA-256 of every other file (`sha256sum -c SHA256SUMS`)

What fmjax cannot know (license, intended use, ...) comes from `--card=card.json`, or from a
`release` dict in the run's config; a release with required fields missing is refused before
anything is written, with the list of fields to fill in. card.json:

  {"license": "apache-2.0", "intended_use": "...", "limitations": "...",
   "use_restrictions": "...", "data_licenses": {"fmjax_corpus": "PSF-2.0"},
   "model_name": "...", "description": "...", "authors": "...", "citation": "...", "contact": "..."}

`data_licenses` declares a license for every training data source of the run (the dataset name,
or `text_files:<glob>` for each glob of local files); a fine-tuning run adds its task
(`task:<name>`, or `task_files:<glob>` for each glob of task.files).
"""

from __future__ import annotations

import difflib
import hashlib
import json
import os
import sys
from typing import Any, Iterator, Mapping, Sequence

import ml_collections
import numpy as np

from fmjax import config_lib, files, finetune, interop, models
from fmjax.config_lib import ConfigError

REQUIRED_FIELDS = ("license", "intended_use", "limitations", "use_restrictions", "data_licenses")
OPTIONAL_FIELDS = ("model_name", "description", "authors", "citation", "contact")
DEFAULT_PII_SAMPLE = 1000  # documents scanned for the data report


# ----------------------------------------------------------------------------- card fields


def data_sources(config, imported: Mapping | None = None) -> list[str]:
  """The training data sources of a run, as `data_licenses` must name them."""
  if imported is not None:
    return []  # fmjax never saw the data of imported weights; the card declares what it knows
  d = config.data
  before, classifier = [], finetune.is_classifier_run(config)
  trunk_recorded = False  # whether init_from's own record names what the trunk learnt from
  if ("sft" in config or "dpo" in config or classifier) and config.get("init_from"):
    # SFT's (and DPO's) data.files are its rows; the trunk it started from learnt from init_from's corpus.
    source = config.init_from
    saved = files.read_json(os.path.join(source, "config.json")) if files.isdir(source) else None
    trunk_recorded = saved is not None
    before = (data_sources(ml_collections.ConfigDict(saved), _imported_info(source)) if trunk_recorded
              else [] if classifier else [f"init_from:{source}"])
  from fmjax.data import sources
  out = []
  # A classifier's data.* are init_from's, copied (finetune.adopt_pretrain_settings): that run's own
  # record (above) says what its trunk learnt from, and for imported weights it is not the placeholder
  # corpus their config names. Only where init_from is gone does the copy stand in for it.
  if not (classifier and trunk_recorded):
    mixed = sources.mixture(d.dataset)  # a mixture: each of its datasets is a source of its own
    out = [source for one in ([sources.component(config, item).data for item, _ in mixed] if mixed else [d])
           for source in ([f"text_files:{g.strip()}" for g in str(one.files).split(",") if g.strip()]
                          if one.dataset == "text_files" else [one.dataset])]
  if classifier:  # the trunk's pretraining data, then the task's
    t = config.task
    out += ([f"task_files:{g.strip()}" for g in str(t.files).split(",") if g.strip()]
            if t.name in ("csv", "jsonl", "files") else [f"task:{t.name}"])
  return list(dict.fromkeys(before + out))


def _scrubbed(config) -> bool:
  """Whether training saw scrubbed text: data.pii_scrub applies to pretraining text only; SFT, DPO and
  fine-tuning read their rows as they are."""
  return (bool(config.data.pii_scrub) and "sft" not in config and "dpo" not in config
          and not finetune.is_classifier_run(config))


def read_card(config, card_path: str | None) -> dict[str, Any]:
  """Card fields: `config.release` (if the run has one), overridden by `card_path`'s JSON."""
  card = dict(config.get("release") or {})
  if card_path:
    if not os.path.exists(card_path):
      raise ConfigError(f"--card={card_path} does not exist; write a JSON file with the model card fields "
                        f"({', '.join(REQUIRED_FIELDS)})")
    try:
      with open(card_path, encoding="utf-8") as f:
        fields = json.load(f)
    except json.JSONDecodeError as e:
      raise ConfigError(f"--card={card_path} is not valid JSON ({e.msg} at line {e.lineno})") from None
    except UnicodeDecodeError as e:  # UTF-16, as PowerShell's `>` and some editors save
      raise ConfigError(f"--card={card_path} is not UTF-8 text (byte {e.start}); save it as UTF-8") from None
    if not isinstance(fields, dict):
      raise ConfigError(f"--card={card_path} holds a JSON {type(fields).__name__}; it must be one object of model "
                        f"card fields ({', '.join(REQUIRED_FIELDS)})")
    card.update(fields)
  known = REQUIRED_FIELDS + OPTIONAL_FIELDS
  for key in card:
    if key not in known:
      close = difflib.get_close_matches(key, known, n=1)
      hint = f"; did you mean {close[0]!r}?" if close else f"; known fields: {', '.join(known)}"
      raise ConfigError(f"unknown model card field {key!r}{hint}")
  for key, value in card.items():
    if key == "data_licenses":
      ok = isinstance(value, Mapping) and all(isinstance(v, str) for v in value.values())
      want = "an object of source: license strings"
    elif key in ("authors", "contact"):
      ok = isinstance(value, str) or (isinstance(value, list) and all(isinstance(v, str) for v in value))
      want = "a string or a list of strings"
    else:
      ok, want = isinstance(value, str), "a string"
    if not ok and value is not None:
      raise ConfigError(f"model card field {key!r} must be {want}, got {json.dumps(value)}")
  return card


def missing_fields(card: Mapping[str, Any], sources: list[str]) -> list[str]:
  """Required card fields that are absent or empty, including a license for each data source."""
  missing = [k for k in REQUIRED_FIELDS if k != "data_licenses" and not str(card.get(k) or "").strip()]
  licenses = card.get("data_licenses")
  if not isinstance(licenses, Mapping) or not licenses:
    missing += [f"data_licenses[{s!r}]" for s in sources] or ["data_licenses"]
  else:
    missing += [f"data_licenses[{s!r}]" for s in sources if not str(licenses.get(s) or "").strip()]
  return missing


# ----------------------------------------------------------------------------- facts from the run


def eval_results(workdir: str, step: int | None = None) -> tuple[int | None, dict[str, float]]:
  """(eval step, metrics) of the last step of metrics.jsonl with `eval/*` values at or before `step`.

  The eval step may be earlier than `step` (no eval at the released step): the card then says so.
  A rerun writes its rows again; the last value logged for a step wins.
  """
  from fmjax import report  # its reader: rows merged per step (the last value wins), torn lines skipped
  found_step, found = None, {}
  for record in report.read_metrics(workdir):
    evals = {k[len("eval/"):]: v for k, v in record.items() if k.startswith("eval/")}
    if evals and (step is None or record["step"] <= step):
      found_step, found = record["step"], evals
  return found_step, found


def training_texts(config) -> tuple[Iterator[str], str, str]:
  """(texts, split, what they are) of the data the run trained on, in its fixed order.

  Pretraining: the documents of the train split. SFT: the prompt and completion of each row of
  data.files (a conversation's messages), read as SFT reads them; DPO: each pair's prompt and replies.
  Fine-tuning: the texts of each train example of the task.
  """
  if "sft" in config:
    from fmjax import sft
    s = config.sft
    rows = sft.read_examples(config.data.files, s.prompt_key, s.completion_key,
                             messages_key=s.get("messages_key", "messages"))

    def text(row):
      if isinstance(row, sft.Conversation):
        return "\n".join(m["content"] for m in row.messages)
      return f"{row[0]}\n{row[1]}" if row[0] else row[1]
    return map(text, rows), "data.files", "(prompt, completion) rows and conversations of data.files"
  if "dpo" in config:
    from fmjax import dpo
    d = config.dpo
    pairs = dpo.read_pairs(config.data.files, d.prompt_key, d.chosen_key, d.rejected_key)
    written = lambda part: part if isinstance(part, str) else "\n".join(m["content"] for m in part)
    return (("\n".join(written(p) for p in (pair.prompt, pair.chosen, pair.rejected) if p) for pair in pairs),
            "data.files", "preference pairs (prompt, chosen, rejected) of data.files")
  if finetune.is_classifier_run(config):
    from fmjax import tasks
    task = tasks.load_task(config)
    return ("\n".join(texts) for texts, _ in task.splits["train"]), "train", f"train examples of task {task.name}"
  from fmjax.data import sources
  return sources.documents(config, "train"), config.data.train_split, "documents of the train split"


def _init_from_run(config) -> str | None:
  """The fmjax run a fine-tuning or SFT run started from (its `init_from`), when it is one."""
  source = str(config.get("init_from") or "")
  return source if source and files.exists(os.path.join(source, "config.json")) else None


def pii_report(config, sample_docs: int, imported: Mapping | None = None) -> dict[str, Any]:
  """The PII scan of the first `sample_docs` training documents (in the data's fixed order); for a
  run that started from another fmjax run (`init_from`), that run's report too, under `init_from`."""
  from fmjax.data import pii
  report = {"sources": data_sources(config, imported), "pii_scrub": _scrubbed(config),
            "kinds": sorted(pii.PLACEHOLDERS)}
  if imported is not None:
    report.update(sample=None, pii_counts=None,
                  note=f"weights imported from {imported.get('source')}; fmjax has no record of their training data")
    return report
  if (source := _init_from_run(config)) is not None:  # the trunk learnt from that run's data first
    before = interop.read_run_config(source)
    report["init_from"] = {"workdir": source, **pii_report(before, sample_docs, _imported_info(source))}
  docs, chars, counts = 0, 0, {k: 0 for k in sorted(pii.PLACEHOLDERS)}
  try:
    texts, split, what = training_texts(config)
    for text in texts:
      if docs >= sample_docs:
        break
      docs += 1
      chars += len(text)
      for kind, n in pii.scan([text]).items():
        counts[kind] += n
  except ConfigError as e:
    raise ConfigError(f"cannot read the training data for the PII report: {e}") from None
  except Exception as e:  # pylint: disable=broad-except
    # Whatever stops the read (a missing dataset, no network for TFDS, a bad file) ends in one line.
    raise ConfigError(f"cannot read the training data for the PII report ({type(e).__name__}: "
                      f"{str(e).splitlines()[0] if str(e) else ''}); run release where the data is reachable") from None
  scrubbed = ("scrubbing was on: these were replaced by placeholders before tokenisation, so the model did "
              "not see them" if _scrubbed(config) else
              "scrubbing was off: the model was trained on this text as is")
  report.update(sample={"documents": docs, "characters": chars, "split": split,
                        "method": f"the first {what} in order, at most {sample_docs}"},
                pii_counts=counts, note=f"counts are of the raw source text; {scrubbed}")
  return report


def _param_counts(params) -> tuple[int, int]:
  sizes = {path: int(np.prod(np.shape(v))) for path, v in config_lib.flatten(params).items()}
  positions = sum(n for path, n in sizes.items() if set(path.split(".")) & {"wpe", "position_embeddings"})
  return sum(sizes.values()), sum(sizes.values()) - positions


# ----------------------------------------------------------------------------- the card


def _table(rows, header) -> str:
  lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
  lines += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
  return "\n".join(lines)


def _pii_line(report: Mapping[str, Any]) -> str:
  if report.get("pii_counts") is None:
    return f"No PII scan: {report['note']}."
  sample = report["sample"]
  return (f"PII scan of {sample['documents']} documents ({sample['characters']:,} characters; {sample['method']}): "
          + ", ".join(f"{k} {v}" for k, v in report["pii_counts"].items())
          + f". {report['note'][0].upper()}{report['note'][1:]}.")


def _architecture(m) -> str:
  """The model card's one-line description of the architecture (the HF model it exports as)."""
  kind = interop.hf_model_type(m)
  if kind == "bert":
    return "BERT encoder (post-LN, learned positions, token types, pooler, tied masked-LM head)"
  if kind == "gpt2":
    return "GPT-2-style decoder (pre-LN, learned positions, tied embeddings, causal LM)"
  arch = models.architecture(m, canonical=True)
  kv_heads = arch["num_kv_heads"] or m.num_heads
  attention = f"grouped-query attention ({kv_heads} key/value heads)" if kv_heads != m.num_heads else "attention"
  if arch["head_dim"]:
    attention += f" of {arch['head_dim']}-wide heads"
  if arch["qk_norm"]:
    attention += " with RMSNorm on each head of q and k"
  biases = "biases on q, k and v alone" if arch["qkv_bias"] else "biases" if arch["use_bias"] else "no biases"
  scaled = "" if arch["rope_scaling"] == "none" else f", {arch['rope_scaling']} scaling x{arch['rope_factor']:g}"
  name = {"llama": "Llama", "qwen2": "Qwen2", "qwen3": "Qwen3"}[kind]
  return (f"{name}-style decoder (pre-norm RMSNorm, rotary positions (theta {arch['rope_theta']:.10g}{scaled}), "
          f"SwiGLU MLP, {attention}, {biases}, {'tied' if arch['tie_embeddings'] else 'untied'} embeddings, causal LM)")


def model_card(config, card: Mapping[str, Any], *, step: int, params, report: Mapping[str, Any],
               evals: tuple[int | None, dict], imported: Mapping | None, positions: int | None = None,
               init_step: int | None = None) -> str:
  """MODEL_CARD.md text. `positions`: how many positions training used (default the table's);
  `init_step`: the step of the `init_from` run the run started from."""
  m = config.model
  total, no_pos = _param_counts(params)
  name = card.get("model_name") or config.name
  arch = _architecture(m)
  heads = " + sequence-classification head" if "classifier" in params else ""
  max_len = m.max_len
  if positions not in (None, m.max_len):
    max_len = (f"{positions} (trained; the position table has {m.max_len} rows, those past {positions} untrained)"
               if models.architecture(m)["positions"] == "learned" else
               f"{positions} (trained; rotary positions: rows up to model.max_len={m.max_len} run, untrained "
               f"past {positions})")
  lines = [f"# {name}", ""]
  if card.get("description"):
    lines += [card["description"], ""]
  lines += ["## Model", "", _table([
      ("Architecture", arch + heads), ("Layers", m.num_layers), ("Model width (d_model)", m.d_model),
      ("Attention heads", m.num_heads), ("MLP width (d_ff)", m.d_ff),
      ("Vocabulary", f"{m.vocab_size} (model rows; the tokenizer may use fewer)"),
      ("Max sequence length", max_len),
      ("Parameters", f"{total:,} ({no_pos:,} without position embeddings)"),
      ("Parameter dtype", m.param_dtype)], ("", "")), ""]

  t = config.get("train") or {}
  objective = (f"sequence classification ({config.task.name})" if finetune.is_classifier_run(config) else
               {"clm": "causal LM", "mlm": "masked LM"}.get(t.get("objective"), t.get("objective")))
  seq_len = config.data.get("seq_len", 0)
  batch = t.get("batch_size", 0)
  lines += ["## Training", ""]
  if imported is not None:
    lines += [f"Weights imported from Hugging Face ({imported.get('model_type')}: {imported.get('source')}); "
              f"fmjax trained them for {step} step(s) after that.", ""]
  planned = _planned_steps(config, step, imported)
  started = ([("Started from", f"`{config.init_from}`" + (f", step {init_step}" if init_step is not None else ""))]
             if config.get("init_from") else [])
  lines += [_table([
      ("Objective", objective), *started,
      ("Steps", f"{step} (the imported weights, untrained here)" if imported is not None and planned is None else
                f"{step} (of {planned or '?'} planned" + ("; the run had not finished" if planned and step < planned
                                                          else "") + ")"),
      ("Tokens seen", f"{step * batch * seq_len:,} (steps x batch {batch} x sequence {seq_len}, "
                      + ("padded examples)" if "task" in config else "packed rows)")),
      ("Optimizer", f"AdamW, lr {config.optim.lr}, {config.optim.schedule} schedule, "
                    f"weight decay {config.optim.weight_decay}" if "optim" in config else "n/a"),
      ("PII scrubbing", "on" if report["pii_scrub"] else "off")], ("", "")), ""]

  lines += ["## Training data", ""]
  licenses = dict(card.get("data_licenses") or {})
  sources = report["sources"] or list(licenses)
  lines += [_table([(s, licenses.get(s, "not declared")) for s in sources], ("Source", "Declared license")), ""]
  lines += [_pii_line(report) + " Details: `data_report.json`.", ""]
  before = report.get("init_from")
  while before:  # the data the trunk learnt from first, run by run
    lines += [f"Before that, the run it started from (`{before['workdir']}`, sources "
              f"{', '.join(before['sources']) or 'unknown'}): {_pii_line(before)}", ""]
    before = before.get("init_from")

  lines += ["## Evaluation", ""]
  eval_step, metrics = evals
  if metrics:
    # A pretraining run scores only train.eval_batches batches as it trains; fine-tuning, the whole split.
    scope = ("the whole validation split" if "task" in config else
             f"the first {t.get('eval_batches', '?')} batches of the eval split; `fmjax eval` scores all of it")
    title = (f"Held-out results at step {eval_step} (from metrics.jsonl; {scope}):" if eval_step == step else
             f"No evaluation at the released step {step}; the latest before it, at step {eval_step} "
             f"(from metrics.jsonl; {scope}):")
    lines += [title, "",
              _table([(k, f"{v:.4f}" if isinstance(v, float) else v) for k, v in sorted(metrics.items())],
                     ("Metric", "Value")), ""]
  else:
    lines += [f"No evaluation results at or before step {step} were recorded in this run's metrics.jsonl.", ""]

  lines += ["## Intended use", "", str(card["intended_use"]), "",
            "## Limitations", "", str(card["limitations"]), "",
            "## License and use restrictions", "", f"License: {card['license']}", "",
            f"Use restrictions: {card['use_restrictions']}", ""]
  for key, title in (("authors", "Authors"), ("citation", "Citation"), ("contact", "Contact")):
    if card.get(key):
      value = card[key]
      lines += [f"## {title}", "", ", ".join(map(str, value)) if isinstance(value, list) else str(value), ""]
  auto = ("AutoModelForSequenceClassification" if "classifier" in params else
          "AutoModelForCausalLM" if m.family == "gpt" else "AutoModelForMaskedLM")
  use = "fmjax eval --workdir=fmjax" if finetune.is_classifier_run(config) else "fmjax generate --workdir=fmjax"
  lines += ["## Files", "",
            "- `hf/`: Hugging Face format (safetensors, float32; the vocabulary is exported padded to the model's "
            f"`vocab_size`): `transformers.{auto}.from_pretrained('hf')`, `AutoTokenizer.from_pretrained('hf')`.",
            "- `fmjax/`: the fmjax workdir (config.json, checkpoint step "
            f"{step}, tokenizer): `{use}` or `--config.init_from=fmjax` to fine-tune.",
            "- `data_report.json`: the PII scan above.",
            "- `SHA256SUMS`: checksums of every file; verify with `sha256sum -c SHA256SUMS`.", ""]
  return "\n".join(lines)


# ----------------------------------------------------------------------------- bundle


def sha256sums(directory: str) -> str:
  """`<sha256>  <relative path>` for every file under `directory`, sorted (sha256sum -c format)."""
  lines = []
  for root, _, names in os.walk(directory):
    for name in names:
      path = os.path.join(root, name)
      rel = os.path.relpath(path, directory)
      if rel == "SHA256SUMS":
        continue
      digest = hashlib.sha256()
      with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
          digest.update(chunk)
      lines.append(f"{digest.hexdigest()}  {rel}")
  return "\n".join(sorted(lines, key=lambda l: l.split("  ", 1)[1])) + "\n"


def _planned_steps(config, step: int, imported: Mapping | None) -> int | None:
  """The steps the run meant to train; None for imported weights fmjax has not trained (their config's
  train.steps is a default, not a plan)."""
  if imported is not None and step == 0:
    return None
  return (config.get("train") or {}).get("steps")


def _imported_info(workdir: str) -> dict | None:
  return files.read_json(os.path.join(workdir, interop.IMPORT_INFO))


# Where a run's training data is now, if it moved: its text, or a fine-tuning run's task files.
MOVED_DATA_KEYS = ("data.files", "data.data_dir", "task.files", "task.validation_files", "sft.eval_files",
                   "dpo.eval_files")


def _moved(config, moved: Sequence[str]):
  """`config` with `moved` (`data.files=...`, `data.data_dir=...`) applied: the same training text,
  found where it is now."""
  for item in moved:
    key = item.split("=", 1)[0].strip().removeprefix("config.")
    if key not in MOVED_DATA_KEYS:
      raise ConfigError(f"fmjax release takes --config.{', --config.'.join(MOVED_DATA_KEYS)} only (where the "
                        f"run's training data is now), got --config.{key}")
  config_lib.apply_overrides(config, moved)
  return config


def release(workdir: str, out: str, *, card_path: str | None = None, step: int | None = None,
            pii_sample: int = DEFAULT_PII_SAMPLE, moved: Sequence[str] = ()) -> str:
  """Writes the release bundle of `workdir`'s checkpoint (latest or `step`) to `out`; returns `out`.

  The bundle describes that checkpoint: the config it recorded (not a later start's config.json),
  its metrics up to its step. A checkpoint with non-finite weights is refused; an unfinished run
  is released with a warning. Everything that can fail (card fields, checkpoint, tokenizer,
  training data) is checked before the bundle is written, and the bundle is written under a
  temporary name and renamed at the end (to a bucket: copied up, SHA256SUMS last).
  `moved` says where the training text is now (`data.files=NEW_GLOB`), when it moved since.
  """
  from fmjax import checkpoint as ckpt_lib
  from fmjax import data, generate
  workdir, out = files.absolute(workdir), files.absolute(out)
  if pii_sample < 1:
    raise ConfigError(f"--pii_sample={pii_sample} must be at least 1 (training documents the PII report scans)")
  config, step, meta = interop.run_config_at(workdir, step)  # the config checkpoint `step` recorded
  interop.hf_model_type(config.model)  # a decoder with no Hugging Face counterpart cannot be released
  config = _moved(config, moved)
  imported = _imported_info(workdir)
  card = read_card(config, card_path)
  missing = missing_fields(card, data_sources(config, imported))
  if missing:
    where = f"--card={card_path}" if card_path else "a --card=card.json file (or config.release)"
    raise ConfigError(f"release refused: fill in these model card fields in {where}: {', '.join(missing)}")
  interop.check_new_dir(out, "--out")
  if (out.rstrip("/") + "/").startswith(workdir.rstrip("/") + "/"):
    raise ConfigError(f"--out={out} is inside the run's --workdir={workdir}; choose a directory outside it")

  params = interop.read_params(workdir, step)
  if bad := _non_finite(params):
    good = [s for s in ckpt_lib.saved_steps(os.path.join(workdir, "checkpoints")) if s < step]
    raise ConfigError(f"release refused: checkpoint step {step} holds non-finite parameters ({bad}); release an "
                      f"earlier step with --step" + (f" (saved: {', '.join(map(str, good))})" if good else ""))
  planned = _planned_steps(config, step, imported)
  if planned and step < planned:
    print(f"warning: releasing step {step} of the {planned} train.steps planned: the run has not finished "
          "(the model card says so)", file=sys.stderr)
  params = interop.from_finetune(params, config)  # as `fmjax export`: LoRA merged, the head as classifier
  tokenizer = interop.run_tokenizer(workdir, config)
  report = pii_report(config, pii_sample, imported)
  evals = eval_results(workdir, step)
  positions = generate.trained_positions(config, workdir)

  try:
    with interop.staged_dir(out, ".releasing") as staging:
      os.makedirs(staging)
      interop.export_params(params, config.model, os.path.join(staging, "hf"), tokenizer,
                            tuple(meta.get("label_names") or ()), positions)
      run_dir = os.path.join(staging, "fmjax")
      files.copy_tree(os.path.join(workdir, "checkpoints", str(step)),
                      os.path.join(run_dir, "checkpoints", str(step)))
      tokenizer.save(os.path.join(run_dir, data.RUN_TOKENIZER))
      run_config = json.loads(config.to_json_best_effort())
      # The bundle carries its tokenizer, so the copied run no longer needs the training corpus for it;
      # the path is relative to fmjax/ (data.resolve_tokenizer_path), so the bundle may move.
      if isinstance(run_config.get("data", {}).get("tokenizer"), dict):
        run_config["data"]["tokenizer"].update(kind="hf", path=data.RUN_TOKENIZER)
      with open(os.path.join(run_dir, "config.json"), "w") as f:
        json.dump(run_config, f, indent=2, sort_keys=True)
      _copy_metrics(workdir, run_dir, step)
      if imported is not None:
        files.path(os.path.join(workdir, interop.IMPORT_INFO)).copy(
            files.path(os.path.join(run_dir, interop.IMPORT_INFO)))
      with open(os.path.join(staging, "data_report.json"), "w") as f:
        json.dump(report, f, indent=2)
      with open(os.path.join(staging, "MODEL_CARD.md"), "w") as f:
        f.write(model_card(config, card, step=step, params=params, report=report, evals=evals, imported=imported,
                           positions=positions, init_step=meta.get("init_from_step")))
      with open(os.path.join(staging, "SHA256SUMS"), "w") as f:  # a bucket gets it last: the bundle is whole
        f.write(sha256sums(staging))
  except OSError as e:
    if not files.is_remote(out):
      raise
    raise ConfigError(f"could not write the bundle to {out} ({type(e).__name__}: {str(e).splitlines()[0][:200]}); "
                      "check the bucket and your credentials, remove what was written there, and run again") from None
  return out


def _non_finite(params) -> str:
  """The first parameter holding NaN or infinity, by its path; "" when all are finite."""
  return next((path for path, v in config_lib.flatten(params).items() if not np.isfinite(np.asarray(v)).all()), "")


def _copy_metrics(workdir: str, run_dir: str, step: int) -> None:
  """The run's metrics.jsonl up to the released step: the bundle's `fmjax report` ends where its model does."""
  from fmjax import report  # its reader: each step's rows merged, those a later run replaced dropped
  if not files.exists(os.path.join(workdir, report.METRICS_FILE)):
    return
  with open(os.path.join(run_dir, report.METRICS_FILE), "w") as f:
    f.writelines(json.dumps(r) + "\n" for r in report.read_metrics(workdir) if r["step"] <= step)


def cli(argv: list[str]) -> int:
  """`fmjax release --workdir=W --out=DIR [--card=card.json] [--step=N] [--pii_sample=1000]
  [--config.data.files=NEW_GLOB]`."""
  from fmjax.cli import ArgumentParser
  argv, moved = config_lib.split_overrides(argv)
  p = ArgumentParser(prog="fmjax release")
  p.add_argument("--workdir", required=True, help="fmjax run directory (config.json + checkpoints/)")
  p.add_argument("--out", required=True, help="new directory for the bundle")
  p.add_argument("--card", default=None, help="JSON with the model card fields fmjax cannot know")
  p.add_argument("--step", type=int, default=None, help="checkpoint step (default: the latest)")
  p.add_argument("--pii_sample", type=int, default=DEFAULT_PII_SAMPLE, help="training documents to scan for PII")
  args = p.parse_args(argv)
  print(release(args.workdir, args.out, card_path=args.card, step=args.step, pii_sample=args.pii_sample,
                moved=moved))
  return 0
