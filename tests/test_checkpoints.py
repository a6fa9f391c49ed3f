"""Checkpoints: resuming never runs code from a file, sharded FSDP checkpoints (DCP directories)
are written by every rank and verified before use, and every state train.py writes round-trips.

A planted payload is an object whose unpickling runs a command (here: creates a marker file). It
is written with the project's own writers, digests and all, as whoever can write the checkpoint
can: the digests cannot tell it apart, so the loader itself must refuse it."""
import hashlib
import io
import json
import os
import pickle
import shutil
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRAIN = os.path.join(ROOT, "train", "train.py")
sys.path.insert(0, os.path.join(ROOT, "train"))
import checkpoint  # noqa: E402
import train  # noqa: E402

FAST = ["--max-steps", "4", "--warmup-steps", "1", "--num-samples", "48", "--no-plot"]


class Planted:
    """Unpickling this runs `touch <marker>`."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.fixture
def cpu_reference_path(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")


def torchrun(args, nproc=2, check=True):
    env = dict(os.environ, TRITON_INTERPRET="0", OMP_NUM_THREADS="1")
    res = subprocess.run([sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", TRAIN] + args,
                         env=env, capture_output=True, text=True, timeout=600)
    if check:
        assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    return res


def metrics(out):
    return [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]


# ----------------------------------------------------------------------------- single file


def test_a_planted_payload_in_the_checkpoint_file_is_refused_and_never_runs(tmp_path, cpu_reference_path):
    out, marker = str(tmp_path / "run"), str(tmp_path / "payload-ran")
    train.main(FAST + ["--out", out, "--ckpt-every", "2"])
    path = os.path.join(out, "ckpt.pt")
    state = checkpoint.load(path, "cpu")
    assert state["step"] == 4
    # written in place with a valid digest (checkpoint.save would rotate step 2 out of .prev)
    buf = io.BytesIO()
    torch.save(dict(state, config=dict(state["config"], note=Planted(marker))), buf)
    payload = buf.getvalue()
    with open(path, "wb") as f:
        f.write(checkpoint.MAGIC + hashlib.sha256(payload).hexdigest().encode() + b"\n" + payload)
    with pytest.raises(checkpoint.CheckpointError, match=r"ckpt\.pt: holds objects other than tensors.*posix\.system"
                                                        r".*refused, since unpickling them could run code"):
        checkpoint.load(path, "cpu")
    assert not os.path.exists(marker)
    # resume skips it, says why, and continues from the previous checkpoint (step 2)
    res = train.main(["--max-steps", "6"] + FAST[2:] + ["--out", out, "--resume"])
    assert [r["step"] for r in res["history"]] == [3, 4, 5, 6]
    assert not os.path.exists(marker)


def test_every_single_file_state_loads_with_weights_only(tmp_path, cpu_reference_path):
    """What train.py writes (SFT with emulated ranks and accumulation, LOGO) holds only tensors
    and plain values: torch.load(weights_only=True) reads it whole."""
    for name, extra in (("sft", ["--world-size", "2", "--grad-accum", "2"]), ("logo", ["--objective", "logo"])):
        out = str(tmp_path / name)
        train.main(FAST + extra + ["--out", out])
        with open(os.path.join(out, "ckpt.pt"), "rb") as f:
            data = f.read()
        payload = data[len(checkpoint.MAGIC) + 65:]
        state = torch.load(io.BytesIO(payload), weights_only=True)
        assert state["step"] == 4 and state["config"]["objective"] == name


# ----------------------------------------------------------------------------- sharded (DCP)


def test_dcp_round_trip_and_refusals_in_one_process(tmp_path):
    """save_sharded / load_sharded without a process group: tensors and plain values come back;
    a payload as a non-tensor item, or in DCP's .metadata pickle, is refused and never runs; a
    flipped byte in a shard is caught by the manifest."""
    folder, marker = str(tmp_path / "ckpt.dcp"), str(tmp_path / "payload-ran")
    tensors = dict(w=torch.arange(6.0).view(2, 3), lr=0.25, betas=(0.9, 0.95), name="adamw")
    checkpoint.save_sharded(tensors, dict(step=3, config=dict(seed=1)), folder)
    assert sorted(os.listdir(folder)) == [".metadata", "__0_0.distcp", "manifest.json", "state.json"]
    back = dict(w=torch.zeros(2, 3), lr=0.0, betas=None, name=None)
    assert checkpoint.load_sharded(folder, back) == dict(step=3, config=dict(seed=1))
    assert torch.equal(back["w"], tensors["w"]) and back["lr"] == 0.25 and tuple(back["betas"]) == (0.9, 0.95)

    bad_item = str(tmp_path / "item.dcp")
    checkpoint.save_sharded(dict(w=torch.ones(2), note=Planted(marker)), {}, bad_item)
    with pytest.raises(checkpoint.CheckpointError, match="note .*holds objects other than tensors.*could run code"):
        checkpoint.load_sharded(bad_item, dict(w=torch.zeros(2), note=None))
    assert not os.path.exists(marker)

    bad_meta = str(tmp_path / "meta.dcp")
    shutil.copytree(folder, bad_meta)
    with open(os.path.join(bad_meta, ".metadata"), "wb") as f:
        pickle.dump(Planted(marker), f)
    manifest = json.load(open(os.path.join(bad_meta, "manifest.json")))
    manifest["files"][".metadata"] = checkpoint.file_sha256(os.path.join(bad_meta, ".metadata"))  # a consistent forgery
    json.dump(manifest, open(os.path.join(bad_meta, "manifest.json"), "w"))
    with pytest.raises(checkpoint.CheckpointError, match=r"\.metadata: names posix\.system.*refused"):
        checkpoint.load_sharded(bad_meta, dict(w=torch.zeros(2, 3)))
    assert not os.path.exists(marker)

    shard = os.path.join(folder, "__0_0.distcp")
    data = bytearray(open(shard, "rb").read())
    data[len(data) // 2] ^= 0xFF
    open(shard, "wb").write(bytes(data))
    with pytest.raises(checkpoint.CheckpointError, match=r"__0_0\.distcp: missing or checksum mismatch"):
        checkpoint.load_sharded(folder, back)


@pytest.mark.slow
def test_fsdp_writes_shards_resumes_from_them_and_refuses_another_world(tmp_path):
    """torchrun --nproc_per_node 2 --fsdp: every rank writes its .distcp shard (nothing is gathered
    to rank 0), the previous checkpoint is kept; a corrupted newest checkpoint falls back to the
    previous one; a 1-process job is refused, naming both sizes."""
    out = str(tmp_path / "run")
    common = ["--fsdp", "--num-samples", "32", "--no-plot", "--warmup-steps", "1"]
    torchrun(common + ["--max-steps", "3", "--ckpt-every", "1", "--out", out])
    folder = os.path.join(out, "ckpt.dcp")
    assert {"__0_0.distcp", "__1_0.distcp", ".metadata", "manifest.json"} <= set(os.listdir(folder))
    assert json.load(open(os.path.join(folder, "state.json")))["step"] == 3
    assert json.load(open(os.path.join(folder + ".prev", "state.json")))["step"] == 2
    assert not os.path.exists(os.path.join(out, "ckpt.pt"))  # nothing gathered to rank 0

    refused = torchrun(common + ["--max-steps", "5", "--out", out, "--resume"], nproc=1, check=False)
    assert refused.returncode != 0 and "processes: 2 -> 1" in refused.stdout + refused.stderr

    shard = os.path.join(folder, "__1_0.distcp")
    data = bytearray(open(shard, "rb").read())
    data[100] ^= 0xFF
    open(shard, "wb").write(bytes(data))
    res = torchrun(common + ["--max-steps", "5", "--out", out, "--resume"])
    text = res.stdout + res.stderr
    assert "__1_0.distcp: missing or checksum mismatch" in text and "ckpt.dcp.prev at step 2" in text
    rows = metrics(out)
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5]
    # (tests/test_train.py kills a --fsdp job and checks the resumed losses equal an uninterrupted run's)
