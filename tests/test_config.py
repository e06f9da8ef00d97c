"""Config loading: defaults, lookup order, validation with exit 78 naming the key."""

import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from daemon.config import ConfigError, load_config, parse_config, read_api_key

ROOT = Path(__file__).resolve().parents[1]


def test_defaults_follow_spec(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("GEMINI_BATCHD_CONFIG", raising=False)
    cfg = parse_config({})
    assert cfg.inbox_dir == tmp_path / "gemini-batchd" / "inbox"
    assert cfg.socket_path == tmp_path / "gemini-batchd" / "control.sock"
    assert cfg.gemini.api_version == "v1beta"
    assert cfg.submit.inline_max_bytes == 8 * 1024 * 1024
    assert cfg.poll.workers == 4
    assert cfg.poll.results_grace == 900.0
    assert cfg.inbox.settle_seconds == 1.0


def test_example_config_documents_every_key_with_its_default():
    data = tomllib.loads((ROOT / "config.example.toml").read_text())
    cfg = parse_config(data)
    defaults = parse_config({})
    for section in ("gemini", "api", "inbox", "submit", "poll", "outbox", "cleanup", "daemon"):
        assert getattr(cfg, section) == getattr(defaults, section), section
    text = (ROOT / "config.example.toml").read_text()
    import dataclasses

    for section in (
        "paths",
        "gemini",
        "api",
        "inbox",
        "submit",
        "poll",
        "outbox",
        "cleanup",
        "daemon",
    ):
        for f in dataclasses.fields(type(getattr(defaults, section))):
            assert f"{f.name} =" in text, f"[{section}] {f.name} missing from config.example.toml"


@pytest.mark.parametrize(
    ("data", "needle"),
    [
        ({"submit": {"bogus": 1}}, "[submit] bogus"),
        ({"nosuch": {}}, "[nosuch]"),
        ({"poll": {"workers": "four"}}, "[poll] workers"),
        ({"poll": {"workers": 0}}, "[poll] workers"),
        ({"poll": {"results_grace": -1}}, "[poll] results_grace"),
        ({"inbox": {"settle_seconds": -1}}, "[inbox] settle_seconds"),
        ({"gemini": {"default_model": "../x"}}, "[gemini] default_model"),
        ({"submit": {"inline_max_bytes": 30_000_000}}, "[submit] inline_max_bytes"),
        ({"outbox": {"extract_media": "yes"}}, "[outbox] extract_media"),
    ],
)
def test_bad_values_name_the_key(data, needle):
    with pytest.raises(ConfigError) as e:
        parse_config(data)
    assert needle in str(e.value)


def test_lookup_order_env_then_flag(tmp_path, monkeypatch):
    a = tmp_path / "a.toml"
    a.write_text('[gemini]\ndefault_model = "gemini-a"\n')
    b = tmp_path / "b.toml"
    b.write_text('[gemini]\ndefault_model = "gemini-b"\n')
    monkeypatch.setenv("GEMINI_BATCHD_CONFIG", str(a))
    assert load_config().gemini.default_model == "gemini-a"
    assert load_config(b).gemini.default_model == "gemini-b"


def test_relative_paths_are_taken_from_the_config_folder(tmp_path):
    p = tmp_path / "c.toml"
    p.write_text('[paths]\nroot = "data"\n')
    assert load_config(p).root == tmp_path / "data"


def test_systemd_directories_are_honoured(tmp_path, monkeypatch):
    monkeypatch.setenv("STATE_DIRECTORY", str(tmp_path / "st"))
    monkeypatch.setenv("RUNTIME_DIRECTORY", str(tmp_path / "rt"))
    cfg = parse_config({})
    assert cfg.state_dir == tmp_path / "st"
    assert cfg.socket_path == tmp_path / "rt" / "control.sock"


def test_api_key_sources(tmp_path, monkeypatch):
    monkeypatch.delenv("GOOGLE_API_KEY", raising=False)
    monkeypatch.delenv("CREDENTIALS_DIRECTORY", raising=False)
    monkeypatch.setenv("GEMINI_API_KEY", "from-env")
    assert read_api_key(parse_config({})) == "from-env"
    kf = tmp_path / "key"
    kf.write_text("from-file\n")
    assert read_api_key(parse_config({"gemini": {"api_key_file": str(kf)}})) == "from-file"
    cred = tmp_path / "cred"
    cred.mkdir()
    (cred / "gemini-api-key").write_text("from-cred")
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(cred))
    assert read_api_key(parse_config({"gemini": {"api_key_file": str(kf)}})) == "from-cred"


@pytest.mark.parametrize("cmd", [["check-config"], ["run"], ["status"]])
def test_bad_config_exits_78_naming_the_key(tmp_path, cmd):
    p = tmp_path / "bad.toml"
    p.write_text("[poll]\nworkers = -3\n")
    r = subprocess.run(
        [sys.executable, "-m", "daemon", *cmd, "-c", str(p)],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"},
        timeout=60,
    )
    assert r.returncode == 78, r.stderr
    assert "[poll] workers" in r.stderr


def test_invalid_toml_exits_78(tmp_path):
    p = tmp_path / "bad.toml"
    p.write_text("[poll\n")
    r = subprocess.run(
        [sys.executable, "-m", "daemon", "-c", str(p), "check-config"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"},
        timeout=60,
    )
    assert r.returncode == 78
    assert "invalid TOML" in r.stderr


def test_version_flag():
    r = subprocess.run(
        [sys.executable, "-m", "daemon", "--version"],
        capture_output=True,
        text=True,
        env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"},
        timeout=60,
    )
    assert r.returncode == 0
    assert r.stdout.startswith("gemini-batchd ")


def test_check_command_as_a_user_runs_it(tmp_path):
    good = tmp_path / "good.jsonl"
    good.write_text('{"key": "a", "request": {"contents": [{"parts": [{"text": "hi"}]}]}}\n')
    bad = tmp_path / "bad.jsonl"
    bad.write_text(
        '{"key": "a", "request": {"contents": []}}\n{"key": "a", "request": {"x": 1}}\nnope\n'
    )
    env = {"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"}
    ok = subprocess.run(
        [sys.executable, "-m", "daemon", "check", str(good)],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )
    assert ok.returncode == 0, ok.stdout + ok.stderr
    r = subprocess.run(
        [sys.executable, "-m", "daemon", "check", str(bad)],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )
    assert r.returncode == 1
    assert f"{bad}:2:" in r.stdout and f"{bad}:3:" in r.stdout
