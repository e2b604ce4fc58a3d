"""`tierlift report`: a real tiny run -> report.html with embedded PNGs, checked in headless Chromium.

Chromium check (two runs of Debian's ``chromium``):
1. the shipped, script-free page is screenshotted with ``--enable-logging=stderr``;
   Chromium logs every console message there as ``INFO:CONSOLE...``.  The page has
   no script and a ``default-src 'none'`` CSP, so *any* console line (a CSP
   violation from an external fetch, a blocked resource, ...) is a failure.
2. a copy with a probe script injected (the CSP relaxed for inline script only) is
   loaded with ``--dump-dom``: the probe captures ``error`` events in the capture
   phase (script errors and failed image loads, which Chromium does not log to
   stderr) and, on ``load``, writes them and each image's ``naturalWidth`` into the
   DOM.  So "the plots are present" means "the browser decoded every image".
"""

from __future__ import annotations

import base64
import json
import os
import re
import shutil
import subprocess

import pytest

from tierlift.errors import DataError
from tierlift.launch.cli import main
from tierlift.runtime.report import build_report
from tierlift.system.telemetry import TelemetrySampler

STEPS = 8
PNG = b"\x89PNG\r\n\x1a\n"
IMG_RE = re.compile(r'<img alt="([^"]*)" src="data:image/png;base64,([A-Za-z0-9+/=]+)">')


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A real 8-step run of a tiny GPT through the Trainer, with a checkpoint every 4 steps."""
    from tierlift.models import build_model
    from tierlift.models.config import ModelConfig
    from tierlift.runtime.config import TrainConfig
    from tierlift.runtime.data import SyntheticDataset
    from tierlift.runtime.trainer import Trainer

    rd = str(tmp_path_factory.mktemp("run"))
    model = {"kind": "gpt", "d_model": 32, "n_layers": 1, "n_heads": 2, "max_seq_len": 16}
    cfg = TrainConfig.from_dict({"model": model, "data": {"seq_len": 16},
                                 "train": {"micro_batch_size": 2, "max_steps": STEPS, "checkpoint_every": 4,
                                           "activations": {"policy": "swap", "min_swap_bytes": 0}},
                                 "run": {"device": "cpu", "backend": "local", "dir": rd}})
    with open(os.path.join(rd, "config.yaml"), "w") as f:  # as `tierlift train` writes it
        f.write(cfg.to_yaml())
    trainer = Trainer(build_model(ModelConfig(**model), seed=0), cfg,
                      train_data=SyntheticDataset(64, 16, cfg.model.vocab_size), run_dir=rd)
    summary = trainer.fit()
    assert summary.steps == STEPS
    return rd


def _images(page: str) -> dict[str, bytes]:
    return {alt: base64.b64decode(data) for alt, data in IMG_RE.findall(page)}


def test_trainer_writes_telemetry(run_dir):
    import pyarrow.parquet as pq
    d = os.path.join(run_dir, "telemetry")
    names = sorted(os.listdir(d))
    assert "rank-0-part-00000.parquet" in names and "events-rank-0-part-00000.parquet" in names
    ev = pq.read_table(os.path.join(d, "events-rank-0-part-00000.parquet")).to_pylist()
    steps = [e for e in ev if e["kind"] == "step_end"]
    assert [e["step"] for e in steps] == list(range(1, STEPS + 1))
    assert all(json.loads(e["detail"]).keys() == {"loss", "step_time_s"} for e in steps)
    assert [e["step"] for e in ev if e["kind"] == "checkpoint"] == [4, 8]
    assert pq.read_table(os.path.join(d, "rank-0-part-00000.parquet")).num_rows >= 2


def test_report_embeds_pngs_and_writes_them_beside(run_dir):
    path = build_report(run_dir)
    assert path == os.path.join(run_dir, "report", "report.html")
    page = open(path, encoding="utf-8").read()
    imgs = _images(page)
    assert len(imgs) == 7, list(imgs)  # loss, step time, breakdown, memory, io, prefetch, activations
    assert all(b.startswith(PNG) and len(b) > 5000 for b in imgs.values())
    for name in ("loss", "step_time", "time_breakdown", "memory", "io", "prefetch", "activations"):
        with open(os.path.join(run_dir, "report", f"{name}.png"), "rb") as f:
            assert f.read() in imgs.values()
    assert "prefetch_miss" in page  # one unit: every stage-3 gather is on demand
    assert "No policy decisions recorded" in page
    assert "<script" not in page and "default-src 'none'" in page
    assert not re.search(r'(src|href)="(https?:)?//', page)  # nothing fetched from anywhere
    assert "step_end" in page and "kind: gpt" in page  # event counts and the config


def test_report_without_telemetry_still_renders(run_dir, tmp_path):
    bare = tmp_path / "bare"
    shutil.copytree(run_dir, bare, ignore=shutil.ignore_patterns("telemetry", "report", "checkpoints"))
    page = open(build_report(str(bare)), encoding="utf-8").read()
    assert set(_images(page)) == {"Training loss per optimizer step", "Step time and tokens/s",
                                  "Step-time breakdown", "Memory per tier over time",  # memory from metrics/
                                  "Activations: kept, swapped, recomputed"}
    assert "Not available: no telemetry/ samples" in page and "Not available: no prefetch events" in page
    assert "No runtime events recorded" in page

    only_summary = tmp_path / "only_summary"
    only_summary.mkdir()
    shutil.copy(os.path.join(run_dir, "summary.json"), only_summary)
    page = open(build_report(str(only_summary)), encoding="utf-8").read()
    assert not _images(page) and "No config.yaml" in page and "loss first -&gt; last" in page


def test_report_shows_prefetch_and_policy_events(run_dir, tmp_path):
    rd = tmp_path / "withevents"
    shutil.copytree(run_dir, rd, ignore=shutil.ignore_patterns("report", "checkpoints"))
    s = TelemetrySampler(str(rd), rank=0)  # appends a new events part, as a resumed run would
    for step in range(1, 5):
        s.event("prefetch_hit", step=step)
        s.event("prefetch_hit", step=step)
        s.event("prefetch_miss", step=step)
        s.event("prefetch_stall", value=2.5 * step, step=step)
    s.event("policy", step=3, decision="prefetch_depth 2->3", reason="stall > 5 ms")
    s.flush()
    out = tmp_path / "out"
    page = open(build_report(str(rd), str(out)), encoding="utf-8").read()
    assert "Prefetch hit rate and stalls" in _images(page) and (out / "prefetch.png").is_file()
    assert "prefetch_depth 2-&gt;3" in page and "stall &gt; 5 ms" in page


def test_cli_report(run_dir, tmp_path, capsys):
    out = tmp_path / "cli"
    assert main(["report", run_dir, "--out", str(out)]) == 0
    assert capsys.readouterr().out.strip() == str(out / "report.html")
    assert (out / "report.html").is_file() and (out / "memory.png").is_file()


def test_not_a_run_dir_is_a_clear_error(tmp_path, capsys):
    with pytest.raises(DataError, match="not a tierlift run directory"):
        build_report(str(tmp_path))
    missing = tmp_path / "nope"
    assert main(["report", str(missing)]) == 2
    err = capsys.readouterr().err
    assert str(missing) in err and "Fix:" in err and "Traceback" not in err


# -- headless Chromium -------------------------------------------------------------------

_PROBE_HEAD = ("<script>window.__errs=[];addEventListener('error',function(e){var t=e.target;"
               "__errs.push(t&&t.tagName?'failed to load '+t.tagName+' '+String(t.src||t.href).slice(0,80)"
               ":String(e.message));},true);</script>")
_PROBE_TAIL = ("<pre id=\"probe\"></pre><script>addEventListener('load',function(){"
               "var im=[].map.call(document.images,function(i){return [i.alt,i.complete,i.naturalWidth];});"
               "document.getElementById('probe').textContent=JSON.stringify({errors:__errs,images:im});});</script>")


def _chromium(url: str, tmp, *extra: str) -> subprocess.CompletedProcess:
    exe = shutil.which("chromium")
    if exe is None:
        pytest.fail("headless Chromium is required for the report test and was not found on PATH: "
                    "install it with `apt-get install -y chromium` (Debian; CI installs it).")
    cmd = [exe, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-quic",
           "--no-first-run", "--disable-background-networking", "--disable-component-update", "--disable-sync",
           f"--user-data-dir={tmp}", "--enable-logging=stderr", "--v=0", *extra, url]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, f"chromium failed ({p.returncode}):\n{p.stderr[-3000:]}"
    return p


def test_report_in_headless_chromium(run_dir, tmp_path):
    from PIL import Image  # pillow comes with matplotlib

    path = build_report(run_dir, str(tmp_path / "report"))
    page = open(path, encoding="utf-8").read()
    n_imgs = len(_images(page))

    shot = tmp_path / "shot.png"
    p = _chromium("file://" + path, tmp_path / "profile1", f"--screenshot={shot}", "--window-size=1280,2000")
    console = [line for line in p.stderr.splitlines() if re.search(r":CONSOLE[:(]", line)]
    assert not console, "the report logged console messages:\n" + "\n".join(console)
    assert shot.is_file() and shot.read_bytes().startswith(PNG)
    with Image.open(shot) as im:
        assert im.size == (1280, 2000)
        colours = im.convert("RGB").resize((320, 500)).getcolors(maxcolors=1 << 16)
        assert colours is None or len(colours) > 50, "the screenshot is (nearly) blank"

    probe = os.path.join(os.path.dirname(path), "probe.html")
    text = page.replace("default-src 'none';", "default-src 'none'; script-src 'unsafe-inline';")
    text = text.replace("<head>", "<head>" + _PROBE_HEAD, 1).replace("</body>", _PROBE_TAIL + "</body>", 1)
    with open(probe, "w", encoding="utf-8") as f:
        f.write(text)
    p = _chromium("file://" + probe, tmp_path / "profile2", "--dump-dom")
    m = re.search(r'<pre id="probe">(.*?)</pre>', p.stdout, re.S)
    assert m and m.group(1), f"the probe did not run:\n{p.stdout[-2000:]}\n{p.stderr[-2000:]}"
    result = json.loads(m.group(1).replace("&amp;", "&").replace("&lt;", "<").replace("&gt;", ">"))
    assert result["errors"] == []
    assert len(result["images"]) == n_imgs == 7
    bad = [alt for alt, complete, width in result["images"] if not (complete and width > 0)]
    assert not bad, f"images the browser could not decode: {bad}"
    console = [line for line in p.stderr.splitlines() if re.search(r":CONSOLE[:(]", line)]
    assert not console, "\n".join(console)
