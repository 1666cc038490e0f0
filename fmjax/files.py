"""A run's files on a local disk or in a bucket (`gs://`, `s3://`): one place for workdir IO.

On a pod the workdir is a bucket path that every host names, and a host's own disk goes with its
VM when the pod is preempted. So everything a run keeps (config.json, metrics.jsonl, TensorBoard
events, its tokenizer, results.json, checkpoints) goes through here to the workdir itself, never
to a local directory that happens to be called `gs:`. `etils.epath` does the object-store side.

Object stores cannot append to a file, so a run's logs are written to a local staging directory
and copied to the bucket now and then (`Mirror`); files read by libraries that want a local path
(a tokenizer) are copied down once (`local_copy`).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import time

from etils import epath


def is_remote(path) -> bool:
  return "://" in str(path)


def path(p) -> epath.Path:
  """An epath for `p`: object-store URIs as they are, local paths made absolute."""
  p = str(p)
  return epath.Path(p if is_remote(p) else os.path.abspath(os.path.expanduser(p)))


def exists(p) -> bool:
  return path(p).exists()


def isdir(p) -> bool:
  return path(p).is_dir()


def makedirs(p) -> None:
  path(p).mkdir(parents=True, exist_ok=True)


def read_text(p) -> str:
  return path(p).read_text()


def read_json(p):
  """The JSON value in file `p`; None when there is no such file. Invalid JSON is one ConfigError line."""
  from fmjax.config_lib import ConfigError
  if not exists(p):
    return None
  try:
    return json.loads(read_text(p))
  except json.JSONDecodeError as e:
    raise ConfigError(f"{p} is not valid JSON ({e.msg}, line {e.lineno}); copy it again or remove it") from None


def write_json(p, value, **dump_kwargs) -> None:
  write_text(p, json.dumps(value, **dump_kwargs))


def write_text(p, text: str) -> None:
  """Writes a whole file so that a reader sees the old one or the new one, never a part.

  Locally through a temporary file and a rename; an object store's writes are whole already.
  """
  if is_remote(p):
    target = path(p)
    target.parent.mkdir(parents=True, exist_ok=True)  # a no-op in an object store, where folders are names
    target.write_text(text)
    return
  tmp = f"{p}.tmp"
  with open(tmp, "w") as f:
    f.write(text)
  os.replace(tmp, p)


_WRITTEN_LAST = ("meta.json", "tokenizer.json")


def copy_tree(src, dst) -> None:
  """Copies directory `src` with everything under it into `dst`, either side local or remote.

  In each directory the files that mark it whole (`meta.json`, `tokenizer.json`) go last, after
  its subdirectories, so a reader that finds them finds everything beside them.
  """
  src, dst = path(src), path(dst)
  dst.mkdir(parents=True, exist_ok=True)
  for item in sorted(src.iterdir(), key=lambda f: f.name in _WRITTEN_LAST):
    if item.is_dir():
      copy_tree(item, dst / item.name)
    else:
      item.copy(dst / item.name, overwrite=True)


def local_copy(p) -> str:
  """A local path with the contents of file or directory `p`: `p` itself (absolute) when it is
  local, else a copy under the temporary directory, made once per process."""
  if not is_remote(p):
    return os.path.abspath(os.path.expanduser(str(p)))
  base = os.path.join(tempfile.gettempdir(), f"fmjax-{os.getpid()}")
  local = os.path.join(base, hashlib.sha256(str(p).encode()).hexdigest()[:16], os.path.basename(str(p).rstrip("/")))
  if not os.path.exists(local):
    tmp = tempfile.mkdtemp(dir=_made(base))
    if isdir(p):
      copy_tree(p, tmp)
    else:
      path(p).copy(path(os.path.join(tmp, "file")))
      tmp = os.path.join(tmp, "file")
    os.renames(tmp, local)
  return local


def _made(directory: str) -> str:
  os.makedirs(directory, exist_ok=True)
  return directory


class Mirror:
  """Files a run appends to (metrics.jsonl, TensorBoard events), kept whole in the workdir.

  For a local workdir `root` is the workdir and `sync` does nothing. For a remote one, `root` is
  a local staging directory: it starts with the workdir's files of those names (a resumed run
  appends to its metrics.jsonl), and `sync` copies every file that changed since the last copy
  to the workdir, at most every `every_seconds` unless `force`d.
  """

  def __init__(self, workdir: str, names: tuple[str, ...] = (), every_seconds: float = 30.0):
    self.workdir, self.remote = str(workdir), is_remote(workdir)
    self.every_seconds = every_seconds
    self._synced: dict[str, tuple[int, float]] = {}
    self._last = time.monotonic()
    if not self.remote:
      self.root = self.workdir
      os.makedirs(self.root, exist_ok=True)
      return
    self.root = tempfile.mkdtemp(prefix="fmjax-run-")
    for name in names:
      remote = path(self.workdir) / name
      if remote.exists():
        remote.copy(path(os.path.join(self.root, name)), overwrite=True)
        self._synced[name] = self._stamp(name)

  def _stamp(self, rel: str) -> tuple[int, float]:
    st = os.stat(os.path.join(self.root, rel))
    return st.st_size, st.st_mtime

  def sync(self, force: bool = False) -> None:
    if not self.remote or (not force and time.monotonic() - self._last < self.every_seconds):
      return
    self._last = time.monotonic()
    for directory, _, names in os.walk(self.root):
      for name in names:
        rel = os.path.relpath(os.path.join(directory, name), self.root)
        stamp = self._stamp(rel)
        if self._synced.get(rel) != stamp:
          target = path(self.workdir) / rel
          target.parent.mkdir(parents=True, exist_ok=True)
          path(os.path.join(self.root, rel)).copy(target, overwrite=True)
          self._synced[rel] = stamp

  def close(self) -> None:
    """Copies what changed to the workdir and removes the staging directory."""
    if self.remote:
      self.sync(force=True)
      shutil.rmtree(self.root, ignore_errors=True)
