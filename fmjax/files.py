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

import atexit
import json
import os
import shutil
import tempfile
import threading
import time
import uuid

from etils import epath


def is_remote(path) -> bool:
  """Whether `path` is a bucket URL (gs://...) rather than a local path."""
  return "://" in str(path)


def path(p) -> epath.Path:
  """An epath for `p`: object-store URIs as they are, local paths made absolute."""
  return epath.Path(absolute(p))


def absolute(p) -> str:
  """`p` as a string that names it from anywhere: an object-store URI as it is, a local path absolute."""
  p = str(p)
  return p if is_remote(p) else os.path.abspath(os.path.expanduser(p))


def exists(p) -> bool:
  """Whether a local or bucket path exists."""
  return path(p).exists()


def isdir(p) -> bool:
  """Whether a local or bucket path is a directory."""
  return path(p).is_dir()


def makedirs(p) -> None:
  """Creates a directory and its parents (local or bucket); no error if it exists."""
  path(p).mkdir(parents=True, exist_ok=True)


def read_text(p) -> str:
  """The text of a local or bucket file."""
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
  except UnicodeDecodeError as e:  # UTF-16, as some Windows editors save
    raise ConfigError(f"{p} is not UTF-8 text (byte {e.start}); JSON files must be UTF-8: save it as UTF-8 or copy "
                      "it again") from None


def write_json(p, value, **dump_kwargs) -> None:
  """Writes `value` as JSON to a local or bucket path."""
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
  tmp = f"{p}.{uuid.uuid4().hex[:8]}.tmp"  # its own name: two processes may write the same file at once
  with open(tmp, "w") as f:
    f.write(text)
  os.replace(tmp, p)


def write_bytes(p, data: bytes) -> None:
  """`write_text` for bytes: the reader sees the old file or the new one, never a part."""
  if is_remote(p):
    target = path(p)
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_bytes(data)
    return
  tmp = f"{p}.{uuid.uuid4().hex[:8]}.tmp"
  with open(tmp, "wb") as f:
    f.write(data)
  os.replace(tmp, p)


_WRITTEN_LAST = ("meta.json", "tokenizer.json", "SHA256SUMS")


def _fsspec_filesystem(scheme: str):
  """fsspec's file system for an object-store scheme, or None where it is not installed (gcsfs for gs://)."""
  try:
    import fsspec
    return fsspec.filesystem(scheme)
  except (ImportError, ValueError):
    return None


_RANGE_FS: dict[str, object] = {}


def range_filesystem(p):
  """fsspec's file system for bucket path `p`, whose `cat_file(path, start, end)` is one exact ranged
  read, where it is installed (`pip install gcsfs`); else None, and the caller reads through the
  file's own reader (TensorFlow's, for gs://, fetches at least 512 KiB a read)."""
  scheme = str(p).split("://", 1)[0]
  if scheme not in _RANGE_FS:
    _RANGE_FS[scheme] = _fsspec_filesystem(scheme)
    if _RANGE_FS[scheme] is None:
      import logging
      logging.getLogger("fmjax").info("reading %s:// by ranges through TensorFlow's files, which fetch 512 KiB a "
                                      "read; `pip install gcsfs` (fmjax[gcs]) for exact ranged reads", scheme)
  return _RANGE_FS[scheme]


def try_lock(p: str, holder: str, wait: bool = False):
  """An exclusive `flock` on local file `p`: returns the open file that holds it, with `holder`
  written in it, or, when another process holds it, the text that one wrote (a str; with `wait`,
  waits for it instead). Raises OSError where the file system has no locks. The lock goes with
  the process, however it ends."""
  import fcntl
  f = open(p, "a+")
  try:
    fcntl.flock(f, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
  except BlockingIOError:
    f.seek(0)
    text = f.read().strip()
    f.close()
    return text
  except OSError:
    f.close()
    raise
  f.seek(0)
  f.truncate()
  f.write(holder)
  f.flush()
  return f


def make_temp_dir(parent: str) -> str:
  """A new hidden directory in `parent`, to fill and then rename into place, with the permissions
  a plain mkdir gives: tempfile's 0700 would make a shared cache entry unreadable to the others."""
  while True:  # os.mkdir applies the process umask, as a plain mkdir does
    tmp = os.path.join(parent, f".tmp-{uuid.uuid4().hex[:12]}")
    try:
      os.mkdir(tmp)
      return tmp
    except FileExistsError:
      continue


def copy_tree(src, dst, leave_out=frozenset()) -> None:
  """Copies directory `src` with everything under it into `dst`, either side local or remote,
  except files named in `leave_out` (at any depth).

  In each directory the files that mark it whole (`meta.json`, `tokenizer.json`, a release's
  `SHA256SUMS`) go last, after its subdirectories, so a reader that finds them finds everything
  beside them.
  """
  src, dst = path(src), path(dst)
  dst.mkdir(parents=True, exist_ok=True)
  for item in sorted(src.iterdir(), key=lambda f: f.name in _WRITTEN_LAST):
    if item.is_dir():
      copy_tree(item, dst / item.name, leave_out)
    elif item.name not in leave_out:
      item.copy(dst / item.name, overwrite=True)


_COPIES: dict[str, str] = {}  # remote path -> its local copy, for this process
_COPIES_DIR: list[str] = []    # the temporary directory that holds them, removed at exit


def local_copy(p) -> str:
  """A local path with the contents of file or directory `p`: `p` itself (absolute) when it is
  local, else a copy under a temporary directory, made once per process (`forget` drops it)."""
  if not is_remote(p):
    return absolute(p)
  key = str(p).rstrip("/")
  if key in _COPIES and os.path.exists(_COPIES[key]):
    return _COPIES[key]
  if not _COPIES_DIR:
    _COPIES_DIR.append(tempfile.mkdtemp(prefix="fmjax-copies-"))
    atexit.register(shutil.rmtree, _COPIES_DIR[0], True)
  local = os.path.join(tempfile.mkdtemp(dir=_COPIES_DIR[0]), os.path.basename(key))
  if isdir(key):
    copy_tree(key, local)
  else:
    path(key).copy(path(local))
  _COPIES[key] = local
  return local


def forget(p) -> None:
  """Drops the local copy of `p` (its bucket files changed): the next `local_copy` reads them again."""
  local = _COPIES.pop(str(p).rstrip("/"), None)
  if local:
    shutil.rmtree(os.path.dirname(local), ignore_errors=True)


class Mirror:
  """Files a run appends to (metrics.jsonl, TensorBoard events), kept whole in the workdir.

  For a local workdir `root` is the workdir and `sync` does nothing. For a remote one, `root` is
  a local staging directory: it starts with the workdir's files of those names (a resumed run
  appends to its metrics.jsonl), and `sync` copies every file that changed since the last copy
  to the workdir, at most every `every_seconds` unless `force`d. That periodic copy runs in a
  background thread: the step loop calls `sync` at its logging steps, and copying the logs whole
  to a bucket takes seconds late in a long run, which the devices (all of a pod's) would wait out.
  """

  def __init__(self, workdir: str, names: tuple[str, ...] = (), every_seconds: float = 30.0):
    self.workdir, self.remote = str(workdir), is_remote(workdir)
    self.every_seconds = every_seconds
    self._synced: dict[str, tuple[int, float]] = {}
    self._last = time.monotonic()
    self._copying: threading.Thread | None = None
    self._error: BaseException | None = None  # of the last background copy, raised by the next `sync`
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
    """Starts copying what changed in the background, when `every_seconds` have passed and no copy
    is running; with `force`, copies it now, after the copy in flight. Raises what an earlier
    background copy raised."""
    if not self.remote:
      return
    if not force and (time.monotonic() - self._last < self.every_seconds
                      or (self._copying is not None and self._copying.is_alive())):
      return
    self._wait()
    self._last = time.monotonic()
    if force:
      self._copy()
    else:
      self._copying = threading.Thread(target=self._copy_in_background, name="fmjax-mirror", daemon=True)
      self._copying.start()

  def _wait(self) -> None:
    if self._copying is not None:
      self._copying.join()
      self._copying = None
    error, self._error = self._error, None
    if error is not None:
      raise error

  def _copy_in_background(self) -> None:
    try:
      self._copy()
    except BaseException as e:  # pylint: disable=broad-except  # the loop's thread raises it
      self._error = e

  def _copy(self) -> None:
    for directory, _, names in os.walk(self.root):
      for name in names:
        rel = os.path.relpath(os.path.join(directory, name), self.root)
        try:
          stamp = self._stamp(rel)
          if self._synced.get(rel) != stamp:
            target = path(self.workdir) / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            path(os.path.join(self.root, rel)).copy(target, overwrite=True)
            self._synced[rel] = stamp
        except FileNotFoundError:  # gone since the walk (a temporary file, a dangling link): nothing to keep
          continue

  def close(self) -> None:
    """Copies what changed to the workdir and removes the staging directory."""
    if self.remote:
      self.sync(force=True)
      shutil.rmtree(self.root, ignore_errors=True)
