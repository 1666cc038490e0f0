"""A workdir in a bucket (`gs://`), as on a pod: everything a run keeps goes to the workdir.

GCS is not reachable here, so `gs://fmjax-test/` is backed by a local directory through
`files.path`, the one place fmjax turns a workdir path into a file-system path (Orbax's
checkpoints included). Every other rule of a remote path holds: it is no local path (a write
through `open` or `os.makedirs` would make a `./gs:` directory, which the fixture rejects), and
a run's logs reach it only as whole files (`files.Mirror`).
"""

import json
import os
import threading

import pytest
from etils import epath

from fmjax import config_lib, data, evaluate, files, finetune, generate, train

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BUCKET = "gs://fmjax-test"
TINY = ["model.num_layers=2", "model.d_model=64", "model.num_heads=4", "model.d_ff=128", "model.vocab_size=512",
        "data.tokenizer.vocab_size=512", "data.seq_len=32", "train.batch_size=8", "train.log_every=1",
        "train.eval_every=2", "train.eval_batches=1", "train.progress_bar=false", "optim.warmup_steps=1",
        "checkpoint.every_steps=2", "checkpoint.keep=0", "checkpoint.async_save=false"]


@pytest.fixture
def bucket(tmp_path, monkeypatch):
  """`gs://fmjax-test/...` stored under tmp_path/bucket; the test runs in tmp_path/cwd."""
  root = tmp_path / "bucket"
  root.mkdir()
  real = files.path

  def path(p):
    p = str(p)
    if p.startswith(BUCKET + "/"):
      return epath.Path(str(root / p[len(BUCKET) + 1:]))
    return real(p)

  monkeypatch.setattr(files, "path", path)
  monkeypatch.setattr(files, "_RANGE_FS", {"gs": None})  # ranged reads go through files.path too, as without gcsfs
  monkeypatch.setattr(files, "_COPIES", {})  # another test's bucket files are not this one's
  (tmp_path / "cwd").mkdir()
  monkeypatch.chdir(tmp_path / "cwd")
  yield root
  assert not os.path.exists(tmp_path / "cwd" / "gs:"), "something was written to a local ./gs: directory"


def gpt(cache_dir, *extra):
  return config_lib.load_config(os.path.join(REPO, "configs", "gpt.py") + ":tiny",
                                TINY + [f"data.cache_dir={cache_dir}", *extra])


def rows(path) -> list[dict]:
  return [json.loads(line) for line in open(path) if line.strip()]


def test_a_run_keeps_everything_in_its_bucket_workdir_and_resumes_from_it(bucket, tmp_path):
  workdir = f"{BUCKET}/runs/gpt"
  first = train.run(gpt(tmp_path / "cache", "train.steps=2"), workdir)
  run = bucket / "runs" / "gpt"
  assert first["step"] == 2
  assert json.load(open(run / "config.json"))["train"]["steps"] == 2
  assert (run / "tokenizer" / "tokenizer.json").exists() and (run / "checkpoints" / "2").is_dir()
  assert [r["step"] for r in rows(run / "metrics.jsonl") if "train/loss" in r] == [1, 2]
  assert any(name.startswith("events.out.tfevents") for name in os.listdir(run / "tb"))

  # A new VM: only the bucket is left. The run resumes from it and appends to its metrics.
  second = train.run(gpt(tmp_path / "cache", "train.steps=4"), workdir)
  assert second["step"] == 4
  assert [r["step"] for r in rows(run / "metrics.jsonl") if "train/loss" in r] == [1, 2, 3, 4]
  assert [r["step"] for r in rows(run / "metrics.jsonl") if "eval/loss" in r] == [2, 4]
  assert len([n for n in os.listdir(run / "tb") if n.startswith("events")]) == 2

  # Commands that read a run read it from the bucket: its params, and its tokenizer.
  restored = generate.restore_run(workdir)
  assert restored.step == 4
  saved = data.load_tokenizer(str(run / "tokenizer"))
  assert data.get_tokenizer(restored.config, workdir).identity() == saved.identity()
  config = gpt(tmp_path / "other_cache")
  adopted = finetune.adopt_pretrain_settings(config, workdir)
  assert any(a.startswith("data.tokenizer=hf:") for a in adopted)
  assert config.data.tokenizer.path == f"{workdir}/tokenizer"  # read through a local copy, recorded as it is
  assert data.get_tokenizer(config).identity() == saved.identity()

  # Fine-tuning from the bucket run into the bucket; `fmjax eval` of it writes there too.
  task = tmp_path / "task.jsonl"
  task.write_text("".join(json.dumps({"text": f"{w} number {i}", "label": w}) + "\n"
                          for i in range(24) for w in ("cat", "dog")))
  cls = config_lib.load_config(os.path.join(REPO, "configs", "finetune_cls.py") + ":task=jsonl,model=gpt", [
      *TINY, f"data.cache_dir={tmp_path / 'cache'}", f"task.files={task}", "task.text_columns=text",
      "train.steps=1", f"init_from={workdir}"])
  result = finetune.run(cls, f"{BUCKET}/runs/cls")
  assert json.load(open(bucket / "runs" / "cls" / "results.json"))["label_names"] == result["label_names"]
  # The run keeps its own tokenizer in its bucket workdir, recorded relative to it, not this
  # process's local copy, so the same command resumes (here: finds the run finished) on any machine.
  recorded = json.load(open(bucket / "runs" / "cls" / "config.json"))["data"]["tokenizer"]["path"]
  assert recorded == "tokenizer" and (bucket / "runs" / "cls" / "tokenizer" / "tokenizer.json").exists()
  files.forget(f"{BUCKET}/runs/cls/tokenizer")
  assert finetune.run(cls, f"{BUCKET}/runs/cls")["resumed_from"] == 1
  evaluate.run(f"{BUCKET}/runs/cls")
  assert "accuracy" in json.load(open(bucket / "runs" / "cls" / "eval.json"))


def test_mirror_copies_only_what_changed(bucket):
  mirror = files.Mirror(f"{BUCKET}/m", names=("log.txt",), every_seconds=3600)
  with open(os.path.join(mirror.root, "log.txt"), "a") as f:
    f.write("one\n")
  mirror.sync()  # within every_seconds: nothing yet
  assert not (bucket / "m" / "log.txt").exists()
  mirror.sync(force=True)
  assert (bucket / "m" / "log.txt").read_text() == "one\n"
  os.makedirs(os.path.join(mirror.root, "tb", "plugins"))
  with open(os.path.join(mirror.root, "tb", "plugins", "trace.pb"), "w") as f:
    f.write("trace")
  (bucket / "m" / "log.txt").write_text("edited in the bucket\n")  # unchanged locally: not copied again
  os.symlink(os.path.join(mirror.root, "gone"), os.path.join(mirror.root, "dangling"))  # e.g. a W&B run link
  mirror.close()
  assert (bucket / "m" / "log.txt").read_text() == "edited in the bucket\n"
  assert (bucket / "m" / "tb" / "plugins" / "trace.pb").read_text() == "trace"
  assert not os.path.exists(mirror.root)

  again = files.Mirror(f"{BUCKET}/m", names=("log.txt", "absent.txt"))  # a resumed run starts from the bucket's
  assert open(os.path.join(again.root, "log.txt")).read() == "edited in the bucket\n"
  assert not os.path.exists(os.path.join(again.root, "absent.txt"))
  again.close()


def test_the_periodic_copy_to_the_bucket_runs_beside_the_step_loop(bucket, monkeypatch):
  """The loop's logging steps start the copy every 30 s; late in a long run it is seconds of whole files,
  which the devices would wait out if the loop's thread made it. A forced copy (eval, save, close) waits
  for the one in flight and copies what changed since; a copy that failed fails the next `sync`."""
  kind = type(files.path(f"{BUCKET}/m/log.txt"))
  real_copy, started, release, threads = kind.copy, threading.Event(), threading.Event(), []

  def slow_copy(self, *args, **kwargs):
    threads.append(threading.current_thread())
    started.set()
    if threading.current_thread() is not threading.main_thread():  # (else it would only hang the test)
      assert release.wait(30)
    return real_copy(self, *args, **kwargs)

  monkeypatch.setattr(kind, "copy", slow_copy)
  mirror = files.Mirror(f"{BUCKET}/m", every_seconds=0)
  log = os.path.join(mirror.root, "log.txt")
  with open(log, "a") as f:
    f.write("one\n")
  mirror.sync()
  assert started.wait(30) and threads[0] is not threading.main_thread()
  with open(log, "a") as f:
    f.write("two\n")
  mirror.sync()  # one copy at a time: this one is left to the next sync
  assert len(threads) == 1
  release.set()
  mirror.sync(force=True)
  assert (bucket / "m" / "log.txt").read_text() == "one\ntwo\n"

  def failing_copy(self, *args, **kwargs):
    raise OSError("bucket unreachable")

  monkeypatch.setattr(kind, "copy", failing_copy)
  with open(log, "a") as f:
    f.write("three\n")
  mirror.sync()
  with pytest.raises(OSError, match="bucket unreachable"):
    mirror.sync(force=True)
  monkeypatch.setattr(kind, "copy", real_copy)
  mirror.close()
  assert (bucket / "m" / "log.txt").read_text() == "one\ntwo\nthree\n"


def test_local_copy_and_json_of_bucket_files(bucket):
  files.write_json(f"{BUCKET}/d/a.json", {"x": 1})
  assert files.read_json(f"{BUCKET}/d/a.json") == {"x": 1} and files.read_json(f"{BUCKET}/d/none.json") is None
  (bucket / "d" / "bad.json").write_text("{")
  with pytest.raises(config_lib.ConfigError, match=r"bad.json is not valid JSON"):
    files.read_json(f"{BUCKET}/d/bad.json")
  local = files.local_copy(f"{BUCKET}/d")
  assert not files.is_remote(local) and json.load(open(os.path.join(local, "a.json"))) == {"x": 1}
  assert files.local_copy(f"{BUCKET}/d") == local  # once per process
  one = files.local_copy(f"{BUCKET}/d/a.json")
  assert os.path.basename(one) == "a.json" and json.load(open(one)) == {"x": 1}


def test_a_bucket_cache_dir_prepares_once_for_every_host(bucket, tmp_path, monkeypatch):
  """data.cache_dir in a bucket: the first host's tokenizer and packed dataset are copied there, and
  a new host (a pod recreated after preemption) copies them down instead of reading the corpus."""
  from fmjax.data import sources
  monkeypatch.setenv("HOME", str(tmp_path / "host1"))
  config = gpt(f"{BUCKET}/cache")
  tok = data.get_tokenizer(config)
  # What a prepare killed on this host left: its scratch space, named by its (now gone) pid.
  import subprocess
  gone = subprocess.Popen(["true"])
  gone.wait()
  killed = os.path.join(sources.local_cache_root(config), "datasets", f".prepare-{gone.pid}", "train", ".tmp-x")
  os.makedirs(killed)
  path = data.prepare(config, tok)
  assert not os.path.exists(os.path.dirname(os.path.dirname(killed)))
  assert path.startswith(str(tmp_path / "host1" / ".cache" / "fmjax" / "buckets"))
  name = os.path.basename(path)
  assert (bucket / "cache" / "datasets" / name / "meta.json").exists()
  assert any((bucket / "cache" / "tokenizers").glob("*/tokenizer.json"))

  monkeypatch.setenv("HOME", str(tmp_path / "host2"))  # a new host: an empty disk, and no corpus reads allowed
  def no_corpus(*args, **kwargs):
    raise AssertionError("the corpus was read again")
  monkeypatch.setattr(sources, "documents", no_corpus)
  again = data.prepare(config, data.get_tokenizer(config))
  assert again.startswith(str(tmp_path / "host2")) and os.path.basename(again) == name
  for split in ("train", "eval"):
    assert open(os.path.join(again, split, "part-00000", "tokens.bin"), "rb").read() == \
        open(os.path.join(path, split, "part-00000", "tokens.bin"), "rb").read()
  assert data.make_loader(config, "train", batch_size=2, tok=tok).host_batch(0)["inputs"].shape == (2, 32)


@pytest.mark.parametrize("family", ["gpt", "bert"])
def test_a_host_whose_disk_cannot_hold_a_bucket_cache_reads_its_arrays_in_place(bucket, tmp_path, monkeypatch,
                                                                                 family):
  """A corpus larger than a host's disk (C4 on a TPU VM) stays in the bucket: the host copies the
  small files and reads each batch's rows by ranges, and gets the batches a full copy gives."""
  import shutil
  import numpy as np
  from fmjax.data import sources
  spec = os.path.join(REPO, "configs", f"{family}.py") + ":tiny"
  config = config_lib.load_config(spec, TINY + [f"data.cache_dir={BUCKET}/cache", "data.shard_docs=100"])
  monkeypatch.setenv("HOME", str(tmp_path / "host1"))
  tok = data.get_tokenizer(config)
  loaders = lambda: [data.make_loader(config, split, batch_size=3, tok=tok) for split in ("train", "eval")]
  copied = loaders()
  assert not copied[0].data.in_bucket and len(copied[0].data.parts) >= 3  # a batch reads rows of several parts

  monkeypatch.setenv("HOME", str(tmp_path / "host2"))
  real = shutil.disk_usage
  monkeypatch.setattr(sources.shutil, "disk_usage", lambda p: real(p)._replace(free=1000))  # a small disk
  in_place = loaders()
  assert in_place[0].data.in_bucket and in_place[1].data.in_bucket
  assert in_place[0].path.startswith(str(tmp_path / "host2"))
  assert not [f for _, _, fs in os.walk(in_place[0].path) for f in fs if f.endswith(".bin")]
  for ours, theirs in zip(in_place, copied):
    for step in (0, 1, theirs.num_batches - 1):  # eval's last batch holds padding rows
      a, b = ours.host_batch(step), theirs.host_batch(step)
      assert a.keys() == b.keys()
      for key in a:
        np.testing.assert_array_equal(a[key], b[key], err_msg=f"{key} at step {step}")

  monkeypatch.setenv("HOME", str(tmp_path / "host3"))
  with config.unlocked():
    config.data.bucket_reads = "copy"  # the user's choice wins over the disk's size
  assert not loaders()[0].data.in_bucket


def test_sweeps_and_exports_with_bucket_paths(bucket, tmp_path, capsys):
  from fmjax import interop, report, sweep
  spec = os.path.join(REPO, "configs", "gpt.py") + ":tiny"
  entries = sweep.product({"optim.lr": [1e-3, 1e-2]})
  # Launched runs: the commands, and the list of runs in the bucket, from which `fmjax report` builds the table.
  sweep.run_sweep(spec, entries, f"{BUCKET}/sweep", print_commands=True)
  assert (bucket / "sweep" / sweep.RUNS_FILE).exists()
  written = report.report(f"{BUCKET}/sweep", str(tmp_path / "rep"))
  table = open(next(p for p in written if p.endswith("sweep.md"))).read()
  assert "optim.lr=0.001" in table and "not started" in table
  with pytest.raises(config_lib.ConfigError, match="the local runner keeps a sweep's logs"):
    sweep.run_sweep(spec, entries, f"{BUCKET}/sweep2")
  with pytest.raises(config_lib.ConfigError, match="is in a bucket; write the report to a local directory"):
    report.report(f"{BUCKET}/sweep", f"{BUCKET}/rep")

  # A run trained into the bucket exports into the bucket, and import-hf writes a bucket workdir.
  workdir = f"{BUCKET}/runs/gpt"
  train.run(gpt(tmp_path / "cache", "train.steps=1", "train.eval_batches=0"), workdir)
  interop.export(workdir, f"{BUCKET}/hf")
  assert (bucket / "hf" / "model.safetensors").exists() and (bucket / "hf" / "tokenizer.json").exists()
  with pytest.raises(config_lib.ConfigError, match="already exists and is not empty"):
    interop.export(workdir, f"{BUCKET}/hf")
  interop.import_hf(str(bucket / "hf"), f"{BUCKET}/imported")
  assert (bucket / "imported" / "config.json").exists() and (bucket / "imported" / "checkpoints" / "0").is_dir()
  assert generate.restore_run(f"{BUCKET}/imported").step == 0


def test_the_logs_reach_the_bucket_at_each_eval_and_save_not_only_at_the_end(bucket):
  from fmjax import metrics
  writer = metrics.MetricsWriter(f"{BUCKET}/w", total_steps=10, progress_bar=False)
  writer.write(1, {"loss": 2.0}, prefix="train/")  # within 30 s of the start: not copied yet
  assert not (bucket / "w" / "metrics.jsonl").exists()
  writer.write(2, {"loss": 1.5}, prefix="eval/")
  writer.sync()  # what the loop does after an eval or a save
  rows = [json.loads(l) for l in (bucket / "w" / "metrics.jsonl").read_text().splitlines()]
  assert rows[0] == {"run_started_at_step": 0} and [r["step"] for r in rows[1:]] == [1, 2]
  writer.close()
