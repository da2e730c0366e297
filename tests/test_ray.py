"""llorch on Ray Serve (llorch.ray, docs/scaling-out.md): a local two-node Ray cluster on this machine.

One module-wide cluster (`ray.cluster_utils.Cluster`: a head and one worker node, 1 CPU each) serves the
application with 2 model replicas of 1 kernel thread and 1 CPU each, so each node holds one replica. The
tests run in order, the destructive ones last: killing a replica, then removing the worker node. Every
client call has a timeout; the fixture stops the cluster whatever happens.
"""

from __future__ import annotations

import concurrent.futures
import glob
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid

import pytest

# llorch-cpud's test helpers, and its fixtures: the long tiny checkpoint and the in-process model (1 thread)
from test_server import (LONG_TOKENS, CallbackReceiver, execute, free_port, greedy_text, job, long_job, model, model_path,
                         start_in_background)

httpx = pytest.importorskip("httpx")
SERVE_TIMEOUT_S = 120     # a deployment or a recovery, on a loaded 2-core machine
APP = "llorch"


@pytest.fixture(scope="module", autouse=True)
def ray_temp_dir():
    """Ray's sessions (sockets, logs) in a directory of their own, removed at the end, not in /tmp/ray. Its
    path stays short: Unix socket paths inside it are limited to 107 bytes."""
    directory = tempfile.mkdtemp(prefix="llorch-ray-")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("RAY_TMPDIR", directory)   # read by Ray's nodes and by llorch-serve's subprocesses
        yield directory
    shutil.rmtree(directory, ignore_errors=True)


def test_core_llorch_and_llorch_cpud_never_import_ray():
    code = "import sys, llorch, llorch.server, llorch.cli; sys.exit('ray' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


def llorch_serve(*args: str, block_ray: bool = False) -> subprocess.CompletedProcess:
    prelude = "import sys; sys.modules['ray'] = None; " if block_ray else "import sys; "
    code = prelude + f"from llorch.ray import main; sys.exit(main({list(args)!r}))"
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=180)


@pytest.mark.parametrize("args, message", [
    (["--model", "m", "--replicas", "0"], "replicas must be >= 1, got 0"),
    (["--model", "m", "--threads", "0"], "threads must be >= 1, got 0"),
    (["--model", "m", "--min-replicas", "1"], "min_replicas and max_replicas go together"),
    (["--model", "m", "--min-replicas", "3", "--max-replicas", "2"], "min_replicas 3 exceeds max_replicas 2"),
    (["--model", "m", "--port", "0"], "--port must be 1 to 65535, got 0"),
    (["--model", "m", "--replicas", "two"], "argument --replicas: invalid int value: 'two'"),
    (["--model", "m", "--address", "127.0.0.1:1"], "cannot reach the Ray cluster 127.0.0.1:1: [Errno 111]"),
    (["--model", "m", "--address", "head"], "cannot reach the Ray cluster head: expected auto, HOST:PORT or"),
    (["--model", "m", "--host", "0.0.0.0"], "--host 0.0.0.0 is reachable from other machines: set an API key"),
    (["--model", "m", "--callback-timeout", "0"], "callback_timeout must be > 0, got 0.0"),
])
def test_llorch_serve_bad_options_exit_2_with_one_line(args, message):
    pytest.importorskip("ray.serve", reason="the ray extra (ray[serve]) is not installed")
    done = llorch_serve(*args)
    assert done.returncode == 2 and done.stderr.strip().splitlines()[-1].startswith(f"llorch-serve: error: {message}")


def test_llorch_serve_without_the_ray_extra_says_how_to_install_it():
    done = llorch_serve("--model", "m", block_ray=True)
    assert done.returncode == 2
    assert done.stderr == "llorch-serve: error: the ray extra is not installed (ray is missing): pip install 'llorch[ray]'\n"


def test_llorch_serve_on_a_machine_with_too_few_cpus_exits_2():
    pytest.importorskip("ray.serve", reason="the ray extra (ray[serve]) is not installed")
    cpus = os.cpu_count()
    done = llorch_serve("--model", "m", "--replicas", str(cpus + 1), "--port", str(free_port()))
    assert done.returncode == 2
    assert done.stderr.strip().splitlines()[-1] == (f"llorch-serve: error: {cpus + 1} replicas of 1 CPUs need "
                                                    f"{cpus + 1} CPUs; this machine has {cpus}")


def test_llorch_serve_with_a_model_no_replica_can_load_exits_2_naming_the_error(tmp_path):
    pytest.importorskip("ray.serve", reason="the ray extra (ray[serve]) is not installed")
    done = llorch_serve("--model", str(tmp_path / "absent"), "--port", str(free_port()), "--log-level", "error")
    assert done.returncode == 2
    assert done.stderr.strip().splitlines()[-1] == ("llorch-serve: error: the application did not start: "
                                                    f"llorch.config.CheckpointError: {tmp_path / 'absent'}: "
                                                    "no such file or directory")


def test_llorch_serve_enforces_its_api_key_and_host_check_in_the_replicas_guard(model_path, tmp_path):
    """llorch-serve --api-key-file on a local Ray: the replica's own guard (llorch-cpud's) refuses a request
    without the key, with a wrong one, or naming another Host; GET /health stays open."""
    pytest.importorskip("ray.serve", reason="the ray extra (ray[serve]) is not installed")
    key_file, port = tmp_path / "key", free_port()
    key_file.write_text("s3cret\n")
    url, auth = f"http://127.0.0.1:{port}", {"Authorization": "Bearer s3cret"}
    args = ["--model", model_path, "--port", str(port), "--threads", "1", "--api-key-file", str(key_file),
            "--log-level", "error"]
    with open(tmp_path / "serve.log", "w") as log:
        process = subprocess.Popen([sys.executable, "-c", f"import sys; from llorch.ray import main; "
                                    f"sys.exit(main({args!r}))"], stdout=log, stderr=subprocess.STDOUT)
    try:
        def serving() -> bool:   # its line says so once it waits for a signal: an earlier SIGINT exits 130
            log = (tmp_path / "serve.log").read_text()
            assert process.poll() is None, log
            return "llorch-serve: serving" in log
        wait_until(serving, "llorch-serve serving")
        assert httpx.get(url + "/health", timeout=30).json()["model_loaded"]   # no key needed
        body = job("keyed", max_tokens=4)
        assert httpx.post(url + "/execute", json=body, timeout=30).status_code == 401
        assert execute(url, body, headers={"Authorization": "Bearer wrong"}).status == 401
        assert httpx.get(url + "/v1/models", timeout=30).status_code == 401
        stream = execute(url, body, headers=auth)
        assert stream.status == 200 and stream.terminal[0] == "end" and len(stream.tokens) == 4
        assert httpx.get(url + "/v1/models", headers=auth, timeout=30).status_code == 200
        elsewhere = httpx.post(url + "/execute", json=body, headers={**auth, "Host": "attacker.example"}, timeout=30)
        assert elsewhere.status_code == 400 and elsewhere.json()["errors"][0]["field"] == "host"
    finally:
        process.send_signal(signal.SIGINT)
        try:
            process.wait(timeout=120)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    assert process.returncode == 0, (tmp_path / "serve.log").read_text()


def test_app_builder_options_from_strings_and_bad_ones():
    lr = pytest.importorskip("llorch.ray")
    options = lr.Options.from_args({"model": "m", "replicas": "2", "threads": "1", "num_cpus": "0.5"})
    assert (options.replicas, options.threads, options.cpus) == (2, 1, 0.5)
    assert "--draft lookup" in " ".join(options.worker_argv("w"))
    assert "--draft none" in " ".join(lr.Options.from_args({"model": "m", "draft": "none"}).worker_argv("w"))
    for args, message in (({"replicas": 2}, "model is required"), ({"model": "m", "replica": 2}, "unknown option 'replica'"),
                          ({"model": "m", "draft": "ngram"}, "draft must be one of lookup, none, got 'ngram'"),
                          ({"model": "m", "replicas": "two"}, "replicas must be an integer, got 'two'"),
                          ({"model": "m", "max_batch": 2.5}, "max_batch must be an integer, got 2.5")):
        with pytest.raises(ValueError, match=message):
            lr.Options.from_args(args)


def test_the_example_config_file_is_a_valid_serve_config_with_valid_args():
    schema = pytest.importorskip("ray.serve.schema", reason="the ray extra (ray[serve]) is not installed")
    import yaml
    import llorch.ray as lr
    with open(os.path.join(os.path.dirname(__file__), "..", "docs", "serve-config.yaml")) as f:
        config = schema.ServeDeploySchema.model_validate(yaml.safe_load(f))
    [application] = config.applications
    assert application.import_path == "llorch.ray:app_builder"
    assert lr.Options.from_args(application.args).replicas == 2


# ---- the application on a two-node cluster ----

class App:
    def __init__(self, cluster, worker_node, url: str, model_path: str, callback) -> None:
        self.cluster, self.worker_node, self.url = cluster, worker_node, url
        self.model_path, self.callback = model_path, callback

    def replica_actor_names(self) -> list[str]:
        import ray
        return sorted(a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
                      if a["name"].startswith(f"SERVE_REPLICA::{APP}#LlorchModel#"))

    def running_replicas(self) -> int:
        from ray import serve
        status = serve.status().applications[APP].deployments["LlorchModel"]
        return status.replica_states.get("RUNNING", 0)

    def log_line(self, prefix: str) -> str | None:
        """The first line of the cluster's worker logs that contains prefix (llorch's lines: replicas' stderr)."""
        logs = os.path.join(self.cluster.head_node.get_session_dir_path(), "logs")
        for path in glob.glob(os.path.join(logs, "worker-*.err")):
            with open(path, errors="replace") as f:
                found = next((line for line in f if prefix in line), None)
            if found:
                return found
        return None

    def board_stats(self) -> dict:
        from ray import serve
        return serve.get_deployment_handle("CancelBoard", app_name=APP).stats.remote().result(timeout_s=30)


@pytest.fixture(scope="module")
def app(model_path):
    ray = pytest.importorskip("ray", reason="the ray extra (ray[serve]) is not installed")
    serve = pytest.importorskip("ray.serve", reason="the ray extra (ray[serve]) is not installed")
    from ray.cluster_utils import Cluster
    import llorch.ray as lr

    callback = CallbackReceiver()
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1,
                                                            "include_dashboard": False})
    try:
        worker_node = cluster.add_node(num_cpus=1)
        ray.init(address=cluster.address, log_to_driver=False)
        port = free_port()
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        url = f"http://127.0.0.1:{port}"
        options = lr.Options.from_args({"model": model_path, "replicas": 2, "threads": 1, "num_cpus": 1,
                                        "grace_period": 1, "callback_url": callback.url, "public_url": url})
        serve.run(lr.build_app(options), name=APP, route_prefix="/")
        yield App(cluster, worker_node, url, model_path, callback)
    finally:
        ray.shutdown()
        cluster.shutdown()
        callback.shutdown()


def test_the_application_announces_itself_once(app, model):
    deadline = time.monotonic() + 30
    while not app.callback.bodies and time.monotonic() < deadline:
        time.sleep(0.1)
    [body] = app.callback.bodies
    assert body["worker_id"] == f"llorch-{uuid.uuid5(uuid.NAMESPACE_URL, app.url)}" and body["uri"] == app.url
    assert body["model_ref"] == app.model_path and body["memory_bytes"] >= model.weight_bytes


def test_health_models_and_validation_are_llorch_cpuds(app):
    health = httpx.get(app.url + "/health", timeout=30).json()
    assert health["status"] == "healthy" and health["model_loaded"] and health["max_batch"] == 8
    assert httpx.get(app.url + "/v1/models", timeout=30).json()["data"][0]["id"] == health["model"] == \
        os.path.basename(app.model_path)   # llorch-cpud's name for it, never its path
    refused = httpx.post(app.url + "/execute", content="{", headers={"Content-Type": "application/json"},
                         timeout=30)
    assert refused.status_code == 400 and refused.json()["errors"][0]["constraint"] == "json"
    unknown = httpx.post(app.url + "/cancel", json={"job_id": "nobody"}, timeout=30)
    assert unknown.status_code == 404 and unknown.json()["errors"][0]["field"] == "job_id"
    started = app.log_line(f"model {app.model_path} loaded")   # llorch-cpud's start-up line, from a replica
    assert started and ", 1 threads, SIMD " in started, started   # --threads, as its scheduler thread sees it


def test_16_concurrent_greedy_jobs_give_llorchs_own_tokens(app, model):
    prompts = [f"Request {i} says" + " more" * (i % 5) for i in range(16)]
    lengths = [8 + 3 * i for i in range(16)]
    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        streams = list(pool.map(lambda i: execute(app.url, job(f"many-{i}", prompts[i], lengths[i])), range(8)))
        completions = list(pool.map(lambda i: httpx.post(
            app.url + "/v1/completions", json={"prompt": prompts[i], "max_tokens": lengths[i], "temperature": 0},
            timeout=60), range(8, 16)))
    for i, stream in enumerate(streams):
        assert stream.status == 200 and stream.terminal[0] == "end", stream.events[-1]
        assert [t["i"] for t in stream.tokens] == list(range(len(stream.tokens)))
        assert stream.text == greedy_text(model, prompts[i], lengths[i])
    for i, response in enumerate(completions, start=8):
        assert response.status_code == 200, response.text
        assert response.json()["choices"][0]["text"] == greedy_text(model, prompts[i], lengths[i])


def test_cancel_reaches_the_replica_holding_the_job_wherever_it_lands(app):
    """The ingress sends a /cancel to any replica; cancels of jobs held by the other one go through the board.
    Rounds of 4 jobs go on until one cancel has been relayed (each lands on the wrong replica about half the
    time)."""
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        for round_no in range(6):
            running = [start_in_background(pool, app.url, long_job(f"cancel-{round_no}-{i}"), tokens=1)
                       for i in range(4)]
            for i, stream in enumerate(running):
                answer = httpx.post(app.url + "/cancel", json={"job_id": f"cancel-{round_no}-{i}"}, timeout=30)
                assert answer.status_code == 202, answer.text
                assert answer.json() == {"job_id": f"cancel-{round_no}-{i}", "status": "cancelling"}
            for stream in running:
                assert stream.result(timeout=30).terminal == ("error", {"code": "CANCELLED",
                                                                       "message": "cancelled by request"})
            if app.board_stats()["relayed"]:
                return
    pytest.fail(f"no cancel was relayed to another replica in 6 rounds: {app.board_stats()}")


def test_a_client_that_hangs_up_cancels_its_job_on_the_replica(app):
    """Serve cancels the ingress's call when the client leaves, and the tunnel the replica's: the job's line
    in the replica's log says CANCELLED, with fewer tokens out than asked."""
    stream = execute(app.url, long_job("hang-up"), on_event=lambda s: len(s.tokens) >= 1)
    assert stream.names[-1] == "token"
    line = wait_until(lambda: app.log_line("job hang-up:"), "the job's log line", timeout=30)
    assert "CANCELLED" in line and f" {LONG_TOKENS} out" not in line, line


def wait_until(condition, what: str, timeout: float = SERVE_TIMEOUT_S):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.5)
    pytest.fail(f"not {what} after {timeout} s")


def serves_greedy(app, model, prompt: str = "Still there?") -> bool:
    try:
        stream = execute(app.url, job(f"probe-{time.monotonic_ns()}", prompt, max_tokens=12))
    except httpx.HTTPError:
        return False
    return stream.status == 200 and stream.terminal[0] == "end" and stream.text == greedy_text(model, prompt, 12)


def test_killing_a_replica_ends_its_streams_cleanly_and_serve_restarts_it(app, model):
    import ray
    names = app.replica_actor_names()
    assert len(names) == 2
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        running = [start_in_background(pool, app.url, long_job(f"kill-{i}"), tokens=1) for i in range(8)]
        ray.kill(ray.get_actor(names[0], namespace="serve"), no_restart=True)
        ends = [stream.result(timeout=90).terminal for stream in running]   # bounded: never a hang
    failed = [data for name, data in ends if name == "error"]
    assert failed, "no stream was on the killed replica"
    assert all(data["code"] == "INFERENCE_FAILED" for data in failed), failed
    assert all(data["stop_reason"] == "MAX_TOKENS" for name, data in ends if name == "end")
    wait_until(lambda: serves_greedy(app, model), "serving after the kill")
    assert all(serves_greedy(app, model) for _ in range(4))
    wait_until(lambda: app.running_replicas() == 2 and names[0] not in app.replica_actor_names(),
               "2 replicas running again")


def test_losing_a_node_keeps_the_application_serving_from_the_other(app, model):
    app.cluster.remove_node(app.worker_node)
    wait_until(lambda: serves_greedy(app, model), "serving after the node loss")
    assert all(serves_greedy(app, model) for _ in range(4))
