"""andy_dist.train.checkpoint without an engine: the swap a crash interrupted is finished, a failed write is told
by its errno (not by the words of a message), and a universal conversion found on disk is vetted before use."""

from __future__ import annotations

import errno
import pickle

import pytest

from andy_dist import UserError
from andy_dist.train import checkpoint as ckpt
from andy_dist.train.checkpoint_format import META_FILE, write_meta


def tag(folder, name, complete=True, payload=b"weights"):
    path = folder / name
    path.mkdir()
    (path / "mp_rank_00_model_states.pt").write_bytes(payload)
    if complete:
        write_meta(path, {"model_config": {"vocab_size": 300}, "tag": name.split(".")[0]})
    return path


def test_recover_finishes_a_swap_cut_after_the_old_tag_moved_aside(tmp_path):
    """Crash between `best -> best.old` and `best.partial -> best`: the new complete best goes in place."""
    tag(tmp_path, "best.old", payload=b"old")
    tag(tmp_path, "best.partial", payload=b"new")
    ckpt.recover(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best"]
    assert (tmp_path / "best" / "mp_rank_00_model_states.pt").read_bytes() == b"new"


def test_recover_brings_back_the_old_tag_when_the_new_one_never_completed(tmp_path):
    tag(tmp_path, "best.old", payload=b"old")
    tag(tmp_path, "best.partial", complete=False, payload=b"half")
    ckpt.recover(tmp_path)
    assert (tmp_path / "best" / META_FILE).is_file()
    assert (tmp_path / "best" / "mp_rank_00_model_states.pt").read_bytes() == b"old"
    assert (tmp_path / "best.partial").is_dir()  # incomplete: ignored, removed by the next save of best


def test_recover_removes_a_replaced_tag_left_after_the_swap(tmp_path):
    tag(tmp_path, "step-000004.old", payload=b"old")
    tag(tmp_path, "step-000004", payload=b"new")
    ckpt.recover(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-000004"]


def test_a_full_disk_is_told_by_errno_and_a_peers_error_is_not():
    # The words of a real gloo error when a peer dies during a collective: no file write failed here.
    peer = RuntimeError("[../third_party/gloo/gloo/transport/tcp/pair.cc:534] Write error [127.0.0.1]:46422: "
                        "Broken pipe")
    assert ckpt._write_failure(peer) is None
    try:
        try:
            raise OSError(errno.ENOSPC, "No space left on device")
        except OSError:
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598")
    except RuntimeError as torch_error:
        failure = ckpt._write_failure(torch_error)
    assert failure is not None and failure.errno == errno.ENOSPC
    assert "No space left on device (the disk, a quota or a file size limit is full)" == ckpt._describe(failure)


class _Payload:
    def __reduce__(self):
        return (exec, ("open(__import__('os').environ['ANDY_PAYLOAD_MARK'], 'w').write('ran')",))


def test_a_universal_conversion_found_on_disk_is_vetted_before_deepspeed_loads_it(tmp_path, monkeypatch):
    """`step-000008_universal/.complete` from an earlier run skips the conversion, never the vetting: a file
    that would run code when unpickled is refused with one line naming it, and its code does not run."""
    mark = tmp_path / "payload-ran"
    monkeypatch.setenv("ANDY_PAYLOAD_MARK", str(mark))
    source = tag(tmp_path, "step-000008")
    universal = tmp_path / "step-000008_universal" / "zero" / "embed.weight"
    universal.mkdir(parents=True)
    (universal / "fp32.pt").write_bytes(pickle.dumps({"param": _Payload()}))
    (tmp_path / "step-000008_universal" / ".complete").write_text("")
    checkpoint = ckpt.Checkpoint(tmp_path, source.name, {"world_size": 2})
    with pytest.raises(UserError) as error:
        ckpt.convert_to_universal(checkpoint)
    assert str(universal / "fp32.pt") in str(error.value) and "\n" not in str(error.value)
    assert not mark.exists()
