"""Validates JobSet manifests (jobset.x-k8s.io/v1alpha2), whose schema the pinned Kubernetes
schema lacks (a custom resource): every field of the JobSet's own part is checked against the
v1alpha2 API (the JobSet API reference, kubernetes-sigs/jobset), and each replicated Job's
template is written out as the batch/v1 Job JobSet makes of it, for kubernetes-validate to check
strictly with the rest.

    python validate-jobset.py OUT.yaml FILE.yaml...

Exits non-zero naming the file and the field on the first unknown or missing field.
"""

import sys

import yaml

# The JobSet v1alpha2 fields this checks (object: its known fields; "required" ones must be there).
FIELDS = {
    "JobSet": ({"apiVersion", "kind", "metadata", "spec"}, {"apiVersion", "kind", "metadata", "spec"}),
    "spec": ({"replicatedJobs", "network", "successPolicy", "failurePolicy", "startupPolicy",
              "suspend", "coordinator", "managedBy", "ttlSecondsAfterFinished"}, {"replicatedJobs"}),
    "network": ({"enableDNSHostnames", "subdomain", "publishNotReadyAddresses"}, set()),
    "failurePolicy": ({"maxRestarts", "restartStrategy", "rules"}, set()),
    "successPolicy": ({"operator", "targetReplicatedJobs"}, {"operator"}),
    "replicatedJob": ({"name", "groupName", "template", "replicas", "dependsOn"}, {"name", "template"}),
}


def check(obj, what: str, where: str) -> None:
    known, required = FIELDS[what]
    if not isinstance(obj, dict):
        sys.exit(f"{where}: {what} is not a mapping")
    unknown = set(obj) - known
    missing = required - set(obj)
    if unknown or missing:
        sys.exit(f"{where}: {what} has unknown fields {sorted(unknown)} or lacks {sorted(missing)}")


def jobs_of(doc: dict, path: str):
    """The batch/v1 Jobs a JobSet makes, after checking its own fields."""
    if doc.get("apiVersion") != "jobset.x-k8s.io/v1alpha2" or doc.get("kind") != "JobSet":
        sys.exit(f"{path}: not a jobset.x-k8s.io/v1alpha2 JobSet")
    name = doc["metadata"]["name"]
    check(doc, "JobSet", path)
    spec = doc["spec"]
    check(spec, "spec", f"{path}: {name}")
    for part in ("network", "failurePolicy", "successPolicy"):
        if part in spec:
            check(spec[part], part, f"{path}: {name}.spec.{part}")
    for rj in spec["replicatedJobs"]:
        check(rj, "replicatedJob", f"{path}: {name}")
        template = rj["template"]
        yield {
            "apiVersion": "batch/v1",
            "kind": "Job",
            "metadata": dict(template.get("metadata", {}), name=f"{name}-{rj['name']}-0"),
            "spec": template["spec"],
        }


def main() -> None:
    out, paths = sys.argv[1], sys.argv[2:]
    jobs = []
    for path in paths:
        with open(path) as f:
            for doc in yaml.safe_load_all(f):
                jobs.extend(jobs_of(doc, path))
    if not jobs:
        sys.exit("validate-jobset: no JobSet found")
    with open(out, "w") as f:
        yaml.safe_dump_all(jobs, f)
    print(f"validate-jobset: {len(paths)} JobSet file(s) checked; {len(jobs)} Job template(s) to validate")


if __name__ == "__main__":
    main()
