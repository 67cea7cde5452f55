"""Kill `modegpt compress` mid-run, rerun the same command: it resumes and writes the same model, bit for bit."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from tests.test_cli_compress import make_tiny_with_tokenizer
from tests.test_cli_errors import assert_user_error

torch = pytest.importorskip("torch")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, smollm2):
    return make_tiny_with_tokenizer(tmp_path_factory.mktemp("resume") / "tiny", smollm2, layers=12)


def compress_cmd(model, out, ratio="0.3"):
    return [sys.executable, "-m", "modegpt_jax.cli", "compress", "--model", str(model), "--ratio", ratio,
            "--output", str(out), "--calib-samples", "8", "--calib-seqlen", "64", "--seed", "1"]


def deterministic_files(directory):
    """Every file byte for byte (plots included), the report less its timings, the saved configuration less the
    output path (the two runs write to different directories)."""
    import yaml

    records = {"report.json", "run_config.yaml"}
    files = {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*"))
             if p.is_file() and p.name not in records}
    assert "plots/allocation.png" in files
    report = json.loads((directory / "report.json").read_text())
    report.pop("timings_seconds")
    report.pop("memory")
    for layer in report["layers"]:
        for timing in ("seconds", "resume_seconds", "compile_seconds", "phase_seconds", "device_peak_bytes"):
            layer.pop(timing)
    config = yaml.safe_load((directory / "run_config.yaml").read_text())
    assert config.pop("output") == str(directory)
    return files, report, config


@pytest.mark.slow  # keeps `make test` within its time budget; CI runs it in `make test-slow`
def test_kill_and_resume_gives_the_same_output(tiny, tmp_path):
    reference = tmp_path / "reference"
    subprocess.run(compress_cmd(tiny, reference), check=True, capture_output=True, timeout=600)

    out = tmp_path / "resumed"
    state = tmp_path / ".resumed.resume" / "state.json"
    proc = subprocess.Popen(compress_cmd(tiny, out), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    killed_after = None
    while time.time() < deadline and proc.poll() is None:
        if state.is_file():
            try:
                finished = len(json.loads(state.read_text()).get("layers", []))
            except ValueError:
                finished = 0
            if finished >= 3:
                proc.send_signal(signal.SIGKILL)
                killed_after = finished
                break
        time.sleep(0.02)
    proc.wait(timeout=60)
    assert killed_after is not None, "the run ended before it could be killed"
    assert not out.exists()  # nothing half-written where the output goes

    resumed = subprocess.run(compress_cmd(tiny, out), capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr
    assert not state.parent.exists()  # the resume state is removed once the output is written
    assert deterministic_files(out) == deterministic_files(reference)


def test_changed_configuration_refuses_to_resume(tiny, tmp_path):
    out = tmp_path / "o"
    proc = subprocess.Popen(compress_cmd(tiny, out), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    state = tmp_path / ".o.resume" / "state.json"
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None and not state.is_file():
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=60)
    assert state.is_file()
    changed = subprocess.run(compress_cmd(tiny, out, ratio="0.4"), capture_output=True, text=True, timeout=600)
    assert_user_error(changed, "different configuration", "settings")
