"""files.py: a directory replaced in one step, and files that are pipes read once."""
import ctypes
import errno
import os
import sys
import threading
from pathlib import Path

import pytest

from minipeft import files
from minipeft.corpus import read_corpus
from minipeft.files import existing_file, read_json, staged_dir
from minipeft.tokenizer import MAX_LINE_BYTES, train_tokenizer
from minipeft.train_config import TrainConfig

linux_exchange = pytest.mark.skipif(files._RENAMEAT2 is None, reason="renameat2 is Linux's (glibc 2.28 and later)")


def contents(path: Path) -> dict[str, str]:
    return {p.name: p.read_text() for p in path.iterdir()}


def old_model(tmp_path: Path) -> Path:
    path = tmp_path / "m"
    path.mkdir()
    for name in ("config.json", "model-00001-of-00002.safetensors", "model.safetensors.index.json", "README.md"):
        (path / name).write_text(f"old {name}")
    return path


def replace_with_new(path: Path) -> None:
    with staged_dir(path, stale="model*.safetensors*") as tmp:
        (tmp / "config.json").write_text("new config")
        (tmp / "model.safetensors").write_text("new weights")


NEW = {"config.json": "new config", "model.safetensors": "new weights", "README.md": "old README.md"}


@linux_exchange
def test_a_directory_is_swapped_with_no_moment_without_it(tmp_path, monkeypatch):
    """Two renames swapped the directories: a crash between them left `path` missing, the old contents
    in a hidden .m.tmp* beside it. renameat2's exchange is one step, so no rename runs at all: made
    to fail, the swap completes; `path` holds the new contents, whole, and nothing is left beside it."""
    path = old_model(tmp_path)

    class Killed(BaseException):  # as a kill between two renames (not KeyboardInterrupt: pytest would stop)
        pass

    def crash(*args, **kwargs):
        raise Killed

    monkeypatch.setattr(files.os, "replace", crash)
    monkeypatch.setattr(files.os, "rename", crash)
    replace_with_new(path)
    assert contents(path) == NEW
    assert [p.name for p in tmp_path.iterdir()] == ["m"]


@pytest.mark.parametrize("fallback", ["no renameat2", "EINVAL", "ENOSYS"])
def test_where_the_exchange_is_not_offered_two_renames_swap(tmp_path, monkeypatch, fallback):
    """Another OS or an old C library (no renameat2), or a filesystem that refuses the flag: the two
    renames, as before, and a crash at either leaves the old contents whole in `path`."""
    def refuse(*args):
        ctypes.set_errno(getattr(errno, fallback))
        return -1

    monkeypatch.setattr(files, "_RENAMEAT2", None if fallback == "no renameat2" else refuse)
    path = old_model(tmp_path)
    before = contents(path)
    real = files.os.replace
    for crash_at in (1, 2):
        renames = []

        def crash(src, dst):
            renames.append(dst)
            if len(renames) == crash_at:
                raise KeyboardInterrupt
            real(src, dst)

        monkeypatch.setattr(files.os, "replace", crash)
        with pytest.raises(KeyboardInterrupt):
            replace_with_new(path)
        assert contents(path) == before and [p.name for p in tmp_path.iterdir()] == ["m"]
    monkeypatch.setattr(files.os, "replace", real)
    replace_with_new(path)
    assert contents(path) == NEW and [p.name for p in tmp_path.iterdir()] == ["m"]


def test_another_exchange_error_is_raised_and_leaves_the_directory(tmp_path, monkeypatch):
    def refuse(*args):
        ctypes.set_errno(errno.EACCES)
        return -1

    monkeypatch.setattr(files, "_RENAMEAT2", refuse)
    path = old_model(tmp_path)
    before = contents(path)
    with pytest.raises(PermissionError, match="Permission denied"):
        replace_with_new(path)
    assert contents(path) == before and [p.name for p in tmp_path.iterdir()] == ["m"]


@linux_exchange
def test_a_new_directory_and_a_symlinked_one(tmp_path):
    replace_with_new(tmp_path / "fresh")
    assert contents(tmp_path / "fresh") == {k: v for k, v in NEW.items() if k != "README.md"}
    path = old_model(tmp_path)
    (tmp_path / "link").symlink_to(path)
    replace_with_new(tmp_path / "link")  # swaps the directory it names; the link stays a link
    assert (tmp_path / "link").is_symlink() and contents(path) == NEW
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fresh", "link", "m"]


# --- files that are pipes ------------------------------------------------------------------
def through_a_pipe(tmp_path: Path, text: str, read, name: str = "pipe"):
    """read(path) of a FIFO a thread writes `text` into once, as bash's `<(cat job.yaml)`. A second
    open of it would wait for a writer forever: a watchdog gives it one with nothing to say."""
    fifo = tmp_path / name
    os.mkfifo(fifo)

    def write():
        with open(fifo, "w", encoding="utf-8") as f:
            f.write(text)

    def unblock():  # a reader waiting in a second open() gets an empty file, and the test fails
        try:
            os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
            read_again.append(True)
        except OSError:  # no reader (ENXIO): still at work on the first read
            pass

    read_again = []
    writer, watchdog = threading.Thread(target=write, daemon=True), threading.Timer(20, unblock)
    writer.start()
    watchdog.start()
    try:
        return read(fifo)
    finally:
        watchdog.cancel()
        writer.join(5)
        if writer.is_alive():  # never opened for reading: the writer waits for a reader, given one here
            os.close(os.open(fifo, os.O_RDONLY | os.O_NONBLOCK))
            pytest.fail("the pipe was never opened for reading")
        if read_again:  # raised over whatever read() raised: an error too must come from one read
            pytest.fail("the pipe was opened a second time")


def test_a_pipe_is_an_existing_file_but_missing_paths_and_directories_are_not(tmp_path):
    """`minipeft train --config <(cat job.yaml)` said the pipe was missing: only a regular file passed."""
    os.mkfifo(tmp_path / "pipe")
    assert existing_file(tmp_path / "pipe", "a job file") == tmp_path / "pipe"
    assert existing_file("/dev/null", "a job file") == Path("/dev/null")  # a character device
    with pytest.raises(FileNotFoundError, match=f"{tmp_path / 'nope'}: missing; a job file"):
        existing_file(tmp_path / "nope", "a job file")
    (tmp_path / "dangling").symlink_to(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match="dangling: missing; a job file"):
        existing_file(tmp_path / "dangling", "a job file")
    with pytest.raises(ValueError, match=f"{tmp_path}: is a directory; a job file"):
        existing_file(tmp_path, "a job file")


@pytest.mark.parametrize("text", ["learning_rate: 0.01\nmethod: lora\n", '{"learning_rate": 0.01, "method": "lora"}'])
def test_a_job_file_through_a_pipe_is_read_once_as_yaml_or_json(tmp_path, text):
    """A pipe's name (/dev/fd/63) has no suffix to say YAML or JSON: YAML unless it opens as an object."""
    cfg = through_a_pipe(tmp_path, text, lambda p: TrainConfig.load(p, refuse_ignored=True))
    assert cfg.learning_rate == 0.01 and cfg.method == "lora"


def test_a_bad_job_file_through_a_pipe_names_it(tmp_path):
    with pytest.raises(ValueError, match=r"pipe: invalid JSON at line 1 column 2"):
        through_a_pipe(tmp_path, "{learning_rate: 1}", TrainConfig.load)
    with pytest.raises(ValueError, match=r"pipe2: invalid YAML at line 2 column 1: key 'seed' given twice"):
        through_a_pipe(tmp_path, "seed: 1\nseed: 2\n", TrainConfig.load, name="pipe2")


def test_json_and_a_corpus_through_a_pipe(tmp_path):
    assert through_a_pipe(tmp_path, '{"a": 1}', lambda p: read_json(p, "a test")) == {"a": 1}
    assert through_a_pipe(tmp_path, "one\f\ntwo\n", read_corpus, name="corpus") == ["one", "two"]


def test_a_tokenizer_that_cannot_train_on_a_pipe_says_why_without_reading_it_again(tmp_path):
    """Its failure read the files a second time to find why SentencePiece had no sentence; a pipe
    waited there forever for a writer."""
    with pytest.raises(ValueError, match=f"no non-empty line of at most {MAX_LINE_BYTES} bytes"):
        through_a_pipe(tmp_path, "x" * (MAX_LINE_BYTES + 1) + "\n", lambda p: train_tokenizer([p], tmp_path / "t", 300))


@pytest.mark.skipif(sys.platform != "linux", reason="bash's process substitution through /dev/fd")
def test_train_config_from_process_substitution(tmp_path):
    """The user's command itself: `--config <(cat job.yaml)`, checked up to the job's first key error."""
    import subprocess

    (tmp_path / "job.yaml").write_text("learning_rate: 0.01\nno_such_key: 1\n")
    proc = subprocess.run(["bash", "-c", f"'{sys.executable}' -m minipeft train --config <(cat '{tmp_path}/job.yaml')"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "missing" not in proc.stderr and "no_such_key" in proc.stderr, proc.stderr
