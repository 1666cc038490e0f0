"""Downstream tasks: official GLUE metrics, TFDS glue/* (mock data), CSV/JSONL files, the offline task."""

import collections
import json

import numpy as np
import pytest

from fmjax import config_lib, tasks
from fmjax.config_lib import ConfigError


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
  return str(tmp_path_factory.mktemp("fmjax_cache"))


def ft_config(cache_dir, *overrides, arg="task=pydoc_family"):
  return config_lib.load_config(f"configs/finetune_cls.py:{arg}", [f"data.cache_dir={cache_dir}", *overrides])


def test_classification_metrics_match_hand_computed_values():
  pred = [1, 1, 0, 0, 1, 0, 1, 1]
  gold = [1, 0, 0, 0, 1, 1, 1, 0]  # tp 3, fp 2, fn 1, tn 2
  m = tasks.compute_metrics(("accuracy", "f1", "matthews"), pred, gold)
  assert m["accuracy"] == pytest.approx(5 / 8)
  assert m["f1"] == pytest.approx(2 * 3 / (2 * 3 + 2 + 1))
  assert m["matthews"] == pytest.approx((3 * 2 - 2 * 1) / np.sqrt(5 * 4 * 4 * 3))
  assert tasks.compute_metrics(("matthews", "f1"), [0, 0, 0], [0, 0, 0]) == {"matthews": 0.0, "f1": 0.0}


def test_f1_scores_the_class_the_labels_call_positive(tmp_path):
  pred = [1, 1, 0, 0, 1, 0, 1, 1]
  gold = [1, 0, 0, 0, 1, 1, 1, 0]  # for class 0: tp 2, fp 1, fn 2
  assert tasks.compute_metrics(("f1",), pred, gold, positive=0)["f1"] == pytest.approx(2 * 2 / (2 * 2 + 1 + 2))
  mcc = lambda **kw: tasks.compute_metrics(("matthews",), pred, gold, **kw)
  assert mcc(positive=0) == mcc()  # symmetric in the two classes
  # Sorted, the negation comes second; F1 still scores the paraphrase, not "not_equivalent".
  assert tasks.positive_class(("equivalent", "not_equivalent"), "", "f") == 0
  assert tasks.positive_class(("duplicate", "not duplicate"), "", "f") == 0
  assert tasks.positive_class(("acceptable", "unacceptable"), "", "f") == 0
  assert tasks.positive_class(("neg", "pos"), "", "f") == 1 and tasks.positive_class(("neg", "pos"), "neg", "f") == 0
  with pytest.raises(ConfigError, match=r"task.positive_label='yes' is not a label of f; use one of \['neg', 'pos'\]"):
    tasks.positive_class(("neg", "pos"), "yes", "f")
  path = tmp_path / "pairs.jsonl"  # every prediction "equivalent": its F1 is the one MRPC reports
  path.write_text("".join(json.dumps({"sentence": f"s{i}", "label": "equivalent" if i % 5 else "not_equivalent"})
                          + "\n" for i in range(50)))
  task = tasks.load_task(ft_config(tmp_path, f"task.files={path}", arg="task=jsonl"))
  assert task.label_names == ("equivalent", "not_equivalent") and task.positive == 0
  all_equivalent = [0.0] * len(task.splits["validation"])
  f1 = tasks.evaluate(task, all_equivalent)["f1"]
  share = sum(y == 0 for _, y in task.splits["validation"]) / len(all_equivalent)
  assert f1 == pytest.approx(2 * share / (1 + share)) and f1 > 0


def test_correlations_match_scipy_golden_values():
  # scipy.stats.pearsonr / spearmanr on these values (spearman with tied ranks averaged).
  pred = [0.5, 1.0, 1.0, 2.5, 3.0, 4.0]
  gold = [0.0, 1.5, 1.0, 2.0, 2.0, 5.0]
  m = tasks.compute_metrics(("pearson", "spearman"), pred, gold)
  assert m["pearson"] == pytest.approx(0.9037658518250968, abs=1e-12)
  assert m["spearman"] == pytest.approx(0.9705882352941178, abs=1e-12)
  with pytest.raises(ConfigError, match="unknown metric"):
    tasks.compute_metrics(("bleu",), [1], [1])


def test_hash_split_holds_out_about_the_percent_asked():
  examples = [((f"sentence {i}", f"other {i % 7}"), float(i % 2)) for i in range(2000)]
  split = tasks.hash_split(examples, 10)
  assert 150 <= len(split["validation"]) <= 250  # Binomial(2000, 0.1): 200 +- 13
  assert sorted(split["train"] + split["validation"]) == sorted(examples) and tasks.hash_split(examples, 10) == split
  few = tasks.hash_split(examples[:3], 0)  # a tiny task still gets one validation example
  assert len(few["validation"]) == 1 and len(few["train"]) == 2
  # The whole text decides: pairs that share their first sentence are split like any others.
  pairs = tasks.hash_split([(("the same first sentence", f"second {i}"), 0.0) for i in range(200)], 50)
  assert 50 <= len(pairs["validation"]) <= 150


def test_offline_task_has_real_labelled_text_and_a_stable_split(cache_dir):
  task = tasks.load_task(ft_config(cache_dir))
  train, val = task.splits["train"], task.splits["validation"]
  assert len(train) + len(val) >= 1000 and len(val) >= 200
  assert task.num_classes == len(tasks.PYDOC_FAMILIES) == 7 and task.metrics == ("accuracy",)
  counts = collections.Counter(int(y) for _, y in train + val)
  assert sorted(counts) == list(range(7)) and min(counts.values()) >= 100  # every family is well represented
  assert not {t for t, _ in train} & {t for t, _ in val}  # no text in both splits
  assert all(len(t[0].split()) >= tasks._MIN_WORDS for t, _ in train)
  # The cached copy and a fresh parse give the same examples in the same order (and so the same split).
  again = tasks.load_task(ft_config(cache_dir))
  assert again.splits == task.splits
  mail = [t[0] for t, y in train if task.label_names[int(y)] == "mail"]
  assert sum("message" in t.lower() or "mail" in t.lower() for t in mail) > len(mail) // 4


@pytest.mark.parametrize("name,pair,num_classes,metrics", [
    ("sst2", False, 2, ("accuracy",)),
    ("mrpc", True, 2, ("f1", "accuracy")),
    ("cola", False, 2, ("matthews",)),
    ("stsb", True, 0, ("spearman", "pearson")),  # Spearman first: BERT's headline for STS-B
    ("mnli", True, 3, ("accuracy",)),
])
def test_glue_through_tfds_mock_data(cache_dir, name, pair, num_classes, metrics, tfds_online):
  tfds = pytest.importorskip("tensorflow_datasets")
  with tfds.testing.mock_data(num_examples=6):
    task = tasks.load_task(ft_config(cache_dir, arg=f"task=glue/{name}"))
  assert task.name == f"glue/{name}" and task.num_classes == num_classes and task.metrics == metrics
  # TFDS's class names (what an exported classifier's id2label says); stsb's scores have none.
  assert task.label_names == {"sst2": ("negative", "positive"), "mrpc": ("not_equivalent", "equivalent"),
                              "cola": ("unacceptable", "acceptable"), "stsb": (),
                              "mnli": ("entailment", "neutral", "contradiction")}[name]
  assert len(task.splits["train"]) == 6 and len(task.splits["validation"]) == 6
  texts, label = task.splits["validation"][0]
  assert len(texts) == (2 if pair else 1) and all(isinstance(t, str) for t in texts)
  if num_classes:
    assert float(label).is_integer() and 0 <= label < num_classes
  preds = [y for _, y in task.splits["validation"]]
  result = tasks.evaluate(task, preds)
  assert set(result) == set(metrics) and all(v == pytest.approx(1.0) for v in result.values())


def test_glue_head_size_mismatch_is_one_line(cache_dir, tfds_online):
  tfds = pytest.importorskip("tensorflow_datasets")
  with tfds.testing.mock_data(num_examples=4):
    with pytest.raises(ConfigError, match=r"has 3 classes but task.num_classes=2") as e:
      tasks.load_task(ft_config(cache_dir, "task.num_classes=2", arg="task=glue/mnli"))
  assert "\n" not in str(e.value)


def test_glue_f1_scores_task_positive_label(cache_dir, tfds_online):
  """MRPC's F1 scores `equivalent` unless task.positive_label names the other class; a label that is
  not MRPC's fails in one line, as for csv/jsonl tasks."""
  tfds = pytest.importorskip("tensorflow_datasets")
  with tfds.testing.mock_data(num_examples=8):
    default = tasks.load_task(ft_config(cache_dir, arg="task=glue/mrpc"))
    flipped = tasks.load_task(ft_config(cache_dir, "task.positive_label=not_equivalent", arg="task=glue/mrpc"))
    with pytest.raises(ConfigError, match=r"task.positive_label='paraphrase' is not a label of glue/mrpc; "
                       r"use one of \['not_equivalent', 'equivalent'\]") as e:
      tasks.load_task(ft_config(cache_dir, "task.positive_label=paraphrase", arg="task=glue/mrpc"))
  assert "\n" not in str(e.value)
  assert (default.positive, default.f1_positive_label) == (1, "equivalent")
  assert (flipped.positive, flipped.f1_positive_label) == (0, "not_equivalent")
  gold = np.array([y for _, y in flipped.splits["validation"]])
  preds = np.zeros_like(gold)  # every prediction "not_equivalent": F1 of class 0 is 2s / (1 + s), s its share
  share = np.mean(gold == 0)
  assert 0 < share < 1, "mock labels should hold both classes"
  assert tasks.evaluate(flipped, preds)["f1"] == pytest.approx(2 * share / (1 + share))
  assert tasks.evaluate(default, preds)["f1"] == 0.0


def _write_jsonl(path, records):
  path.write_text("".join(json.dumps(r) + "\n" for r in records))
  return str(path)


def test_csv_and_jsonl_tasks_with_declared_columns(tmp_path, cache_dir):
  rows = [{"q": f"question {i}", "a": f"answer {i}", "y": "yes" if i % 3 else "no"} for i in range(40)]
  path = _write_jsonl(tmp_path / "pairs.jsonl", rows)
  task = tasks.load_task(ft_config(cache_dir, "task.name=jsonl", f"task.files={path}", "task.text_columns=q,a",
                                   "task.label_column=y", "task.validation_percent=25"))
  assert task.label_names == ("no", "yes") and task.num_classes == 2 and task.metrics == ("accuracy", "f1")
  assert len(task.splits["train"]) + len(task.splits["validation"]) == 40 and task.splits["validation"]
  first = next(e for e in task.splits["train"] + task.splits["validation"] if e[0][0] == "question 0")
  assert first == (("question 0", "answer 0"), 0.0)

  csv_train, csv_val = tmp_path / "train.csv", tmp_path / "dev.csv"
  csv_train.write_text("text,score\nfine day,0.5\nbad day,-1.25\n")
  csv_val.write_text("text,score\nok day,0.0\n")
  reg = tasks.load_task(ft_config(cache_dir, "task.name=csv", f"task.files={csv_train}",
                                  f"task.validation_files={csv_val}", "task.text_columns=text",
                                  "task.label_column=score", "task.num_classes=0"))
  assert reg.is_regression and reg.metrics == ("pearson", "spearman")
  assert reg.splits == {"train": [(("fine day",), 0.5), (("bad day",), -1.25)], "validation": [(("ok day",), 0.0)]}


def test_file_task_errors_are_one_line(tmp_path, cache_dir, caplog):
  path = _write_jsonl(tmp_path / "t.jsonl", [{"sentence": "a b c", "label": 0}, {"sentence": "d e", "label": 2}])
  with pytest.raises(ConfigError, match=r"no column 'text'.*one of \['label', 'sentence'\]") as e:
    tasks.load_task(ft_config(cache_dir, "task.name=jsonl", f"task.files={path}", "task.text_columns=text"))
  assert "\n" not in str(e.value)
  with pytest.raises(ConfigError, match=r"labels \[2.0\] outside 0..1 of its 2-class head") as e:
    tasks.load_task(ft_config(cache_dir, "task.name=jsonl", f"task.files={path}", "task.num_classes=2"))
  assert "\n" not in str(e.value)
  stars = _write_jsonl(tmp_path / "r.jsonl", [{"sentence": f"text {i}", "label": 1 + i % 2} for i in range(20)])
  with caplog.at_level("WARNING", logger="fmjax"):
    assert tasks.load_task(ft_config(cache_dir, "task.name=jsonl", f"task.files={stars}", "task.text_columns=sentence"
                                     )).num_classes == 3
  assert ("integer labels run 1..2 and class ids count from 0, so class 0 never occurs and the head has 3 outputs "
          "(and a two-class task's F1 is not reported); renumber them 0..1" in caplog.text), caplog.text
  signs = _write_jsonl(tmp_path / "s.jsonl", [{"sentence": "a b c", "label": -1}, {"sentence": "d e", "label": 1}])
  with pytest.raises(ConfigError, match=r"labels \[-1.0\], and class ids count from 0; renumber them 0..K-1, or "
                                        r"write them as strings \(class names"):  # no task.num_classes could help
    tasks.load_task(ft_config(cache_dir, "task.name=jsonl", f"task.files={signs}", "task.text_columns=sentence"))
  with pytest.raises(ConfigError, match="matches no file"):
    tasks.load_task(ft_config(cache_dir, "task.name=csv", f"task.files={tmp_path}/missing*.csv"))
  # A missing validation file names its own key, not task.files (which is there).
  with pytest.raises(ConfigError, match=rf"^task.validation_files='{tmp_path}/dev.jsonl' matches no file"):
    tasks.load_task(ft_config(cache_dir, "task.name=jsonl", f"task.files={path}", "task.text_columns=sentence",
                              f"task.validation_files={tmp_path}/dev.jsonl"))
  # The label among the text columns: the model would read the answer.
  with pytest.raises(ConfigError, match=r"^task.label_column='label' is also one of task.text_columns=\('sentence', "
                                        r"'label'\); the model would read its label"):
    tasks.load_task(ft_config(cache_dir, "task.name=jsonl", f"task.files={path}", "task.text_columns=sentence,label"))
  with pytest.raises(ConfigError, match="is not one of"):
    tasks.load_task(ft_config(cache_dir, "task.name=glue/sst3"))


def test_fractional_number_labels_are_scores_not_classes(tmp_path, cache_dir):
  """Labels like 0.26 and 4.65 are never made into one class per value: regression is task.num_classes=0."""
  rows = [{"sentence": f"review {i}", "label": round(0.37 * i, 2)} for i in range(20)]
  path = _write_jsonl(tmp_path / "scores.jsonl", rows)
  for declared in ("-1", "2"):
    with pytest.raises(ConfigError, match=r"labels are numbers that are not all integers \(e.g. 0.37\).*"
                       r"set task.num_classes=0 for regression") as e:
      tasks.load_task(ft_config(cache_dir, "task.name=jsonl", f"task.files={path}", f"task.num_classes={declared}"))
    assert "\n" not in str(e.value)
  csv_path = tmp_path / "scores.csv"  # CSV labels are strings: "0.5" is a number all the same
  csv_path.write_text("sentence,label\n" + "".join(f"text {i},{i / 2}\n" for i in range(10)))
  with pytest.raises(ConfigError, match="set task.num_classes=0"):
    tasks.load_task(ft_config(cache_dir, "task.name=csv", f"task.files={csv_path}"))
  reg = tasks.load_task(ft_config(cache_dir, "task.name=jsonl", f"task.files={path}", "task.num_classes=0"))
  assert reg.is_regression and reg.metrics == ("pearson", "spearman")
  # Integer-valued numbers stay class ids, and booleans class names.
  flags = _write_jsonl(tmp_path / "flags.jsonl", [{"sentence": f"s {i}", "label": i % 2 == 0} for i in range(20)])
  assert tasks.load_task(ft_config(cache_dir, "task.name=jsonl", f"task.files={flags}")).label_names == ("False", "True")
  ints = _write_jsonl(tmp_path / "ints.jsonl", [{"sentence": f"s {i}", "label": float(i % 3)} for i in range(20)])
  assert tasks.load_task(ft_config(cache_dir, "task.name=jsonl", f"task.files={ints}")).num_classes == 3


def test_null_labels_and_non_utf8_files_are_refused_in_one_line(tmp_path, cache_dir):
  """A JSON null or a CSV row short of its label is no class "None": refused with file and line."""
  rows = [{"sentence": "good", "label": "pos"}, {"sentence": "bad", "label": None}]
  path = _write_jsonl(tmp_path / "t.jsonl", rows)
  with pytest.raises(ConfigError, match=r"t.jsonl:2 has no value in column 'label'") as e:
    tasks.load_task(ft_config(cache_dir, "task.name=jsonl", f"task.files={path}", "task.text_columns=sentence"))
  assert "\n" not in str(e.value)
  csv_path = tmp_path / "t.csv"
  csv_path.write_text("text,label\nfine day,1\nshort row\n")
  with pytest.raises(ConfigError, match=r"t.csv:3 has no value in column 'label'"):
    tasks.load_task(ft_config(cache_dir, "task.name=csv", f"task.files={csv_path}", "task.text_columns=text"))
  latin = tmp_path / "latin.csv"
  latin.write_bytes("text,label\ncaf\xe9,1\n".encode("latin-1"))
  with pytest.raises(ConfigError, match=r"latin.csv is not UTF-8 text \(byte 14\)") as e:
    tasks.load_task(ft_config(cache_dir, "task.name=csv", f"task.files={latin}", "task.text_columns=text"))
  assert "\n" not in str(e.value)


def test_a_validation_label_no_training_example_has_is_refused_unless_counted(tmp_path, cache_dir):
  """A stray dev label once became a class of its own: a 2-class task was trained as 3, and lost its F1."""
  train = _write_jsonl(tmp_path / "train.jsonl", [{"sentence": f"s {i}", "label": ["neg", "pos"][i % 2]}
                                                  for i in range(20)])
  dev = _write_jsonl(tmp_path / "dev.jsonl", [{"sentence": "d 0", "label": "pos"}, {"sentence": "d 1", "label": "meh"}])
  files = ("task.name=jsonl", f"task.files={train}", f"task.validation_files={dev}")
  for declared in ("-1", "2"):
    with pytest.raises(ConfigError, match=rf"^{dev}:2 has label 'meh', which no training example has \(labels: neg, "
                                          r"pos\); fix the label, or set task.num_classes=3 to keep it as a class$"):
      tasks.load_task(ft_config(cache_dir, *files, f"task.num_classes={declared}"))
  task = tasks.load_task(ft_config(cache_dir, *files, "task.num_classes=3"))  # declared: a class of its own
  assert task.label_names == ("meh", "neg", "pos") and task.splits["validation"][1][1] == 0.0
  # Integer labels are class ids: the head is 0..the largest training id, or task.num_classes.
  train = _write_jsonl(tmp_path / "train_ids.jsonl", [{"sentence": f"s {i}", "label": i % 2} for i in range(20)])
  dev = _write_jsonl(tmp_path / "dev_ids.jsonl", [{"sentence": "d 0", "label": 1}, {"sentence": "d 1", "label": 5}])
  files = ("task.name=jsonl", f"task.files={train}", f"task.validation_files={dev}")
  for declared in ("-1", "4"):
    with pytest.raises(ConfigError, match=rf"^{dev}:2 has label 5, which no training example has \(labels: 0..1\); "
                                          r"fix the label, or set task.num_classes=6 to keep it as a class$"):
      tasks.load_task(ft_config(cache_dir, *files, f"task.num_classes={declared}"))
  task = tasks.load_task(ft_config(cache_dir, *files, "task.num_classes=6"))
  assert task.num_classes == 6 and task.label_names == tuple("012345")


def test_integer_labels_name_every_declared_class(tmp_path, cache_dir):
  """A declared head larger than the training ids names all its classes (an export's id2label needs each)."""
  path = _write_jsonl(tmp_path / "ids.jsonl", [{"sentence": f"s {i}", "label": i % 2} for i in range(20)])
  task = tasks.load_task(ft_config(cache_dir, "task.name=jsonl", f"task.files={path}", "task.num_classes=4"))
  assert task.num_classes == 4 and task.label_names == ("0", "1", "2", "3")


def test_a_label_column_of_mostly_distinct_values_is_refused(tmp_path, cache_dir):
  """task.label_column=sentence once made 80 classes of 80 examples without a word."""
  rows = [{"sentence": f"review number {i}", "id": i, "label": ["neg", "pos"][i % 2]} for i in range(40)]
  path = _write_jsonl(tmp_path / "t.jsonl", rows)
  for column in ("sentence", "id"):
    with pytest.raises(ConfigError, match=rf"^task.label_column='{column}' has 40 different values in 40 examples of "
                                          r"task.files, so it holds no class labels; set task.label_column"):
      tasks.load_task(ft_config(cache_dir, "task.name=jsonl", f"task.files={path}", f"task.label_column={column}"))
  assert tasks.load_task(ft_config(cache_dir, "task.name=jsonl", f"task.files={path}")).num_classes == 2
  # Declared, they are classes all the same; a tiny task with a few examples a class is left alone.
  assert tasks.load_task(ft_config(cache_dir, "task.name=jsonl", f"task.files={path}", "task.label_column=id",
                                   "task.num_classes=40")).num_classes == 40
  tiny = _write_jsonl(tmp_path / "tiny.jsonl", [{"sentence": f"s {i}", "label": f"c{i % 6}"} for i in range(8)])
  assert tasks.load_task(ft_config(cache_dir, "task.name=jsonl", f"task.files={tiny}")).num_classes == 6


def test_training_labels_of_one_class_are_refused(tmp_path, cache_dir):
  """A task file whose examples all had one label trained a one-class head to loss 0 and "accuracy 1.0"."""
  for label, shown in (("pos", "'pos'"), (1, "1"), (1.0, "1.0")):
    path = _write_jsonl(tmp_path / "t.jsonl", [{"sentence": f"text {i}", "label": label} for i in range(20)])
    for declared in ("-1", "2"):
      with pytest.raises(ConfigError, match=rf"^every training example of task.files has the label {shown} "
                                            r"\(task.label_column='label'\), and a classifier learns nothing from "
                                            r"one class; give examples of at least two classes") as e:
        tasks.load_task(ft_config(cache_dir, "task.name=jsonl", f"task.files={path}", f"task.num_classes={declared}"))
      assert "\n" not in str(e.value)
  # Regression takes any scores; two classes train.
  assert tasks.load_task(ft_config(cache_dir, "task.name=jsonl", f"task.files={path}", "task.num_classes=0"))
  two = _write_jsonl(tmp_path / "two.jsonl", [{"sentence": f"text {i}", "label": i % 2} for i in range(20)])
  assert tasks.load_task(ft_config(cache_dir, "task.name=jsonl", f"task.files={two}")).num_classes == 2


@pytest.mark.parametrize("override, message", [
    ("task.max_train_examples=-1", r"task.max_train_examples=-1 must be at least 0 \(0: every training example\)"),
    ("task.validation_percent=150", r"task.validation_percent=150 must be in \[0, 100\)"),
    ("task.validation_percent=-5", r"task.validation_percent=-5 must be in \[0, 100\)"),
    ("task.num_classes=-5", r"task.num_classes=-5 must be -1 \(from the labels\), 0 \(regression\) or at least 2$"),
    ("task.num_classes=1", r"task.num_classes=1 must be -1 \(from the labels\), 0 \(regression\) or at least 2$"),
])
def test_out_of_range_task_sizes_are_one_line(cache_dir, override, message):
  with pytest.raises(ConfigError, match=rf"^{message}"):
    tasks.load_task(ft_config(cache_dir, override))


def test_a_regression_label_that_is_not_finite_is_refused_with_its_line(tmp_path, cache_dir):
  """A "nan" or "inf" score once went into training, and every loss and update after it was NaN."""
  for bad in ("nan", "inf", "-Infinity"):
    path = _write_jsonl(tmp_path / "scores.jsonl", [{"sentence": f"s {i}", "label": [0.5, bad][i == 3]}
                                                    for i in range(10)])
    with pytest.raises(ConfigError, match=rf"^{path}:4 has label '{bad}', not a finite number, which regression "
                                          r"cannot learn; fix the label or remove the record$"):
      tasks.load_task(ft_config(cache_dir, "task.name=jsonl", f"task.files={path}", "task.num_classes=0"))


def test_a_csv_with_a_byte_order_mark_keeps_its_first_column_name(tmp_path, cache_dir):
  """Excel's "CSV UTF-8" opens with a byte-order mark, which once became part of the first column's name."""
  path = tmp_path / "excel.csv"
  path.write_bytes("\ufefftext,label\nfine day,pos\nbad day,neg\nok day,pos\n".encode("utf-8"))
  task = tasks.load_task(ft_config(cache_dir, "task.name=csv", f"task.files={path}", "task.text_columns=text"))
  assert task.label_names == ("neg", "pos")
  assert sorted(t for (t,), _ in task.splits["train"] + task.splits["validation"]) == ["bad day", "fine day", "ok day"]


def test_json_lists_and_objects_are_no_texts_labels_or_records(tmp_path, cache_dir):
  """A list or object under a column was once str()-ed into a text or a class of its own ("{'a': 1}")."""
  rows = [{"text": f"s {i}", "label": i % 2} for i in range(10)]
  for column, value in (("text", {"a": 1}), ("label", {"a": 1}), ("label", [1])):
    path = _write_jsonl(tmp_path / "t.jsonl", rows[:3] + [{**rows[3], column: value}] + rows[4:])
    kind, what = type(value).__name__, "a label" if column == "label" else "text"
    with pytest.raises(ConfigError, match=rf"^{path}:4 has a JSON {kind} in column '{column}', where {what} goes"):
      tasks.load_task(ft_config(cache_dir, "task.name=jsonl", f"task.files={path}", "task.text_columns=text"))
  path = tmp_path / "lists.jsonl"
  path.write_text('["a b", 1]\n')
  with pytest.raises(ConfigError, match=rf"^{path}:1 is a JSON list, not an object; .* columns \['label', 'text'\]$"):
    tasks.load_task(ft_config(cache_dir, "task.name=jsonl", f"task.files={path}", "task.text_columns=text"))


def test_labels_that_mix_numbers_and_strings_are_refused(tmp_path, cache_dir):
  """0/1 in one file and "neg"/"pos" in another once made four classes of two."""
  rows = [{"sentence": f"s {i}", "label": [0, 1, "neg", "pos"][i % 4]} for i in range(20)]
  path = _write_jsonl(tmp_path / "t.jsonl", rows)
  with pytest.raises(ConfigError, match=rf"^{path}: labels mix numbers \(e.g. 0\) and strings \(e.g. 'neg'\)"):
    tasks.load_task(ft_config(cache_dir, "task.name=jsonl", f"task.files={path}"))
  # Class ids written as numbers in some records and as strings in others are the same ids.
  ids = _write_jsonl(tmp_path / "ids.jsonl", [{"sentence": f"s {i}", "label": [0, "1"][i % 2]} for i in range(20)])
  assert tasks.load_task(ft_config(cache_dir, "task.name=jsonl", f"task.files={ids}")).label_names == ("0", "1")


def test_integer_labels_far_beyond_their_count_are_refused_unless_declared(tmp_path, cache_dir):
  """Labels 0 and 10000000 once made a head of 10000001 classes (and 10**9 ran out of memory)."""
  rows = [{"sentence": f"s {i}", "label": [0, 10_000_000][i % 2]} for i in range(20)]
  path = _write_jsonl(tmp_path / "t.jsonl", rows)
  with pytest.raises(ConfigError, match=rf"^{path}: integer labels run up to 10000000 but take only 2 different "
                                        r"values, which would make a head of 10000001 classes; renumber"):
    tasks.load_task(ft_config(cache_dir, "task.name=jsonl", f"task.files={path}"))
  # Ids with a few unused (sentiment140's 0 and 4), or a declared head, are left alone.
  few = _write_jsonl(tmp_path / "few.jsonl", [{"sentence": f"s {i}", "label": [0, 4][i % 2]} for i in range(20)])
  assert tasks.load_task(ft_config(cache_dir, "task.name=jsonl", f"task.files={few}")).num_classes == 5
  wide = _write_jsonl(tmp_path / "wide.jsonl", [{"sentence": f"s {i}", "label": [0, 150][i % 2]} for i in range(20)])
  assert tasks.load_task(ft_config(cache_dir, "task.name=jsonl", f"task.files={wide}",
                                   "task.num_classes=151")).num_classes == 151
