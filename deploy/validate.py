#!/usr/bin/env python3
"""Validate every manifest in deploy/ (run by the tests: tests/tests/deploy.rs).

- Kubernetes' own kinds and the CRDs: against the Kubernetes API schemas of the oldest
  version weft supports, strictly (an unknown field is an error), with the
  `kubernetes-validate` package from PyPI.
- weft.dev custom resources (the examples): against the openAPIV3Schema of the CRD in
  deploy/crds, strictly, with jsonschema.
- Gateway API routes: their schemas are the Gateway API project's; weft's own loader
  checks them (agent unit test `every_deploy_example_is_accepted`).
- kustomization.yaml: every resource it lists exists.
"""
import copy
import pathlib
import sys

import jsonschema
import kubernetes_validate
import yaml

KUBERNETES = "1.33.0"
ROOT = pathlib.Path(__file__).resolve().parent


def strict(schema):
    """Unknown fields are errors where the schema lists the fields (the API server's
    strict field validation)."""
    s = copy.deepcopy(schema)

    def walk(node):
        if not isinstance(node, dict):
            return
        props = node.get("properties")
        if props is not None:
            if "additionalProperties" not in node and not node.get(
                "x-kubernetes-preserve-unknown-fields"
            ):
                node["additionalProperties"] = False
            for v in props.values():
                walk(v)
        if isinstance(node.get("items"), dict):
            walk(node["items"])
        if isinstance(node.get("additionalProperties"), dict):
            walk(node["additionalProperties"])

    walk(s)
    # metadata is the API server's ObjectMeta, not the CRD's to describe.
    s["properties"]["metadata"] = {"type": "object"}
    return s


def main():
    docs = []
    for path in sorted(ROOT.rglob("*.yaml")):
        if path.name == "kustomization.yaml":
            continue
        for i, doc in enumerate(yaml.safe_load_all(path.read_text())):
            if doc is not None:
                docs.append((path.relative_to(ROOT), i + 1, doc))
    errors = []
    crds = {}
    for path, i, doc in docs:
        if doc.get("kind") == "CustomResourceDefinition":
            spec = doc["spec"]
            for v in spec["versions"]:
                key = (f"{spec['group']}/{v['name']}", spec["names"]["kind"])
                crds[key] = strict(v["schema"]["openAPIV3Schema"])
    counts = {"kubernetes": 0, "crd": 0, "gateway": 0}
    for path, i, doc in docs:
        where = f"{path}: document {i} ({doc.get('kind')} {doc.get('metadata', {}).get('name')})"
        api = doc.get("apiVersion", "")
        try:
            if api.startswith("gateway.networking.k8s.io/"):
                counts["gateway"] += 1
            elif (api, doc.get("kind")) in crds:
                jsonschema.Draft4Validator(crds[(api, doc["kind"])]).validate(doc)
                counts["crd"] += 1
            else:
                kubernetes_validate.validate(doc, KUBERNETES, strict=True)
                counts["kubernetes"] += 1
        except (kubernetes_validate.ValidationError, jsonschema.ValidationError) as e:
            path_ = ".".join(str(p) for p in getattr(e, "path", []) or [])
            errors.append(f"{where}: {path_}: {getattr(e, 'message', e)}")
        except kubernetes_validate.SchemaNotFoundError as e:
            errors.append(f"{where}: no schema in Kubernetes {KUBERNETES}: {e}")
    kustomization = yaml.safe_load((ROOT / "kustomization.yaml").read_text())
    for r in kustomization.get("resources", []):
        if not (ROOT / r).exists():
            errors.append(f"kustomization.yaml: resource {r} does not exist")
    for e in errors:
        print(f"INVALID {e}")
    print(
        f"deploy/: {counts['kubernetes']} Kubernetes objects and CRDs valid for {KUBERNETES}, "
        f"{counts['crd']} weft.dev objects valid for their CRDs, "
        f"{counts['gateway']} Gateway API objects (checked by weft's loader), "
        f"{len(errors)} invalid"
    )
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
