"""Console lines of a multi-rank launch carry the rank once (issue 17)."""

from __future__ import annotations

import sys

from tierlift.launch.local import launch_local

_SCRIPT = """
import logging, os, sys
from tierlift.runtime.rundir import setup_logging
setup_logging(sys.argv[1] if os.environ["RANK"] == "0" else None, int(os.environ["RANK"]))
logging.getLogger("tierlift.test").warning("hello from the rank")
"""


def test_launched_ranks_log_their_rank_once_on_the_console_and_in_train_log(tmp_path, capfd):
    script = tmp_path / "ranklog.py"
    script.write_text(_SCRIPT)
    assert launch_local([sys.executable, str(script), str(tmp_path)], 2) == 0
    err = capfd.readouterr().err
    lines = [ln for ln in err.splitlines() if "hello from the rank" in ln]
    assert len(lines) == 2, err
    for ln in lines:
        assert ln.count("[rank ") == 1 and ln.startswith("[rank "), ln
    # rank 0's train.log is not prefixed by the launcher, so it keeps the rank.
    log = (tmp_path / "train.log").read_text()
    assert log.count("[rank 0]") == 1 and "hello from the rank" in log


def test_a_single_rank_keeps_the_rank_in_its_log_format(tmp_path, capfd):
    script = tmp_path / "ranklog.py"
    script.write_text(_SCRIPT)
    assert launch_local([sys.executable, str(script), str(tmp_path)], 1) == 0
    lines = [ln for ln in capfd.readouterr().err.splitlines() if "hello from the rank" in ln]
    assert len(lines) == 1 and lines[0].count("[rank 0]") == 1, lines


def test_a_ranks_error_line_names_the_rank_once(tmp_path, monkeypatch, capsys):
    from tierlift.launch.worker import main
    from tierlift.parallel.env import RANK_PREFIX_ENV

    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv(RANK_PREFIX_ENV, "1")  # the launcher adds "[rank 1] " to the line
    assert main(["--run-dir", str(tmp_path)]) == 2
    assert "[rank" not in capsys.readouterr().err
    monkeypatch.delenv(RANK_PREFIX_ENV)  # e.g. torchrun: nobody else names the rank
    assert main(["--run-dir", str(tmp_path)]) == 2
    assert capsys.readouterr().err.count("[rank 1]") == 1
