"""The KubeRay manifests in k8s/: valid against the KubeRay CRDs, secure and pinned, running real ftray commands.

Schemas: the `v1` openAPIV3Schema of each CRD in ../shared/kuberay-crds/ (KubeRay's own CRDs). The API
server rejects unknown fields under kubectl's strict field validation, so objects with declared
properties are closed here too (`additionalProperties: false`) unless the CRD preserves unknown fields.
"""

from __future__ import annotations

import copy
import re
import shlex
from functools import cache
from pathlib import Path
from typing import Any, Iterator

import jsonschema
import pytest
import ray
import typer
import yaml

import ftray.cli
from ftray.config import load_spec
from ftray.tune.space import load_space, method_name, param_space, sample_spec

REPO = Path(__file__).resolve().parents[2]
K8S = REPO / "k8s"
CRDS = REPO.parent / "shared" / "kuberay-crds"
CRD_FILES = {"RayCluster": "ray.io_rayclusters.yaml", "RayJob": "ray.io_rayjobs.yaml", "RayService": "ray.io_rayservices.yaml"}
IMAGE_DIR = "/home/ray/ftray"  # the checkout inside the image (k8s/Dockerfile WORKDIR)


def documents() -> list[tuple[str, dict]]:
    """(file name, document) for every YAML document in k8s/."""
    return [(f.name, doc) for f in sorted(K8S.glob("*.yaml")) for doc in yaml.safe_load_all(f.read_text()) if doc]


def ray_documents() -> list[tuple[str, dict]]:
    return [(name, doc) for name, doc in documents() if doc["kind"] in CRD_FILES]


def doc_id(item: tuple[str, dict]) -> str:
    return f"{item[0]}:{item[1]['kind']}/{item[1]['metadata']['name']}"


RAY_DOCS = ray_documents()


def cluster_spec(doc: dict) -> dict:
    """The RayCluster spec inside a RayCluster, RayJob or RayService."""
    return {"RayCluster": lambda s: s, "RayJob": lambda s: s["rayClusterSpec"], "RayService": lambda s: s["rayClusterConfig"]}[doc["kind"]](doc["spec"])


def pod_templates(spec: dict) -> Iterator[tuple[str, dict]]:
    """(group name, pod spec) for the head and every worker group of a cluster spec."""
    yield "head", spec["headGroupSpec"]["template"]["spec"]
    for group in spec.get("workerGroupSpecs", []):
        yield group["groupName"], group["template"]["spec"]


def containers(node: Any) -> Iterator[dict]:
    """Every container and init container anywhere in a manifest."""
    if isinstance(node, dict):
        for key, value in node.items():
            if key in ("containers", "initContainers") and isinstance(value, list):
                yield from value
            else:
                yield from containers(value)
    elif isinstance(node, list):
        for item in node:
            yield from containers(item)


def gpus(container: dict) -> int:
    res = container.get("resources", {})
    return max(int(res.get(kind, {}).get("nvidia.com/gpu", 0)) for kind in ("requests", "limits"))


# --- schema ---------------------------------------------------------------------------------------

def kube_schema(node: Any) -> Any:
    """A CRD schema as plain JSON Schema: no `x-kubernetes-*` keys, declared objects closed."""
    if isinstance(node, list):
        return [kube_schema(n) for n in node]
    if not isinstance(node, dict):
        return node
    out = {k: kube_schema(v) for k, v in node.items() if not k.startswith("x-kubernetes-")}
    if "properties" in node and "additionalProperties" not in node and not node.get("x-kubernetes-preserve-unknown-fields"):
        out["additionalProperties"] = False
    return out


@cache
def crd_schema(kind: str) -> dict:
    path = CRDS / CRD_FILES[kind]
    if not path.exists():
        pytest.skip(f"KubeRay CRDs not found at {CRDS} (the shared/ folder beside the repository)")
    crd = yaml.load(path.read_text(), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))  # 60k lines
    (version,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
    return kube_schema(version["schema"]["openAPIV3Schema"])


def schema_errors(doc: dict) -> list[str]:
    validator = jsonschema.Draft7Validator(crd_schema(doc["kind"]))
    return [f"{'.'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(doc)]


def test_every_kuberay_kind_has_a_manifest():
    assert {doc["kind"] for _, doc in RAY_DOCS} == set(CRD_FILES)


@pytest.mark.parametrize("item", RAY_DOCS, ids=doc_id)
def test_manifest_matches_the_crd_schema(item):
    _, doc = item
    assert doc["apiVersion"] == "ray.io/v1"
    assert schema_errors(doc) == []


def test_schema_check_catches_typos_and_wrong_types():
    """The validation above is not vacuous: a misspelt field and a wrong type are both reported."""
    doc = copy.deepcopy(next(d for _, d in RAY_DOCS if d["kind"] == "RayCluster"))
    doc["spec"]["workerGroupSpecs"][0]["maxReplica"] = 4
    doc["spec"]["workerGroupSpecs"][0]["minReplicas"] = "zero"
    doc["spec"]["authOptions"]["mode"] = "password"
    errors = "\n".join(schema_errors(doc))
    assert "maxReplica" in errors and "'zero' is not of type 'integer'" in errors and "password" in errors


# --- security, pinning, resources -----------------------------------------------------------------

@pytest.mark.parametrize("item", RAY_DOCS, ids=doc_id)
def test_token_auth_is_on(item):
    assert cluster_spec(item[1])["authOptions"]["mode"] == "token"


@pytest.mark.parametrize("item", RAY_DOCS, ids=doc_id)
def test_ray_version_and_images_are_pinned_to_the_installed_ray(item):
    version = ray.__version__
    spec = cluster_spec(item[1])
    assert spec["rayVersion"] == version
    for container in containers(item[1]):
        image = container["image"]
        name, _, tag = image.rpartition(":")
        assert name and tag != "latest", f"{container['name']}: {image} has no pinned tag"
        pinned = tag.startswith(f"{version}-") or tag == version if name.endswith("rayproject/ray") else f"ray{version}-" in tag
        assert pinned, f"{container['name']}: {image} is not pinned to Ray {version}"


def test_dockerfile_builds_on_the_pinned_ray_image():
    base = re.search(r"^FROM\s+(\S+)", (K8S / "Dockerfile").read_text(), re.M).group(1)
    assert base.startswith(f"rayproject/ray:{ray.__version__}-py311"), base
    workdir = re.search(r"^WORKDIR\s+(\S+)", (K8S / "Dockerfile").read_text(), re.M).group(1)
    assert workdir == IMAGE_DIR


@pytest.mark.parametrize("item", documents(), ids=doc_id)
def test_every_container_has_requests_and_limits(item):
    found = list(containers(item[1]))
    for container in found:
        res = container.get("resources", {})
        for kind in ("requests", "limits"):
            assert {"cpu", "memory"} <= set(res.get(kind, {})), f"{container['name']}: resources.{kind} needs cpu and memory"
        if gpus(container):
            assert res["requests"]["nvidia.com/gpu"] == res["limits"]["nvidia.com/gpu"]
    if item[1]["kind"] in CRD_FILES:
        assert found
        autoscaler = cluster_spec(item[1])["autoscalerOptions"]["resources"]  # the operator adds this container
        assert {"cpu", "memory"} <= set(autoscaler["requests"]) and {"cpu", "memory"} <= set(autoscaler["limits"])


@pytest.mark.parametrize("item", RAY_DOCS, ids=doc_id)
def test_gpu_workers_have_their_own_autoscaling_group(item):
    spec = cluster_spec(item[1])
    assert spec["enableInTreeAutoscaling"] is True
    head = spec["headGroupSpec"]["template"]["spec"]
    assert not any(gpus(c) for c in head["containers"]), "the head is a CPU pod"
    gpu_groups = [g for g in spec["workerGroupSpecs"] if any(gpus(c) for c in g["template"]["spec"]["containers"])]
    assert gpu_groups
    for group in gpu_groups:
        assert all(gpus(c) for c in group["template"]["spec"]["containers"]), f"{group['groupName']}: mixes CPU and GPU containers"
        low, high = group["minReplicas"], group["maxReplicas"]
        assert 0 <= low <= group.get("replicas", low) <= high and high >= 1


def test_volumes_refer_to_claims_and_configmaps_defined_here():
    defined = {(doc["kind"], doc["metadata"]["name"]) for _, doc in documents()}
    pvc = next(doc for _, doc in documents() if doc["kind"] == "PersistentVolumeClaim")
    assert pvc["spec"]["accessModes"] == ["ReadWriteMany"]  # written by workers, read by the driver
    for _, doc in RAY_DOCS:
        for _, pod in pod_templates(cluster_spec(doc)):
            for volume in pod.get("volumes", []):
                if "persistentVolumeClaim" in volume:
                    assert ("PersistentVolumeClaim", volume["persistentVolumeClaim"]["claimName"]) in defined
                if "configMap" in volume:
                    assert ("ConfigMap", volume["configMap"]["name"]) in defined


# --- the commands the manifests run ---------------------------------------------------------------

JOBS = [(name, doc) for name, doc in RAY_DOCS if doc["kind"] == "RayJob"]


def entrypoint(doc: dict) -> list[str]:
    argv = shlex.split(doc["spec"]["entrypoint"])
    assert argv[0] == "ftray", f"entrypoint should run ftray: {argv}"
    return argv[1:]


def local_path(path: str) -> Path:
    """A path as the job driver sees it (relative to the image's checkout) → this repository."""
    return REPO / Path(path).relative_to(IMAGE_DIR) if path.startswith(IMAGE_DIR) else REPO / path


def parse_with_cli(argv: list[str]) -> dict[str, Any]:
    """Parse `ftray <argv>` exactly as the CLI would; skip while the subcommand does not exist yet."""
    command = typer.main.get_command(ftray.cli.app)
    name, args = argv[0], argv[1:]
    if name not in command.commands:
        pytest.skip(f"`ftray {name}` is not in the CLI yet (ftray/cli.py); unskips when it lands")
    ctx = command.commands[name].make_context(name, list(args), resilient_parsing=False)
    return ctx.params


def options(argv: list[str]) -> tuple[list[str], dict[str, list[str]]]:
    """Positional arguments and `--opt value` pairs of a command line (for commands not in the CLI yet)."""
    positional, opts, it = [], {}, iter(argv)
    for arg in it:
        if arg.startswith("--"):
            opts.setdefault(arg, []).append(next(it))
        else:
            positional.append(arg)
    return positional, opts


@pytest.mark.parametrize("item", JOBS, ids=doc_id)
def test_rayjob_entrypoint_parses_with_the_cli_and_its_spec_validates(item):
    argv = entrypoint(item[1])
    params = parse_with_cli(argv)
    spec = load_spec(params["recipe"], params["set_"])
    assert spec.scaling.use_gpu, "jobs on the GPU group train on GPUs"
    if params.get("space"):
        space_file = local_path(params["space"])
        param_space(load_space(space_file), spec, method_name(space_file))


@pytest.mark.parametrize("item", JOBS, ids=doc_id)
def test_rayjob_recipe_overrides_and_tune_space_are_valid(item):
    """The same check without the CLI, so it also covers `ftray tune` before that command exists."""
    positional, opts = options(entrypoint(item[1])[1:])
    spec = load_spec(positional[0], opts.get("--set", []))
    for space in opts.get("--space", []):
        space_file = local_path(space)
        assert space_file.exists(), f"{space} is not in the repository"
        sample_spec(param_space(load_space(space_file), spec, method_name(space_file)), spec)
    if entrypoint(item[1])[0] == "tune":
        assert opts.get("--soup") == ["greedy"]


@pytest.mark.parametrize("item", JOBS, ids=doc_id)
def test_rayjob_runtime_env_is_valid(item):
    from ray.runtime_env import RuntimeEnv

    RuntimeEnv(**yaml.safe_load(item[1]["spec"]["runtimeEnvYAML"]))  # unknown fields raise


def serve_applications() -> list[tuple[dict, dict]]:
    """(RayService document, application) for every Serve application in k8s/."""
    return [(doc, app) for _, doc in RAY_DOCS if doc["kind"] == "RayService"
            for app in yaml.safe_load(doc["spec"]["serveConfigV2"])["applications"]]


def configmap_file(path: str) -> str:
    """The text of `path` as mounted from a ConfigMap defined in k8s/."""
    maps = {doc["metadata"]["name"]: doc["data"] for _, doc in documents() if doc["kind"] == "ConfigMap"}
    for _, doc in RAY_DOCS:
        for _, pod in pod_templates(cluster_spec(doc)):
            volumes = {v["name"]: v for v in pod.get("volumes", [])}
            for container in pod["containers"]:
                for mount in container.get("volumeMounts", []):
                    source = volumes[mount["name"]].get("configMap")
                    if source and path.startswith(mount["mountPath"] + "/"):
                        return maps[source["name"]][path.removeprefix(mount["mountPath"] + "/")]
    raise AssertionError(f"{path} is not mounted from a ConfigMap in k8s/")


def test_rayservice_runs_the_ftray_serve_app_with_a_mounted_config():
    apps = serve_applications()
    assert apps
    for doc, app in apps:
        assert app["import_path"] == "serving.app:app"
        config = app["args"]["config"]
        assert yaml.safe_load(configmap_file(config))["models"]
        for _, pod in pod_templates(cluster_spec(doc)):  # the builder and replicas may run on any pod
            for container in pod["containers"]:
                assert any(config.startswith(m["mountPath"] + "/") for m in container.get("volumeMounts", [])), container["name"]


def test_rayservice_app_builds_the_way_serve_deploys_it(tmp_path):
    """What the Serve controller does with serveConfigV2: import `import_path`, call it with `args`."""
    try:
        import serving.app  # noqa: F401
    except ModuleNotFoundError as err:
        pytest.skip(f"`serving.app` does not exist yet ({err}); unskips when serving/ lands")
    from ray._common.utils import import_attr
    from ray.serve import Application
    from ray.serve._private.api import call_user_app_builder_with_args_if_necessary

    for _, app in serve_applications():
        config = yaml.safe_load(configmap_file(app["args"]["config"]))
        for model in config["models"]:  # the PVC paths do not exist here: point them at a local dir
            model["path"] = str(tmp_path)
        (tmp_path / "serve.yaml").write_text(yaml.safe_dump(config))
        args = app["args"] | {"config": str(tmp_path / "serve.yaml")}
        try:
            built = call_user_app_builder_with_args_if_necessary(import_attr(app["import_path"]), args)
        except Exception as err:  # noqa: BLE001 - the message is the point
            pytest.fail(f"Serve cannot build {app['import_path']} with args {sorted(args)} as a RayService deploys it: "
                        f"{type(err).__name__}: {err}. It needs `app` to be an application builder taking {{config: <yaml>}}.")
        assert isinstance(built, Application)


def test_rayservice_serve_config_is_valid():
    try:
        from serving.config import parse_serve_config
    except ImportError as err:
        pytest.skip(f"serving.config.parse_serve_config does not exist yet ({err})")
    for _, app in serve_applications():
        config = parse_serve_config(yaml.safe_load(configmap_file(app["args"]["config"])))
        assert config.host == "0.0.0.0" and all(m.num_gpus >= 1 for m in config.models)


def test_rayservice_config_parses_as_ftray_serve_command(tmp_path):
    for _, app in serve_applications():
        config = tmp_path / "serve.yaml"
        config.write_text(configmap_file(app["args"]["config"]))
        parse_with_cli(["serve", str(config)])
