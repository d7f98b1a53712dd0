"""The Dockerfile and docker-compose.yml, checked without a Docker engine.

What can be checked here is checked for real: the compose file against the Compose
Specification schema (../shared/compose-spec.json), every target and image it names
against the Dockerfile, the pins against pyproject.toml and the installed onnxruntime, and
every command line the two files run is run here, outside Docker: the trainer job end to
end on tiny data against the tests' Redis, then the ranker's command until its own
HEALTHCHECK passes, a /rank over HTTP, and a SIGTERM that must stop it cleanly.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
import tomllib
from pathlib import Path

import httpx
import numpy as np
import pytest

yaml = pytest.importorskip("yaml", reason="PyYAML is needed to read docker-compose.yml")

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILE = ROOT / "Dockerfile"
COMPOSE = ROOT / "docker-compose.yml"
COMPOSE_SCHEMA = ROOT.parent / "shared" / "compose-spec.json"
VENV_BIN = Path(sys.executable).parent

SERVING_TARGETS = ("cpu", "gpu")


# --- reading the two files ----------------------------------------------------------------

_INTERPOLATION = re.compile(
    r"\$(?:(?P<escaped>\$)|\{(?P<braced>[A-Za-z_][A-Za-z0-9_]*)(?:(?P<op>:?[-?+])(?P<arg>[^}]*))?\}"
    r"|(?P<plain>[A-Za-z_][A-Za-z0-9_]*))"
)


def interpolate(value, env: dict[str, str]):
    """Compose's variable interpolation (${X}, ${X:-d}, ${X-d}, ${X:+v}, $X, $$), recursively."""
    if isinstance(value, dict):
        return {k: interpolate(v, env) for k, v in value.items()}
    if isinstance(value, list):
        return [interpolate(v, env) for v in value]
    if not isinstance(value, str):
        return value

    def sub(m: re.Match) -> str:
        if m.group("escaped"):
            return "$"
        name = m.group("braced") or m.group("plain")
        op, arg = m.group("op"), m.group("arg") or ""
        present, val = name in env, env.get(name, "")
        if op == ":-":
            return val if val else arg
        if op == "-":
            return val if present else arg
        if op == ":+":
            return arg if val else ""
        if op == "+":
            return arg if present else ""
        if op in (":?", "?"):
            if not val:
                raise AssertionError(f"required variable {name} is unset: {arg}")
            return val
        return val

    return _INTERPOLATION.sub(sub, value)


def load_compose(env: dict[str, str] | None = None) -> dict:
    """The compose model as `docker compose config` sees it with no variables set (defaults)."""
    return interpolate(yaml.safe_load(COMPOSE.read_text()), env or {})


def dockerfile_instructions() -> list[tuple[str | None, str, str]]:
    """(stage, INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    logical, buf = [], ""
    for raw in DOCKERFILE.read_text().splitlines():
        line = raw.strip()
        if not buf and (not line or line.startswith("#")):
            continue
        if line.startswith("#"):
            continue
        if line.endswith("\\"):
            buf += line[:-1] + " "
            continue
        logical.append(buf + line)
        buf = ""
    out, stage = [], None
    for line in logical:
        word, _, rest = line.partition(" ")
        word = word.upper()
        if word == "FROM":
            m = re.match(r"(?P<image>\S+)(?:\s+AS\s+(?P<name>\S+))?", rest.strip(), re.IGNORECASE)
            stage = m.group("name") if m and m.group("name") else None
        out.append((stage, word, rest.strip()))
    return out


def stages() -> dict[str, str]:
    """Stage name -> its FROM image (with ARG defaults substituted)."""
    args = build_arg_defaults()
    result = {}
    for stage, word, rest in dockerfile_instructions():
        if word == "FROM" and stage:
            image = rest.split()[0]
            result[stage] = re.sub(r"\$\{(\w+)\}", lambda m: args.get(m.group(1), m.group(0)), image)
    return result


def build_arg_defaults() -> dict[str, str]:
    """Global ARG defaults (those before the first FROM)."""
    defaults = {}
    for stage, word, rest in dockerfile_instructions():
        if word == "FROM":
            break
        if word == "ARG" and "=" in rest:
            name, _, value = rest.partition("=")
            defaults[name.strip()] = value.strip().strip('"')
    return defaults


def stage_lines(name: str, word: str) -> list[str]:
    return [rest for stage, w, rest in dockerfile_instructions() if stage == name and w == word]


def exec_form(rest: str) -> list[str]:
    """The JSON array of an exec-form CMD / HEALTHCHECK CMD; fails on the shell form."""
    value = json.loads(rest)
    assert isinstance(value, list) and all(isinstance(v, str) for v in value), rest
    return value


def stage_cmd(name: str) -> list[str]:
    cmds = stage_lines(name, "CMD")
    assert cmds, f"stage {name} has no CMD"
    return exec_form(cmds[-1])


def stage_healthcheck(name: str) -> list[str]:
    checks = stage_lines(name, "HEALTHCHECK")
    assert checks, f"stage {name} has no HEALTHCHECK"
    _, _, cmd = checks[-1].partition(" CMD ")
    return exec_form(cmd)


def stage_env(name: str) -> dict[str, str]:
    env = {}
    for rest in stage_lines(name, "ENV"):
        for token in shlex.split(rest):
            key, _, value = token.partition("=")
            env[key] = value
    return env


def compose_command_lines(compose: dict) -> list[list[str]]:
    """Every command line the compose services run (exec lists; `sh -c` scripts split per line)."""
    lines = []
    for svc in compose["services"].values():
        cmd = svc.get("command")
        if not cmd:
            continue
        cmd = shlex.split(cmd) if isinstance(cmd, str) else cmd
        if cmd[0] in ("sh", "bash") and cmd[1].startswith("-") and "c" in cmd[1]:
            for line in cmd[2].splitlines():
                line = line.strip()
                if line and not line.startswith(("if ", "fi", "then", "else", "#")):
                    lines.append(shlex.split(line))
        else:
            lines.append(list(cmd))
    return lines


# --- static checks ----------------------------------------------------------------------


def test_compose_file_is_valid_against_the_compose_specification():
    jsonschema = pytest.importorskip("jsonschema")
    if not COMPOSE_SCHEMA.is_file():
        pytest.skip(f"{COMPOSE_SCHEMA} is absent (../shared is not beside the project)")
    schema = json.loads(COMPOSE_SCHEMA.read_text())
    validator = jsonschema.Draft7Validator(schema)
    for name, model in (("as written", yaml.safe_load(COMPOSE.read_text())), ("interpolated", load_compose())):
        errors = sorted(validator.iter_errors(model), key=lambda e: list(e.path))
        assert not errors, f"docker-compose.yml ({name}) breaks the spec: " + "; ".join(
            f"{'/'.join(map(str, e.path))}: {e.message}" for e in errors[:5]
        )
    # and the validator does reject a broken file, so the check above can fail
    broken = load_compose()
    broken["services"]["ranker"]["depends_on"]["redis"]["condition"] = "service_ready"
    assert any(True for _ in validator.iter_errors(broken))


def test_dockerfile_defines_every_target_the_compose_file_builds():
    defined = stages()
    assert {"cpu", "gpu", "trainer", "loadtest"} <= set(defined), defined
    compose = load_compose()
    built = {name: svc["build"]["target"] for name, svc in compose["services"].items() if "build" in svc}
    assert built == {
        "trainer": "trainer", "ranker": "cpu", "ranker-gpu": "gpu", "locust": "loadtest", "locust-worker": "loadtest",
    }  # fmt: skip
    assert set(built.values()) <= set(defined)
    # one image name per target, so `docker compose build` never tags two targets alike
    image_of = {}
    for name, svc in compose["services"].items():
        if "build" in svc:
            image_of.setdefault(svc["image"], set()).add(svc["build"]["target"])
    assert all(len(targets) == 1 for targets in image_of.values()), image_of
    # build args the compose file passes are ARGs the Dockerfile declares
    declared = set(build_arg_defaults())
    for name, svc in compose["services"].items():
        assert set(svc.get("build", {}).get("args", {})) <= declared, name


def test_serving_images_are_non_root_torch_free_and_exec_form():
    instructions = dockerfile_instructions()
    for target in (*SERVING_TARGETS, "trainer", "loadtest"):
        users = stage_lines(target, "USER")
        assert users and users[-1] not in ("root", "0"), f"{target} must run as a non-root user"
    for target in SERVING_TARGETS:
        installs = " ".join(r for s, w, r in instructions if s == target and w == "RUN")
        assert "pip install" in installs
        assert "[train]" not in installs and "torch==" not in installs, f"{target} must not install torch"
        assert "[loadtest]" not in installs
        # no flags: the server binds what the ENV says, the ENV the healthcheck reads too, and
        # `docker run -e PORT=...` moves both (a flag would win over the environment)
        assert stage_cmd(target) == ["din", "serve"]
        env = stage_env(target)
        assert env["HOST"] == "0.0.0.0" and env["BUNDLE"] == "/bundles/latest" and env["PORT"] in stage_lines(target, "EXPOSE")
        health = stage_healthcheck(target)
        assert health[:2] == ["python", "-c"] and "/readyz" in health[2]
    trainer_installs = " ".join(r for s, w, r in instructions if s == "trainer" and w == "RUN")
    assert "[train]" in trainer_installs and "${TORCH_INDEX_URL}" in trainer_installs


def test_every_copied_path_exists_and_is_in_the_build_context():
    """A COPY of a missing or .dockerignore'd path fails `docker build`; catch it here."""
    import fnmatch

    ignored = [
        p.strip() for p in (ROOT / ".dockerignore").read_text().splitlines() if p.strip() and not p.startswith("#")
    ]
    sources = []
    for _stage, word, rest in dockerfile_instructions():
        if word == "COPY" and not rest.startswith("--from"):
            sources += rest.split()[:-1]
    assert {"pyproject.toml", "README.md", "model", "service", "feature_store", "loadtest"} <= set(sources)
    for src in sources:
        assert (ROOT / src).exists(), f"Dockerfile copies {src}, which does not exist"
        for pattern in ignored:
            bare = pattern.removeprefix("**/").rstrip("/")
            assert not (fnmatch.fnmatch(src, bare) or src.startswith(bare + "/")), f".dockerignore drops {src} ({pattern})"
    # the project's packages are exactly what the wheel stage copies
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    packages = {p.rstrip("*") for p in pyproject["tool"]["setuptools"]["packages"]["find"]["include"]}
    assert packages <= set(sources), f"packages not copied into the image: {packages - set(sources)}"


def test_torch_pin_agrees_with_pyproject():
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    pins = [r for r in pyproject["project"]["optional-dependencies"]["train"] if r.replace(" ", "").startswith("torch==")]
    assert len(pins) == 1, pins
    pinned = pins[0].split("==", 1)[1].strip()
    assert build_arg_defaults()["TORCH_VERSION"] == pinned
    args = load_compose()["services"]["trainer"]["build"]["args"]
    assert args["TORCH_VERSION"] == pinned
    assert args["TORCH_INDEX_URL"] == build_arg_defaults()["TORCH_INDEX_URL"]



def test_onnxruntime_gpu_is_pinned_to_the_minor_release_installed_and_built_for_the_image():
    """The images install whatever pyproject.toml admits: without an upper bound a newer
    onnxruntime-gpu, built for another CUDA major, would break the GPU image one day."""
    from packaging.requirements import Requirement
    from packaging.version import Version

    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    (req,) = [Requirement(r) for r in pyproject["project"]["dependencies"] if Requirement(r).name == "onnxruntime-gpu"]
    allowed = [v for v in (f"1.{minor}.{patch}" for minor in range(15, 60) for patch in (0, 9)) if v in req.specifier]
    assert allowed and {Version(v).minor for v in allowed} == {Version(allowed[0]).minor}, f"{req} admits several minor releases"
    info = pytest.importorskip("onnxruntime.capi.build_and_package_info")
    if getattr(info, "package_name", "") == "onnxruntime-gpu":
        assert info.__version__ in req.specifier, f"installed {info.__version__}, pyproject.toml asks for {req}"

def test_gpu_base_image_matches_the_onnxruntime_gpu_build():
    """onnxruntime-gpu loads libcudart/libcublas of one CUDA major and cuDNN 9: the base must ship them."""
    base = stages()["gpu"]
    m = re.fullmatch(r"nvidia/cuda:(\d+)\.(\d+)\.(\d+)-cudnn-runtime-ubuntu(\d+\.\d+)", base)
    assert m, f"gpu base {base!r} is not an nvidia/cuda X.Y.Z-cudnn-runtime-ubuntuNN.NN image"
    compose_gpu = load_compose()["services"]["ranker-gpu"]
    assert compose_gpu["build"]["args"]["CUDA_IMAGE"] == base
    info = pytest.importorskip("onnxruntime.capi.build_and_package_info")
    if getattr(info, "package_name", "") != "onnxruntime-gpu":
        pytest.skip("onnxruntime-gpu is not installed here: nothing to match the CUDA base against")
    assert int(m.group(1)) == int(info.cuda_version.split(".")[0]), (
        f"{base} ships CUDA {m.group(1)}, onnxruntime-gpu {info.__version__} needs CUDA {info.cuda_version}"
    )
    devices = compose_gpu["deploy"]["resources"]["reservations"]["devices"]
    assert devices[0]["driver"] == "nvidia" and "gpu" in devices[0]["capabilities"]
    assert compose_gpu["profiles"] == ["gpu"]


def test_compose_wiring_redis_trainer_ranker_locust():
    compose = load_compose()
    services = compose["services"]
    redis = services["redis"]
    assert redis["image"] == "redis:7"
    assert redis["command"][redis["command"].index("--appendonly") + 1] == "yes"
    volume = redis["volumes"][0].split(":")
    assert volume[1] == "/data" and volume[0] in compose["volumes"], "AOF must live on a named volume"
    assert redis["healthcheck"]["test"] == ["CMD", "redis-cli", "ping"]
    ranker = services["ranker"]
    assert ranker["depends_on"] == {
        "redis": {"condition": "service_healthy"},
        "trainer": {"condition": "service_completed_successfully"},
    }
    assert ranker["ports"] == ["8000:8000"]
    assert ranker["healthcheck"]["test"][:2] == ["CMD", "python"]
    assert services["trainer"]["restart"] == "no"
    # the ranker serves what the trainer writes: same volume, the trainer's `latest`
    assert ranker["volumes"] == ["bundles:/bundles:ro"] and services["trainer"]["volumes"] == ["bundles:/bundles"]
    assert ranker["command"] == stage_cmd("cpu") == stage_cmd("gpu")
    locust = services["locust"]
    assert locust["ports"] == ["8089:8089"] and locust["command"] == ["locust", "--master"]
    assert services["locust-worker"]["command"][:2] == ["locust", "--worker"]
    assert services["locust-worker"]["deploy"]["replicas"] == "2"
    # the locustfile path the containers use is where the loadtest image copies it
    copies = [r.split() for r in stage_lines("loadtest", "COPY")]
    assert ["loadtest/locustfile.py", locust["environment"]["LOCUST_LOCUSTFILE"]] in copies
    assert (ROOT / "loadtest" / "locustfile.py").is_file()


def test_every_service_setting_is_in_the_ranker_environment_with_its_default():
    from service.settings import Settings

    env = load_compose()["services"]["ranker"]["environment"]
    missing = [name.upper() for name in Settings.model_fields if name.upper() not in env]
    assert not missing, f"settings missing from the ranker's environment in docker-compose.yml: {missing}"
    differs_on_purpose = {"bundle", "redis_url", "host"}  # the container's paths and addresses
    for name, field in Settings.model_fields.items():
        if name in differs_on_purpose:
            continue
        value = env[name.upper()]
        if field.default_factory is not None or field.default is None:
            assert value is None, f"{name.upper()}: leave it unset (null) so the service's own default applies"
        elif isinstance(field.default, bool):
            assert str(value).lower() == str(field.default).lower(), f"{name.upper()}={value!r}, the service's default is {field.default!r}"
        elif isinstance(field.default, (int, float)):
            assert float(value) == float(field.default), f"{name.upper()}={value!r}, the service's default is {field.default!r}"
        else:
            assert str(value) == str(field.default), f"{name.upper()}={value!r}, the service's default is {field.default!r}"
    assert env["BUNDLE"] == "/bundles/latest" and env["PORT"] == "8000"


def _din_envvars(subcommand: str) -> set[str]:
    """The environment variables a `din` subcommand reads (its options' envvar=...)."""
    import typer

    from service.cli import app

    command = typer.main.get_command(app).commands[subcommand]
    names = set()
    for param in command.params:
        envvar = getattr(param, "envvar", None)
        names.update([envvar] if isinstance(envvar, str) else envvar or [])
    return names


def test_the_trainer_loads_the_redis_and_namespace_the_ranker_reads():
    """A setting both the trainer's `din load` and the ranker read (REDIS_URL, REDIS_NAMESPACE,
    REDIS_CLUSTER) reaches both from the same variable: set REDIS_NAMESPACE and the data is loaded
    where the ranker looks for it."""
    user_env = {"REDIS_URL": "redis+cluster://cache:7000", "REDIS_NAMESPACE": "tenant-a", "REDIS_CLUSTER": "true"}
    services = load_compose(user_env)["services"]
    trainer, ranker = services["trainer"]["environment"], services["ranker"]["environment"]
    lines = [line for line in compose_command_lines({"services": {"trainer": services["trainer"]}}) if line[:1] == ["din"]]
    read_by_trainer = set().union(*(_din_envvars(line[1]) for line in lines))
    shared = read_by_trainer & set(ranker)
    assert {"REDIS_URL", "REDIS_NAMESPACE", "REDIS_CLUSTER"} <= shared, shared
    for name in sorted(shared):
        assert name in trainer, f"the trainer's `din load` reads {name}, the ranker gets it, the trainer does not"
        assert trainer[name] == ranker[name], f"{name}: trainer {trainer[name]!r}, ranker {ranker[name]!r}"
    defaults = load_compose()["services"]
    for name in sorted(shared):  # and with nothing set, both get the same default
        assert defaults["trainer"]["environment"][name] == defaults["ranker"]["environment"][name], name


def _din_subcommands_in(lines: list[list[str]]) -> set[str]:
    return {line[1] for line in lines if line and line[0] == "din"}


HELP_ENV = {**os.environ, "COLUMNS": "200", "TERM": "dumb", "NO_COLOR": "1"}


def test_every_din_subcommand_the_images_run_exists():
    lines = compose_command_lines(load_compose())
    lines += [stage_cmd(t) for t in ("cpu", "gpu", "trainer")]
    subcommands = _din_subcommands_in(lines)
    assert subcommands == {"serve", "train", "load"}, subcommands
    for sub in sorted(subcommands):
        result = subprocess.run(
            [str(VENV_BIN / "din"), sub, "--help"], capture_output=True, text=True, timeout=60, env=HELP_ENV
        )
        assert result.returncode == 0, f"`din {sub} --help` failed:\n{result.stderr[-2000:]}"
        # every --option these command lines pass is one the subcommand knows
        for line in lines:
            if line[:2] == ["din", sub]:
                for opt in (t for t in line if t.startswith("--")):
                    assert re.search(rf"(?<![\w-]){re.escape(opt)}(?![\w-])", result.stdout), f"din {sub}: no {opt}"


def test_python_and_locust_command_lines_parse():
    """`python -m ...` and `locust ...` lines of both files accept their arguments (with --help)."""
    checked = []
    for line in compose_command_lines(load_compose()) + [stage_cmd("loadtest")]:
        if line[0] == "locust":
            argv = [sys.executable, "-m", "locust", *line[1:], "--help"]
        elif line[0] == "python":
            argv = [sys.executable, *line[1:], "--help"]
        else:
            continue
        result = subprocess.run(argv, capture_output=True, text=True, timeout=60, env=HELP_ENV)
        assert result.returncode == 0, f"{line}: {result.stderr[-1000:]}"
        checked.append(line[0] if line[0] == "locust" else " ".join(line[:4]))
    assert sorted(set(checked)) == ["locust", "python -m loadtest.run population"], checked


def test_interpolation_helper_follows_compose_rules():
    assert interpolate("${A:-x}", {}) == "x" and interpolate("${A:-x}", {"A": ""}) == "x"
    assert interpolate("${A-x}", {"A": ""}) == "" and interpolate("${A}", {"A": "1"}) == "1"
    assert interpolate("$${A:+--a $${A}}", {}) == "${A:+--a ${A}}"
    assert interpolate("${A:+on}", {"A": "1"}) == "on" and interpolate("$A/b", {"A": "p"}) == "p/b"


# --- the command lines, run outside Docker ---------------------------------------------------


def _trainer_script(compose: dict) -> str:
    cmd = compose["services"]["trainer"]["command"]
    assert cmd[:2] == ["sh", "-euc"], cmd
    return cmd[2]


def _replace_paths(args: list[str], mapping: dict[str, str]) -> list[str]:
    out = []
    for a in args:
        for old, new in mapping.items():
            if a == old or a.startswith(old + "/"):
                a = new + a[len(old) :]
        out.append(a)
    return out


@pytest.fixture(scope="module")
def tiny_log(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("compose-data") / "log.parquet"
    result = subprocess.run(
        [str(VENV_BIN / "din"), "synth", "--users", "60", "--items", "40", "--categories", "8", "--seed", "3",
         "--out", str(path)],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    return path


def test_trainer_job_then_ranker_run_as_the_compose_file_says(tiny_log, redis_url, tmp_path):
    from model.bundle import load_bundle
    from model.data.log import read_log

    compose = load_compose()
    root = tmp_path / "bundles"
    env = {k: str(v) for k, v in compose["services"]["trainer"]["environment"].items() if v is not None}
    env.update(
        BUNDLE_ROOT=str(root), TRAIN_DATA=f"events:{tiny_log}", TRAIN_EPOCHS="1", REDIS_URL=redis_url,
        PATH=f"{VENV_BIN}{os.pathsep}{os.environ['PATH']}", HOME=str(tmp_path), DIN_HOME=str(tmp_path / "din"),
    )  # fmt: skip
    script = _trainer_script(compose)

    def trainer() -> subprocess.CompletedProcess:
        return subprocess.run(["sh", "-euc", script], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=600)

    first = trainer()
    assert first.returncode == 0, f"trainer job failed:\n{first.stdout[-2000:]}\n{first.stderr[-3000:]}"
    train_json = json.loads(first.stdout.strip().splitlines()[0])  # `din train --json`: one object
    bundle = load_bundle(root / "latest")
    assert Path(train_json["bundle"]).resolve() == (root / "latest").resolve()
    log = read_log(tiny_log)
    population = json.loads((root / "loadtest-population.json").read_text())
    assert sorted(population["users"]) == np.unique(log.user_id).tolist()
    assert sorted(population["items"]) == np.unique(log.item_id).tolist()

    # a restart of the job keeps the bundle (no retraining) and reloads Redis
    second = trainer()
    assert second.returncode == 0, second.stderr[-3000:]
    bundles = [p.name for p in root.iterdir() if p.is_dir() and not p.is_symlink() and not p.name.startswith(".")]
    assert bundles == [bundle.path.resolve().name]

    # the ranker: the compose command and environment, paths and port mapped to this machine
    from feature_store.embedded import free_port

    port = free_port()
    ranker = compose["services"]["ranker"]
    cmd = ranker["command"]
    assert cmd == ["din", "serve"]  # where and what it serves: the environment, set below as compose and the image would
    renv = {k: str(v) for k, v in ranker["environment"].items() if v is not None}
    renv.update(
        BUNDLE=str(root / "latest"), HOST="127.0.0.1", PORT=str(port), REDIS_URL=redis_url,
        PATH=env["PATH"], HOME=str(tmp_path), DIN_HOME=str(tmp_path / "din"),
    )  # fmt: skip
    health = [a.replace("8000", str(port)) for a in ranker["healthcheck"]["test"][1:]]
    image_health = stage_healthcheck("cpu")
    log_file = (tmp_path / "ranker.log").open("w")
    proc = subprocess.Popen(cmd, env=renv, cwd=tmp_path, stdout=log_file, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 180
        while subprocess.run(health, env=renv, capture_output=True, timeout=30).returncode != 0:
            assert proc.poll() is None, f"ranker exited {proc.returncode}:\n{(tmp_path / 'ranker.log').read_text()[-3000:]}"
            assert time.monotonic() < deadline, "ranker not ready after 180 s"
            time.sleep(0.5)
        # the image's own HEALTHCHECK (reads PORT from the environment) agrees
        assert subprocess.run(image_health, env=renv, capture_output=True, timeout=30).returncode == 0

        user = int(population["users"][0])
        n_events = int((log.user_id == user).sum())
        items = population["items"][:12]
        cates = population["item_cates"][:12]
        body = {"user_id": user, "candidates": [{"item_id": i, "cate_id": c} for i, c in zip(items, cates)]}
        response = httpx.post(f"http://127.0.0.1:{port}/rank", json=body, timeout=30)
        assert response.status_code == 200, response.text
        payload = response.json()
        assert payload["model_version"] == bundle.model_version
        assert payload["history_length"] == min(n_events, bundle.spec.max_history)
        assert payload["degraded"] is False
        ctr = [r["ctr"] for r in payload["ranked"]]
        assert sorted(r["item_id"] for r in payload["ranked"]) == sorted(items)
        assert ctr == sorted(ctr, reverse=True)
        unknown = httpx.post(f"http://127.0.0.1:{port}/rank", json=body | {"user_id": 10**12}, timeout=30).json()
        assert unknown["history_length"] == 0

        # `docker stop` sends SIGTERM to the exec-form CMD: the server must run its shutdown and
        # exit by itself (uvicorn re-raises the signal once it has drained: status -SIGTERM)
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(timeout=30)
        server_log = (tmp_path / "ranker.log").read_text()
        assert code in (0, -signal.SIGTERM), server_log[-3000:]
        assert "Application shutdown complete" in server_log
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        log_file.close()
