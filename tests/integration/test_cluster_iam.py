"""cluster/iam-*.json with cluster/launcher-aws.yaml: every node type runs with its own instance
profile; the head's policy lets Ray's autoscaler manage this cluster's workers and nothing else;
the object-store policy reads inputs and writes only the output prefix."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
CLUSTER = ROOT / "cluster"
LAUNCHER = yaml.safe_load((CLUSTER / "launcher-aws.yaml").read_text())
POLICIES = sorted(CLUSTER.glob("iam-*.json"))
# What cluster/README.md tells users to substitute; 123456789012 is moto's account.
PLACEHOLDERS = {
    "YOUR-ACCOUNT-ID": "123456789012",
    "YOUR-INPUT-BUCKET": "detr-inputs",
    "YOUR-OUTPUT-BUCKET": "detr-outputs",
    "YOUR-OUTPUT-PREFIX": "detr-ray",
    "YOUR-OIDC-ID": "EXAMPLED539D4633E53DE1B71EXAMPLE",
}
S3_WRITES = ("s3:PutObject", "s3:DeleteObject", "s3:AbortMultipartUpload")


def policy(name: str, filled: bool = False) -> dict:
    text = (CLUSTER / name).read_text()
    for placeholder, value in PLACEHOLDERS.items() if filled else ():
        text = text.replace(placeholder, value)
    return json.loads(text)


def listed(value: str | list[str]) -> list[str]:
    return value if isinstance(value, list) else [value]


def profile(node_type: str) -> str:
    return LAUNCHER["available_node_types"][node_type]["node_config"]["IamInstanceProfile"]["Name"]


def worker_types() -> list[str]:
    return [name for name in LAUNCHER["available_node_types"] if name != LAUNCHER["head_node_type"]]


@pytest.fixture
def aws(monkeypatch):
    """In-process moto for IAM and EC2 in the launcher's region."""
    moto = pytest.importorskip("moto")
    monkeypatch.delenv("AWS_ENDPOINT_URL", raising=False)  # the session's S3 server must not catch these calls
    for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.setenv(key, "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", LAUNCHER["provider"]["region"])
    with moto.mock_aws():
        yield


def test_every_node_type_has_its_own_instance_profile(aws):
    import boto3
    from ray.autoscaler._private.aws.config import _configure_iam_role

    head = profile(LAUNCHER["head_node_type"])
    assert worker_types() and all(profile(w) != head for w in worker_types()), (
        "workers would run with the head's rights"
    )
    # Ray's bootstrap creates and attaches its default profile (EC2 + S3 full access) only to a head without one.
    bootstrapped = _configure_iam_role({**LAUNCHER, "head_node": {}})
    assert bootstrapped["head_node"] == {}
    assert boto3.client("iam").list_instance_profiles()["InstanceProfiles"] == []


@pytest.mark.parametrize("path", POLICIES, ids=lambda p: p.name)
def test_policies_grant_no_service_wide_rights(path: Path):
    document = policy(path.name)
    assert document["Version"] == "2012-10-17"
    for statement in document["Statement"]:
        for action in listed(statement["Action"]):
            assert action == "ec2:Describe*" or "*" not in action, f"{path.name}: {action} grants a whole service"
        if statement.get("Resource") == "*":
            assert listed(statement["Action"]) == ["ec2:Describe*"], (
                f"{path.name}: {statement['Sid']} on every resource"
            )


def test_object_store_policy_reads_inputs_and_writes_only_the_output_prefix():
    statements = policy("iam-object-store.json")["Statement"]
    assert all(a.startswith("s3:") for s in statements for a in listed(s["Action"]))
    granted = {(a, r) for s in statements for a in listed(s["Action"]) for r in listed(s["Resource"])}
    assert ("s3:GetObject", "arn:aws:s3:::YOUR-INPUT-BUCKET/*") in granted
    output = "arn:aws:s3:::YOUR-OUTPUT-BUCKET/YOUR-OUTPUT-PREFIX/*"
    # Delete too: annotate removes truncated output files, Ray Train prunes old checkpoints.
    assert {("s3:PutObject", output), ("s3:DeleteObject", output), ("s3:GetObject", output)} <= granted
    writes = sorted(r for a, r in granted if a in S3_WRITES and r != output)
    assert not writes, f"iam-object-store.json writes outside the output prefix: {writes}"


def test_head_policy_reaches_only_this_clusters_instances_and_the_worker_role():
    from ray.autoscaler.tags import TAG_RAY_CLUSTER_NAME

    region, cluster = LAUNCHER["provider"]["region"], LAUNCHER["cluster_name"]
    statements = policy("iam-head-autoscaler.json")["Statement"]
    for statement in statements:
        for arn in listed(statement["Resource"]):
            assert arn == "*" or not arn.startswith("arn:aws:ec2:") or arn.split(":")[3] == region, (
                f"{statement['Sid']}: {arn} is not in the launcher's region {region}"
            )
        tags = {k: v for test in statement.get("Condition", {}).values() for k, v in test.items() if "Tag/" in k}
        assert all(k.endswith(f"Tag/{TAG_RAY_CLUSTER_NAME}") and v == cluster for k, v in tags.items()), (
            f"{statement['Sid']}: conditions {tags} do not name Ray's tag {TAG_RAY_CLUSTER_NAME}={cluster}"
        )
        actions = listed(statement["Action"])
        if "ec2:TerminateInstances" in actions:
            assert f"ec2:ResourceTag/{TAG_RAY_CLUSTER_NAME}" in statement["Condition"]["StringEquals"]
        if "iam:PassRole" in actions:
            roles = {arn.rsplit("/", 1)[1] for arn in listed(statement["Resource"])}
            assert roles == {profile(w) for w in worker_types()}, f"the head may pass {roles}, not only the worker role"
    assert not any(a.startswith("s3:") for s in statements for a in listed(s["Action"])), (
        "S3 rights belong in iam-object-store.json, which head and workers share"
    )


def test_readme_steps_create_the_roles_and_ray_launches_workers_with_the_worker_profile(aws):
    """cluster/README.md's aws CLI steps, done with boto3 on moto (which validates every policy
    document), then one worker launched by Ray's own AWS node provider, as the head's autoscaler does."""
    import boto3
    from ray.autoscaler._private.aws.node_provider import AWSNodeProvider
    from ray.autoscaler.tags import NODE_KIND_WORKER, TAG_RAY_CLUSTER_NAME, TAG_RAY_NODE_KIND

    readme = (CLUSTER / "README.md").read_text()
    assert all(p.name in readme for p in POLICIES), "cluster/README.md must say how to use every iam-*.json"
    iam = boto3.client("iam")
    head, (worker,) = profile(LAUNCHER["head_node_type"]), worker_types()
    role_policies = {
        head: ["iam-object-store.json", "iam-head-autoscaler.json"],
        profile(worker): ["iam-object-store.json"],
    }
    for role, names in role_policies.items():
        iam.create_role(RoleName=role, AssumeRolePolicyDocument=json.dumps(policy("iam-trust-ec2.json")))
        for name in names:
            iam.put_role_policy(
                RoleName=role,
                PolicyName=name.removesuffix(".json"),
                PolicyDocument=json.dumps(policy(name, filled=True)),
            )
        iam.create_instance_profile(InstanceProfileName=role)
        iam.add_role_to_instance_profile(InstanceProfileName=role, RoleName=role)
    for trust in [p.name for p in POLICIES if p.name.startswith("iam-trust-eks-")]:  # KubeRay on EKS
        iam.create_role(RoleName=trust, AssumeRolePolicyDocument=json.dumps(policy(trust, filled=True)))

    ec2 = boto3.client("ec2")
    node_config = {
        **LAUNCHER["available_node_types"][worker]["node_config"],
        "ImageId": ec2.describe_images(Owners=["amazon"])["Images"][0]["ImageId"],  # bootstrap fills these in
        "SubnetIds": [ec2.describe_subnets()["Subnets"][0]["SubnetId"]],
    }
    AWSNodeProvider(LAUNCHER["provider"], LAUNCHER["cluster_name"]).create_node(
        node_config, {TAG_RAY_NODE_KIND: NODE_KIND_WORKER}, 1
    )
    ((instance,),) = [r["Instances"] for r in ec2.describe_instances()["Reservations"]]
    assert instance["IamInstanceProfile"]["Arn"].endswith(f":instance-profile/{profile(worker)}")
    # the tag the head policy's RunInstances / CreateTags / TerminateInstances conditions rely on
    assert {"Key": TAG_RAY_CLUSTER_NAME, "Value": LAUNCHER["cluster_name"]} in instance["Tags"]
