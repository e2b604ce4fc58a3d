"""State on disk is verified and confined: NVMe-resident optimizer state is checked on
every read, and a damaged block stops the run with one line naming file and extent,
before anything built on it reaches a checkpoint (CPU, one rank, NVMe in tmp dirs)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import yaml

from tierlift.runtime.checkpoint import latest_checkpoint, read_manifest, verify_files

MODEL = {"kind": "gpt", "vocab_size": 64, "d_model": 32, "n_layers": 2, "n_heads": 4, "max_seq_len": 16}


def _nvme_config(tmp_path, **optimizer) -> str:
    cfg = {
        "model": MODEL,
        "data": {"source": "synthetic", "seq_len": 16, "synthetic_samples": 512},
        "train": {"micro_batch_size": 2, "max_steps": 6, "checkpoint_every": 2, "log_every": 2},
        "zero": {"stage": 3},
        "offload": {"optimizer": {"kind": "nvme", "path": str(tmp_path / "nvme"), "buffer_size": 1024,
                                  "buffer_count": 2, **optimizer}},
        "run": {"device": "cpu", "backend": "local", "nproc": 1},
    }
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return str(path)


# Runs `tierlift train` with one hook that zeroes the first 4 KiB block of fp32 master
# state holding anything but zeros (so the damage is real): CORRUPT=after_save right after
# the step-2 checkpoint (the next step reads it), CORRUPT=in_save while the step-4
# checkpoint is being taken (its streaming of NVMe-resident state reads it).
_CORRUPTING_TRAIN = textwrap.dedent("""
    import os, sys
    from tierlift.launch.cli import main
    from tierlift.runtime.trainer import Trainer

    def corrupt(trainer):
        f = trainer.engine.host_opt.nvme.file
        with open(f.path, "r+b") as raw:
            for e in f.plan:
                if e.key[1] != "master":
                    continue
                raw.seek(e.offset)
                if raw.read(4096).strip(b"\\0"):
                    os.pwrite(raw.fileno(), bytes(4096), e.offset)
                    os.fsync(raw.fileno())
                    print(f"ZEROED {e.offset}", flush=True)
                    return

    save_to_run, save = Trainer.save_to_run, Trainer.save

    def save_to_run_then_corrupt(self):
        step = save_to_run(self)
        if step == 2 and os.environ["CORRUPT"] == "after_save":
            corrupt(self)
        return step

    def save_corrupting_midway(self, path):
        if self.step == 4 and os.environ["CORRUPT"] == "in_save":
            segments = self.engine.state_segments

            def segments_then_corrupt():
                out = segments()  # drains the optimizer's writes first
                corrupt(self)
                return out
            self.engine.state_segments = segments_then_corrupt
        return save(self, path)

    Trainer.save_to_run, Trainer.save = save_to_run_then_corrupt, save_corrupting_midway
    sys.exit(main(sys.argv[1:]))
""")


@pytest.mark.parametrize("when", ["after_save", "in_save"])
def test_corrupt_nvme_block_mid_run_stops_with_one_line_and_commits_nothing(tmp_path, when):
    script = tmp_path / "corrupt_train.py"
    script.write_text(_CORRUPTING_TRAIN)
    run = tmp_path / "run"
    p = subprocess.run([sys.executable, str(script), "train", _nvme_config(tmp_path), "--run-dir", str(run)],
                       capture_output=True, text=True, timeout=600, env={**os.environ, "CORRUPT": when})
    assert "ZEROED" in p.stdout, p.stdout + p.stderr[-3000:]
    assert p.returncode == 2, p.stderr[-3000:]
    assert "Traceback" not in p.stderr, p.stderr[-3000:]
    errors = [ln for ln in p.stderr.splitlines() if ln.startswith("tierlift: error:")]
    assert len(errors) == 1, p.stderr[-3000:]
    line = errors[0]
    offset = int(p.stdout.split("ZEROED ")[1].split()[0])
    extents = str(tmp_path / "nvme" / "tierlift-rank00000.extents")
    assert "checksum mismatch" in line and extents in line and "master" in line, line
    assert f"file offset {offset}" in line and "expected 0x" in line, line
    # The step-2 checkpoint is the newest: no later one was written from the damaged state,
    # and the one that is there is intact.
    ckpt = latest_checkpoint(str(run))
    assert ckpt is not None and os.path.basename(ckpt) == "step-00000002", os.listdir(run / "checkpoints")
    assert sorted(os.listdir(run / "checkpoints")) == ["step-00000002"]
    verify_files(ckpt, read_manifest(ckpt))


def test_verify_setting_defaults_on_and_turns_off(tmp_path):
    from tierlift.models import build_model
    from tierlift.models.config import ModelConfig
    from tierlift.runtime.config import TrainConfig
    from tierlift.runtime.trainer import Trainer

    from _fakes import arith_samples

    for verify in (None, False):
        opt = {"kind": "nvme", "path": str(tmp_path / f"nv-{verify}"), "buffer_size": 1024}
        if verify is not None:
            opt["verify"] = verify
        cfg = TrainConfig.from_dict({"model": MODEL, "data": {"seq_len": 16}, "train": {"micro_batch_size": 2},
                                     "zero": {"stage": 3}, "run": {"device": "cpu"},
                                     "offload": {"optimizer": opt}})
        t = Trainer(build_model(ModelConfig(**MODEL), seed=5), cfg, train_data=arith_samples(16, seed=2))
        try:
            assert t.engine.host_opt.nvme.file.verify is (verify is None)
        finally:
            t.engine.close()


# ----------------------------------------------------------------------------- metrics after a resume

def test_metrics_rows_of_rerun_steps_are_replaced(tmp_path):
    """Steps 3-4 run twice (the step-4 checkpoint is lost, the run resumes from step 2):
    read_metrics and the report see each step once, with the resumed run's values."""
    import shutil

    import pyarrow.parquet as pq

    from tierlift.launch.cli import main
    from tierlift.runtime.report import _load
    from tierlift.runtime.rundir import read_metrics

    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(yaml.safe_dump({
        "model": MODEL, "data": {"source": "synthetic", "seq_len": 16, "synthetic_samples": 256},
        "train": {"micro_batch_size": 2, "max_steps": 4, "checkpoint_every": 2, "log_every": 2},
        "run": {"device": "cpu", "backend": "local", "nproc": 1}}))
    run = tmp_path / "run"
    assert main(["train", str(cfg), "--run-dir", str(run)]) == 0
    shutil.rmtree(run / "checkpoints" / "step-00000004")
    parts_before = set(os.listdir(run / "metrics"))
    assert main(["train", str(cfg), "--run-dir", str(run), "--resume"]) == 0
    new_parts = sorted(set(os.listdir(run / "metrics")) - parts_before)
    resumed = {}
    for n in new_parts:
        t = pq.read_table(run / "metrics" / n).to_pydict()
        resumed.update(zip(t["step"], t["step_time_s"]))
    assert sorted(resumed) == [3, 4]
    for table in (read_metrics(str(run)).to_pydict(), _load(str(run))["metrics"]):
        assert table["step"] == [1, 2, 3, 4]
        assert dict(zip(table["step"], table["step_time_s"]))[3] == resumed[3]
        assert dict(zip(table["step"], table["step_time_s"]))[4] == resumed[4]


def test_rows_of_an_abandoned_timeline_go_too():
    """A resume from step 2 that stopped at step 3: the first run's step 4 is not shown."""
    import pyarrow as pa

    from tierlift.runtime.metrics_parts import latest_rows

    first = pa.table({"step": [1, 2, 3, 4], "loss": [4.0, 3.0, 2.0, 1.0]})
    second = pa.table({"step": [3], "loss": [2.5]})
    out = pa.concat_tables(latest_rows([first, second])).to_pydict()
    assert out == {"step": [1, 2, 3], "loss": [4.0, 3.0, 2.5]}


def test_parameters_on_nvme_cannot_disagree_on_verify(tmp_path):
    from tierlift.errors import ConfigError
    from tierlift.offload.policy import NVMeOffload, OffloadConfig

    path = str(tmp_path / "nv")
    OffloadConfig(optimizer=NVMeOffload(path=path, verify=False), param=NVMeOffload(path=path, verify=False))
    with pytest.raises(ConfigError, match=r"offload.param.verify=True: differs from offload.optimizer.verify \(False\)"):
        OffloadConfig(optimizer=NVMeOffload(path=path, verify=False), param=NVMeOffload(path=path))
