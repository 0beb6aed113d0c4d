"""The command line as scripts use it: exit codes (0 PASS, 1 FAIL or mismatch, 2 user error, 130 interrupted),
`--version`, `run --json`, progress bars only on a terminal, `--quiet` for the libraries too, a closed pipe."""

from __future__ import annotations

import json
import subprocess
import sys

import datasets
import pytest
import torch
import transformers
import yaml
from helpers import QUICK_SCENARIO

from safeedit import __version__
from safeedit.cli import EXIT_FAIL, EXIT_OK, EXIT_USAGE, main
from safeedit.masks import Mask
from safeedit.progress import bars_off, configure

QUICK = QUICK_SCENARIO


def run_quick(tmp_path, criteria: list, *extra: str) -> int:
    path = tmp_path / "quick.yaml"
    path.write_text(yaml.safe_dump({**QUICK, "criteria": criteria}))
    return main(["run", str(path), "--out", str(tmp_path / "out"), "--no-pdf", "--quiet", *extra])


def test_version(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["--version"])
    assert exit_.value.code == 0 and capsys.readouterr().out.strip() == f"safeedit {__version__}"


def test_fail_verdict_exits_1_and_json_is_the_only_stdout(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("SAFEEDIT_CACHE", str(tmp_path / "cache"))
    code = run_quick(tmp_path, ["ga.ua >= 0%", {"check": "ga.ta > 100%", "why": "impossible on purpose"}], "--json")
    captured = capsys.readouterr()
    summary = json.loads(captured.out)  # nothing but the JSON on stdout
    assert code == EXIT_FAIL
    assert summary["verdict"]["passed"] is False
    assert [row["passed"] for row in summary["verdict"]["criteria"]] == [True, False]
    assert set(summary["metrics"]) == {"original", "ga"} and 0 <= summary["metrics"]["ga"]["ta"] <= 1
    assert summary["paths"]["record"] == str(tmp_path / "out" / "record.json")
    assert "ga.safetensors" in summary["paths"]["outputs"]
    assert "verdict: FAIL" in captured.err


def test_pass_verdict_exits_0(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("SAFEEDIT_CACHE", str(tmp_path / "cache"))
    assert run_quick(tmp_path, ["ga.ta >= 0%"]) == EXIT_OK
    assert "verdict: PASS" in capsys.readouterr().out


def test_user_error_exits_2_in_one_line(tmp_path, capsys):
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump({**QUICK, "methods": {"gaa": None}}))
    assert main(["run", str(tmp_path / "bad.yaml")]) == EXIT_USAGE
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "unknown method 'gaa'" in err and "Traceback" not in err


def test_verbose_shows_the_traceback(tmp_path, capsys):
    assert main(["run", str(tmp_path / "absent.yaml"), "-v"]) == EXIT_USAGE
    err = capsys.readouterr().err
    assert "Traceback" in err and err.strip().splitlines()[-1].startswith("safeedit: error:")


def test_bars_only_on_a_terminal_and_quiet_silences_the_libraries(monkeypatch):
    assert bars_off(False) is True and bars_off(True) is None  # None: tqdm shows a bar only on a terminal
    try:
        for terminal, quiet, bars in ((True, False, True), (True, True, False), (False, False, False)):
            transformers.utils.logging.enable_progress_bar()
            datasets.enable_progress_bars()
            monkeypatch.setattr(sys.stderr, "isatty", lambda terminal=terminal: terminal, raising=False)
            configure(quiet=quiet)
            assert transformers.utils.logging.is_progress_bar_enabled() is bars, (terminal, quiet)
            assert datasets.utils.are_progress_bars_disabled() is not bars, (terminal, quiet)
    finally:
        transformers.utils.logging.enable_progress_bar()
        transformers.utils.logging.set_verbosity_warning()
        datasets.enable_progress_bars()
        datasets.utils.logging.set_verbosity_warning()


def test_closed_pipe_ends_quietly(tmp_path):
    """`safeedit inspect --json | head -c 1`: no BrokenPipe traceback, the conventional SIGPIPE status."""
    mask = Mask({f"layer{i}.weight": torch.rand(4, 4) > 0.5 for i in range(3000)}, {"score": "random"})
    mask.save(tmp_path / "m.safetensors")
    shell = f"{sys.executable} -m safeedit inspect {tmp_path / 'm.safetensors'} --json | head -c 1; " \
            "echo \" ${PIPESTATUS[0]}\""
    done = subprocess.run(["bash", "-c", shell], capture_output=True, text=True, timeout=120)
    assert done.stdout.split()[-1] == "141"
    assert "Traceback" not in done.stderr and "BrokenPipe" not in done.stderr, done.stderr
