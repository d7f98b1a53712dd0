"""Settings: from the environment and .env, validated, one clear line when wrong, all in the README."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from pydantic import ValidationError

from service.settings import Settings, settings_error_message

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """No setting in the environment, and a working directory without a stray .env."""
    for name in Settings.model_fields:
        monkeypatch.delenv(name.upper(), raising=False)
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_dotenv_is_read_and_the_environment_wins(clean_env, monkeypatch):
    (clean_env / ".env").write_text("BUNDLE=/models/a\nMAX_BODY_BYTES=4096\nBREAKER_RESET_MS=250\nLOG_FORMAT=text\n")
    monkeypatch.setenv("MAX_BODY_BYTES", "8192")
    s = Settings()
    assert (s.bundle, s.max_body_bytes, s.breaker_reset_ms, s.log_format) == (Path("/models/a"), 8192, 250.0, "text")
    assert s.store_timeout_ms == 50.0 and s.store_retries == 1 and s.api_keys is None and s.admin_token is None


def test_api_keys_are_comma_separated_secrets(clean_env, monkeypatch):
    monkeypatch.setenv("BUNDLE", "/b")
    monkeypatch.setenv("API_KEYS", " key-one-111 ,key-two-222,, ")
    s = Settings()
    assert [k.get_secret_value() for k in s.api_keys] == ["key-one-111", "key-two-222"]
    assert "key-one-111" not in repr(s)  # secrets never print


def test_an_empty_token_means_not_configured(clean_env, monkeypatch):
    """docker compose passes `ADMIN_TOKEN:` without a value as an empty string."""
    monkeypatch.setenv("BUNDLE", "/b")
    monkeypatch.setenv("ADMIN_TOKEN", "")
    monkeypatch.setenv("REDIS_URL", " ")
    s = Settings()
    assert s.admin_token is None and s.redis_url is None


def test_error_message_is_one_line_naming_each_variable_and_hiding_secrets(clean_env, monkeypatch):
    monkeypatch.setenv("MAX_CANDIDATES", "0")
    monkeypatch.setenv("STORE_TIMEOUT_MS", "fast")
    monkeypatch.setenv("LOG_FORMAT", "xml")
    monkeypatch.setenv("ADMIN_TOKEN", "short")
    monkeypatch.setenv("BODY_READ_TIMEOUT_S", "0")  # would disable the slow-client guards
    monkeypatch.setenv("MAX_CONNECTIONS", "0")
    with pytest.raises(ValidationError) as e:
        Settings()
    msg = settings_error_message(e.value)
    assert "\n" not in msg
    assert msg.startswith("invalid settings: ")
    assert "BUNDLE is required but not set" in msg
    assert "MAX_CANDIDATES='0': Input should be greater than or equal to 1" in msg
    assert "STORE_TIMEOUT_MS='fast'" in msg
    assert "LOG_FORMAT='xml': Input should be 'json' or 'text'" in msg
    assert "ADMIN_TOKEN: the admin token must have at least 8 characters" in msg
    assert "short" not in msg
    assert "BODY_READ_TIMEOUT_S='0': Input should be greater than 0" in msg
    assert "MAX_CONNECTIONS='0': Input should be greater than or equal to 1" in msg


@pytest.mark.parametrize(
    "env,says",
    [
        ({"REDIS_URL": "localhost:6379"}, "REDIS_URL: Redis URL 'localhost:6379' has scheme 'localhost'; use redis://"),
        ({"REDIS_NAMESPACE": "din:prod"}, "REDIS_NAMESPACE='din:prod': namespace 'din:prod' is not allowed"),
        ({"API_KEYS": " , "}, "API_KEYS: holds no key"),  # would have left /rank open
    ],
)
def test_values_that_would_fail_later_are_refused_up_front(clean_env, monkeypatch, env, says):
    """Each used to pass validation and then crash start-up after the model loaded (a traceback),
    or silently leave /rank open (an API_KEYS value without a key)."""
    monkeypatch.setenv("BUNDLE", "/b")
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    with pytest.raises(ValidationError) as e:
        Settings()
    assert says in settings_error_message(e.value)


def test_slow_client_guards_read_their_defaults_and_values(clean_env, monkeypatch):
    """BODY_READ_TIMEOUT_S (408 for a body that stalls) and MAX_CONNECTIONS (uvicorn's cap on
    open connections); values that would disable them are refused in the test above."""
    monkeypatch.setenv("BUNDLE", "/b")
    s = Settings()
    assert (s.body_read_timeout_s, s.max_connections) == (10.0, None)
    monkeypatch.setenv("MAX_CONNECTIONS", "")  # docker compose's unset variable: no cap
    assert Settings().max_connections is None
    monkeypatch.setenv("BODY_READ_TIMEOUT_S", "2.5")
    monkeypatch.setenv("MAX_CONNECTIONS", "2000")
    assert (Settings().body_read_timeout_s, Settings().max_connections) == (2.5, 2000)


def test_din_serve_with_a_bad_variable_prints_one_line_and_exits_2(tmp_path):
    env = {k: v for k, v in os.environ.items() if k.upper() not in {n.upper() for n in Settings.model_fields}}
    env |= {"PYTHONPATH": str(ROOT), "DIN_HOME": str(tmp_path / "din"), "MAX_BODY_BYTES": "12", "DEVICE": "tpu"}
    r = subprocess.run(
        [sys.executable, "-m", "service.cli", "serve", "--bundle", str(tmp_path / "nothing")],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60,
    )
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in r.stderr
    assert lines[0].startswith("error: invalid settings: ")
    assert "MAX_BODY_BYTES='12': Input should be greater than or equal to 1024" in lines[0]
    assert "DEVICE='tpu'" in lines[0]


def _readme_settings_table() -> dict[str, str]:
    """`variable -> default` rows of the README's settings table."""
    text = (ROOT / "README.md").read_text()
    section = text[text.index("## Settings"):]
    section = section[: section.index("\n## ", 1)]
    rows = {}
    for line in section.splitlines():
        m = re.match(r"^\| `([A-Z0-9_]+)`(?:, `([A-Z0-9_]+)`)? \| ([^|]+) \|", line)
        if m:
            for name in filter(None, m.group(1, 2)):
                rows[name] = m.group(3).strip()
    return rows


def test_readme_lists_every_setting_with_its_default(clean_env, monkeypatch):
    rows = _readme_settings_table()
    missing = sorted(n.upper() for n in Settings.model_fields if n.upper() not in rows)
    assert not missing, f"settings missing from the README table: {missing}"
    unknown = sorted(set(rows) - {n.upper() for n in Settings.model_fields} - {"DIN_HOME", "DIN_URL"})
    assert not unknown, f"README lists settings that do not exist: {unknown}"
    monkeypatch.setenv("BUNDLE", "/b")
    defaults = Settings()
    for name, field in Settings.model_fields.items():
        value = getattr(defaults, name)
        if name in {"bundle", "intra_op_threads"} or value is None or value == ():
            continue  # required, machine-dependent, or "unset"
        shown = rows[name.upper()]
        plain = f"{value:g}" if isinstance(value, float) else str(value).lower() if isinstance(value, bool) else str(value)
        assert plain in shown.replace("`", "").replace(",", ""), f"{name.upper()}: README says {shown!r}, default is {plain}"


@pytest.mark.skipif(not hasattr(os, "sched_setaffinity") or (os.cpu_count() or 1) < 2, reason="needs CPU affinity and 2 cores")
def test_thread_pools_follow_the_cpu_affinity_not_the_hosts_cores():
    """A pinned process (a container's cpuset, taskset) sizes its pools to its cores."""
    code = (
        "import os; os.sched_setaffinity(0, {min(os.sched_getaffinity(0))});"
        "from model.cpu import cores; from model.train_dist import _default_threads;"
        "print(cores(), _default_threads(), os.cpu_count())"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT).stdout.split()
    assert out[:2] == ["1", "1"] and int(out[2]) >= 2


def test_a_store_timeout_past_the_request_deadline_is_flagged(clean_env, monkeypatch):
    """Valid (tests give the store room this way) but in production it turns a slow store's
    degraded answers into 503s: the service warns at start-up (service/app.py logs `doubtful`)."""
    monkeypatch.setenv("BUNDLE", "/b")
    assert Settings().doubtful() == []
    monkeypatch.setenv("STORE_TIMEOUT_MS", "500")
    monkeypatch.setenv("REQUEST_DEADLINE_MS", "400")
    (warning,) = Settings().doubtful()
    assert "STORE_TIMEOUT_MS (500) is not below REQUEST_DEADLINE_MS (400)" in warning


@pytest.mark.parametrize(
    "var,value,says",
    [
        ("ADMIN_TOKEN", "tökén-123456", "ADMIN_TOKEN: the admin token holds a character outside printable ASCII"),
        ("ADMIN_TOKEN", "token-€-123456", "ADMIN_TOKEN: the admin token holds a character outside printable ASCII"),
        ("ADMIN_TOKEN", "admin-token-123456\n", "ADMIN_TOKEN: the admin token holds a character outside printable ASCII"),
        ("ADMIN_TOKEN", "admin-token-123456 ", "ADMIN_TOKEN: the admin token begins or ends with whitespace"),
        ("API_KEYS", "rank-key-aaaaaaaa,kéy-123456", "API_KEYS: an API key holds a character outside printable ASCII"),
        ("API_KEYS", "rank-key-\x7faaaaaa", "API_KEYS: an API key holds a character outside printable ASCII"),
    ],
    ids=["admin-latin1", "admin-euro", "admin-newline", "admin-trailing-space", "key-latin1", "key-control"],
)
def test_secrets_that_an_http_header_cannot_carry_are_refused(clean_env, monkeypatch, var, value, says):
    """They used to be accepted, and then the usual clients could not authenticate: httpx (so
    `din reload`) refuses such a header, curl from a UTF-8 shell sends bytes that the service reads
    back as latin-1, and no client can send a character beyond latin-1; uvicorn answers 400 to a
    control character, and whitespace at either end is stripped from the header. Spaces and tabs
    inside arrive intact, and are kept."""
    monkeypatch.setenv("BUNDLE", "/b")
    monkeypatch.setenv(var, "a secret\twith spaces")
    kept = Settings().admin_token if var == "ADMIN_TOKEN" else Settings().api_keys[0]
    assert kept.get_secret_value() == "a secret\twith spaces"
    monkeypatch.setenv(var, value)
    with pytest.raises(ValidationError) as e:
        Settings()
    msg = settings_error_message(e.value)
    assert says in msg and "\n" not in msg
    assert value.strip() not in msg and "123456" not in msg and "aaaa" not in msg  # the secret is not shown


def test_din_serve_with_a_non_ascii_admin_token_prints_one_line_and_exits_2(tmp_path):
    env = {k: v for k, v in os.environ.items() if k.upper() not in {n.upper() for n in Settings.model_fields}}
    env |= {"PYTHONPATH": str(ROOT), "DIN_HOME": str(tmp_path / "din"), "ADMIN_TOKEN": "tökén-123456"}
    r = subprocess.run(
        [sys.executable, "-m", "service.cli", "serve", "--bundle", str(tmp_path / "nothing")],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60,
    )
    assert r.returncode == 2, r.stderr
    assert r.stderr.strip() == "error: invalid settings: ADMIN_TOKEN: the admin token holds a character outside " \
        "printable ASCII (non-ASCII or a control character), which an HTTP header cannot carry"

