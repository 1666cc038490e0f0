"""Two real JAX processes on 127.0.0.1 feed a sharded jitted step from their own rows; the result
equals the single-process value."""

import hashlib
import json
import os
import re
import socket
import subprocess
import sys
import textwrap

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from fmjax import config_lib
import fmjax.data as data

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
STEPS = (0, 3)

WORKER = textwrap.dedent("""
    import json, sys
    import jax
    jax.config.update("jax_num_cpu_devices", 4)
    jax.config.update("jax_platforms", "cpu")
    port, pid, cache = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    jax.distributed.initialize(coordinator_address=f"127.0.0.1:{port}", num_processes=2, process_id=pid,
                               initialization_timeout=60)
    import numpy as np
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
    from fmjax import config_lib
    import fmjax.data as data
    sys.path.insert(0, "tests")
    from test_data_multiprocess import STEPS, step_fn, tiny_config
    config = tiny_config(cache)
    mesh = Mesh(np.array(jax.devices()), ("data",))
    loader = data.make_loader(config, sharding=NamedSharding(mesh, P("data", None)))
    rows = loader.rows_b.tolist()
    out = {}
    for step, batch in loader.iterate(STEPS[0]):
      if step in STEPS:
        out[step] = np.asarray(jax.jit(step_fn)(batch)).tolist()
      if step >= STEPS[-1]:
        break
    print("RESULT " + json.dumps({"rows": rows, "sums": out}), flush=True)
""")

BUCKET_WORKER = textwrap.dedent("""
    import hashlib, json, os, sys
    port, pid, bucket, home = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
    os.environ["HOME"] = home  # each host its own disk: only the bucket is shared
    import jax
    jax.config.update("jax_num_cpu_devices", 2)
    jax.config.update("jax_platforms", "cpu")
    jax.distributed.initialize(coordinator_address=f"127.0.0.1:{port}", num_processes=2, process_id=pid,
                               initialization_timeout=60)
    import numpy as np
    from etils import epath
    from fmjax import files
    from fmjax.data import packing
    import fmjax.data as data
    real = files.path
    files.path = lambda p: (epath.Path(bucket + str(p)[len("gs://fmjax-test"):])
                            if str(p).startswith("gs://fmjax-test/") else real(p))
    files._RANGE_FS["gs"] = None
    packing._POLL_SECONDS = 0.2
    made, write = [], packing._write_part
    packing._write_part = lambda *a: made.append(list(a[2:4])) or write(*a)
    if sys.argv[5:] == ["fail"] and pid == 1:
      def broken(*a):
        raise OSError("No space left on device")
      packing._write_part = broken
    sys.path.insert(0, "tests")
    from test_data_multiprocess import prepare_config, rows_digest
    config = prepare_config("gs://fmjax-test/cache")
    digests = {split: rows_digest(data.make_loader(config, split, batch_size=2).data) for split in ("train", "eval")}
    print("RESULT " + json.dumps({"made": made, "digests": digests}), flush=True)
""")


def prepare_config(cache_dir):
  config = tiny_config(cache_dir)
  config.data.shard_docs = 50
  config.data.prepare_workers = 1
  config.data.seq_len = 32
  return config


def rows_digest(split) -> str:
  rows = split.rows(np.arange(split.num_rows))
  return hashlib.sha256(b"".join(np.ascontiguousarray(rows[k]).tobytes() for k in sorted(rows))).hexdigest()


def tiny_config(cache_dir):
  config = config_lib.load_module(os.path.join(ROOT, "configs", "gpt.py")).get_config("tiny")
  config.data.cache_dir = str(cache_dir)
  config.train.batch_size = 16
  return config


def step_fn(batch):
  """Sums that change if any row is missing, duplicated or out of place."""
  x = batch["inputs"].astype(np.float32)
  row_weight = 1.0 + np.arange(x.shape[0], dtype=np.float32)[:, None]
  return jax.numpy.stack([x.sum(), (x * row_weight).sum(), (batch["loss_weights"] * row_weight).sum(),
                          (batch["positions"] * row_weight).sum()])


def free_port():
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def run_two(script_text: str, directory, args, timeout: float = 120) -> list[tuple[int, str, str]]:
  """Runs `script_text` as 2 JAX processes on 127.0.0.1 (argv: port, process id, *args(i));
  returns each one's (exit code, stdout, stderr)."""
  script = directory / "worker.py"
  script.write_text(script_text)
  env = {**os.environ, "PYTHONPATH": ROOT, "JAX_PLATFORMS": "cpu"}
  env.pop("XLA_FLAGS", None)
  port = free_port()
  procs = [subprocess.Popen([sys.executable, str(script), str(port), str(i), *map(str, args(i))], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(2)]
  try:
    runs = []
    for p in procs:
      out, err = p.communicate(timeout=timeout)
      runs.append((p.returncode, out, err))
    return runs
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()


def result(out: str, err: str):
  """The JSON a worker printed after RESULT."""
  lines = [l for l in out.splitlines() if l.startswith("RESULT ")]
  assert lines, err[-3000:]
  return json.loads(lines[-1].removeprefix("RESULT "))


def test_two_processes_feed_the_same_global_batch(tmp_path_factory):
  cache = tmp_path_factory.getbasetemp() / "fmjax_data_cache"
  config = tiny_config(cache)
  data.prepare(config)  # once here, so the two workers only read the cache
  mesh = Mesh(np.array(jax.devices()), ("data",))
  loader = data.make_loader(config, sharding=NamedSharding(mesh, P("data", None)))
  expected = {s: np.asarray(jax.jit(step_fn)(loader.global_batch(s))) for s in STEPS}

  runs = run_two(WORKER, tmp_path_factory.mktemp("mp"), lambda i: [cache], timeout=90)
  results = [result(out, err) for _, out, err in runs]
  assert results[0]["rows"] == list(range(8)) and results[1]["rows"] == list(range(8, 16))
  for r in results:
    for s in STEPS:
      np.testing.assert_array_equal(np.array(r["sums"][str(s)], np.float32), expected[s])


def test_two_hosts_prepare_a_bucket_cache_together(tmp_path):
  """data.cache_dir in a bucket: each of two processes (each its own disk) makes its share of the
  parts, straight into the bucket, and both read the rows one process makes alone."""
  config = prepare_config(tmp_path / "alone")
  expected = {split: rows_digest(data.make_loader(config, split, batch_size=2).data) for split in ("train", "eval")}
  (tmp_path / "bucket").mkdir()
  runs = run_two(BUCKET_WORKER, tmp_path, lambda i: [tmp_path / "bucket", tmp_path / f"host{i}"])
  results = [result(out, err) for _, out, err in runs]
  for r in results:
    assert r["digests"] == expected
  made = [sorted(map(tuple, r["made"])) for r in results]
  assert made[0] and made[1] and not set(made[0]) & set(made[1])  # each its own share
  (entry,) = (tmp_path / "bucket" / "cache" / "datasets").iterdir()
  parts = json.load(open(entry / "train" / "meta.json"))["parts"]
  assert len(parts) >= 3 and sorted(made[0] + made[1]) == sorted(
      [("train", k) for k in range(len(parts))] + [("eval", 0)])
  for i in range(2):  # the scratch space each host made its parts in is gone
    assert not list((tmp_path / f"host{i}").glob("**/.tmp-*")) + list((tmp_path / f"host{i}").glob("**/.prepare-*"))


def test_a_host_that_fails_to_prepare_stops_the_others(tmp_path):
  """One host's prepare fails (its disk is full): it says so in the bucket, and the host waiting
  for its parts stops with that line instead of waiting for ever."""
  (tmp_path / "bucket").mkdir()
  runs = run_two(BUCKET_WORKER, tmp_path, lambda i: [tmp_path / "bucket", tmp_path / f"host{i}", "fail"])
  assert all(code != 0 for code, _, _ in runs)
  errors = [err.strip().splitlines()[-1] for _, _, err in runs]
  assert errors[1] == "OSError: No space left on device"
  assert re.fullmatch(r".*process 1 stopped preparing gs://fmjax-test/cache/datasets/\S+: OSError: No space left on "
                      r"device", errors[0]), errors[0]


TOKENIZER_WORKER = textwrap.dedent("""
    import json, sys
    import jax
    jax.config.update("jax_num_cpu_devices", 2)
    jax.config.update("jax_platforms", "cpu")
    port, pid = sys.argv[1], int(sys.argv[2])
    jax.distributed.initialize(coordinator_address=f"127.0.0.1:{port}", num_processes=2, process_id=pid,
                               initialization_timeout=60)
    from fmjax import train
    from fmjax.data import tokenizers
    texts = ["the cat sat on the mat", "a dog ran in the park", "the dog and the cat"] * 20
    # Each host trained another one: the texts differ too, as the vocabulary (47 pieces) stays below
    # either size and tie orders that happen to agree would train the same one.
    mine = tokenizers.train(texts + ["zebra quilt"] * pid, "wordpiece", 60 + 10 * pid, "mlm")
    print("RESULT " + json.dumps([mine.identity(), train._process_0s(mine).identity()]), flush=True)
""")


def test_every_host_takes_process_0s_tokenizer(tmp_path):
  """Hosts that trained different tokenizers (WordPiece ties fall in another order in each process)
  all use process 0's, so their token ids, and the data prepared with them, agree."""
  results = [result(out, err) for _, out, err in run_two(TOKENIZER_WORKER, tmp_path, lambda i: [], timeout=90)]
  (own0, used0), (own1, used1) = results
  assert own0 != own1 and used0 == used1 == own0
