"""SIGTERM / SIGINT in any phase of any command: one line, 128 + the signal, and nothing left running
(before: rc -15 and no message during model loading, evaluation and the quickstart's early phases)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml
from conftest import stdlib_texts
from sandbox_helpers import needs_bwrap

from ebft.cli import main


class Command:
    """``python -m ebft ARGS`` with its stderr collected as it comes."""

    def __init__(self, *args: str):
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "ebft", *args], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
        )
        self.err = ""
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        for chunk in iter(lambda: self.proc.stderr.read(1), ""):
            self.err += chunk

    def wait_for(self, predicate, timeout: float = 300) -> None:
        deadline = time.time() + timeout
        while time.time() < deadline:
            if predicate(self):
                return
            if self.proc.poll() is not None:
                raise AssertionError(f"exited early ({self.proc.returncode}): {self.err[-2000:]}")
            time.sleep(0.05)
        raise AssertionError(f"timed out waiting; stderr so far: {self.err[-2000:]}")

    def stop(self, sig: int, timeout: float = 120) -> tuple[int, str]:
        self.proc.send_signal(sig)
        try:
            self.proc.wait(timeout=timeout)
        finally:
            self.proc.kill()
        self._reader.join(timeout=10)
        return self.proc.returncode, self.err


@pytest.fixture
def run_command():
    """``run_command(*args)`` starts a Command; every one still running at the end of the test is killed."""
    started: list[Command] = []

    def start(*args: str) -> Command:
        started.append(Command(*args))
        return started[-1]

    yield start
    for command in started:
        command.proc.kill()
        command.proc.wait()


def _descendants(pid: int) -> set[int]:
    """Every process below ``pid`` (by parent links in /proc)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            parent = int(stat.rsplit(")", 1)[1].split()[1])
            children.setdefault(parent, []).append(int(entry))
    found, todo = set(), [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.add(child)
            todo.append(child)
    return found


def _alive(pids: set[int]) -> set[int]:
    alive = set()
    for pid in pids:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if state != "Z":
            alive.add(pid)
    return alive


def _last_line(err: str) -> str:
    return err.replace("\r", "\n").strip().splitlines()[-1]


@pytest.fixture(scope="module")
def text_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("data") / "text.jsonl"
    path.write_text("".join(json.dumps({"text": t[:3000]}) + "\n" for t in stdlib_texts(8)))
    return path


def _strided(tmp_path: Path, model_dir: Path, data: Path, **over) -> Path:
    cfg = {
        "base_model": str(model_dir),
        "rl": "ebft",
        "ebft": {"mode": "strided", "stride": 8, "context_length": 8, "generate_max_len": 4, "n_samples_per_prompt": 2},
        "datasets": [{"path": str(data), "type": "ebft_pretrain.transform"}],
        "sequence_len": 64,
        "micro_batch_size": 1,
        "max_steps": 10_000,
        "val_set_size": 0.5,
        "output_dir": str(tmp_path / "run"),
        "seed": 0,
        **over,
    }
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_train_stopped_while_loading(tmp_path, tiny_model_dir, text_file, sig, run_command):
    """Once the data is read the model loads: a signal there (or, if that was quicker, in the loop) ends
    with one line and 128 + the signal."""
    command = run_command("train", str(_strided(tmp_path, tiny_model_dir, text_file)))
    command.wait_for(lambda c: "dataset '" in c.err)  # the data is read (a cached map prints no progress)
    code, err = command.stop(sig)
    assert code == 128 + sig, err
    name = signal.Signals(sig).name
    last = _last_line(err)
    assert last == f"stopped by {name} before `ebft train` finished" or last.startswith("error: interrupted at step")
    assert "Traceback" not in err


def test_evaluate_stopped_while_evaluating(tmp_path, tiny_model_dir, text_file, run_command):
    cfg = _strided(tmp_path, tiny_model_dir, text_file, ebft={"mode": "strided", "n_samples_per_prompt": 8})
    command = run_command("evaluate", str(cfg))
    command.wait_for(lambda c: "Loading weights" in c.err)
    code, err = command.stop(signal.SIGTERM)
    assert code == 143 and _last_line(err) == "stopped by SIGTERM before `ebft evaluate` finished", err
    assert "Traceback" not in err and not (tmp_path / "run" / "eval_results.json").exists()


@needs_bwrap
def test_evaluate_execute_stopped_while_code_runs_leaves_nothing_running(tmp_path, tiny_model_dir, run_command):
    """SIGTERM while a row's code runs in the sandbox: the sandbox and everything in it go with the command."""
    data = tmp_path / "code.jsonl"
    row = {"input": "Wait.", "output": "import time\ntime.sleep(120)", "unit_tests": "['assert True']"}
    data.write_text(json.dumps(row) + "\n")
    cfg = {
        "base_model": str(tiny_model_dir),
        "rl": "ebft",
        "ebft": {"mode": "structured", "use_whitening": False},
        "trl": {"num_generations": 2, "max_completion_length": 8},
        "datasets": [{"path": str(data), "type": "ebft_opencode.transform"}],
        "sequence_len": 96,
        "micro_batch_size": 2,
        "output_dir": str(tmp_path / "out"),
    }
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    command = run_command("evaluate", str(path), "--split", "train", "--execute", "--exec-timeout", "300")
    pid = command.proc.pid

    seen: dict[int, float] = {}
    below: set[int] = set()

    def sandboxed_for_a_while(_command) -> bool:
        """A sandbox alive for 5 s: the probe and the completions' code end at once (well under that even on a
        loaded machine), the ground truth sleeps. The process tree is read once per look, so the sandbox found
        is in the tree kept for the checks below (a second read could miss a sandbox that just ended)."""
        now = time.time()
        tree = _descendants(pid)
        for p in tree:
            if _comm(p) == "bwrap":
                seen.setdefault(p, now)
        if any(p in tree and now - seen[p] > 5 for p in seen) and len(tree) >= 3:
            below.update(tree)
            return True
        return False

    command.wait_for(sandboxed_for_a_while)
    code, err = command.stop(signal.SIGTERM)
    assert code == 143 and _last_line(err) == "stopped by SIGTERM before `ebft evaluate` finished", err
    deadline = time.time() + 10
    while _alive(below) and time.time() < deadline:
        time.sleep(0.1)
    assert _alive(below) == set(), [(p, _comm(p)) for p in _alive(below)]


def _comm(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return ""


def test_quickstart_stopped_in_an_early_phase(tmp_path, run_command):
    command = run_command("quickstart", "--model", "scratch", "--minutes", "1", "--out", str(tmp_path / "q"))
    command.wait_for(lambda c: "training a small model from scratch" in c.err)
    code, err = command.stop(signal.SIGTERM)
    assert code == 143 and _last_line(err) == "stopped by SIGTERM before `ebft quickstart` finished", err
    assert "Traceback" not in err


@pytest.mark.parametrize(("sig", "code"), [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_validate_stopped(tmp_path, tiny_model_dir, text_file, capsys, monkeypatch, sig, code):
    """validate is too quick to signal from outside: the signal is sent from inside its preflight."""
    from ebft.train import preflight

    monkeypatch.setattr(preflight, "preflight", lambda *args, **kwargs: os.kill(os.getpid(), sig) or time.sleep(5))
    assert main(["validate", str(_strided(tmp_path, tiny_model_dir, text_file))]) == code
    err = capsys.readouterr().err
    assert err.strip() == f"stopped by {signal.Signals(sig).name} before `ebft validate` finished"
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # the command's handler is gone afterwards
