"""A small offline renderer for the kustomizations under ``k8s/``, so tests need no kustomize.

It understands what those kustomizations use, and refuses anything else (so a new feature in
an overlay fails loudly here instead of rendering wrong): ``resources`` (files and directories),
``patches`` (a strategic-merge patch naming its target by kind and name, or an RFC 6902 JSON
patch with a ``target``), and ``images`` (``newName``/``newTag``). Where ``kubectl`` is on the
machine, a test checks that this renderer and ``kubectl kustomize`` agree.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import yaml

Doc = dict[str, Any]
KNOWN_FIELDS = frozenset({"apiVersion", "kind", "resources", "patches", "images"})
# Lists merged element by element on this key (strategic merge), as Kubernetes declares them.
MERGE_KEYS = {
    "containers": "name",
    "initContainers": "name",
    "env": "name",
    "ports": "containerPort",
    "volumes": "name",
    "volumeMounts": "mountPath",
}


def load_documents(path: Path) -> list[Doc]:
    return [doc for doc in yaml.safe_load_all(path.read_text(encoding="utf-8")) if doc]


def build(directory: Path) -> list[Doc]:
    kustomization = yaml.safe_load((directory / "kustomization.yaml").read_text(encoding="utf-8"))
    unknown = set(kustomization) - KNOWN_FIELDS
    if unknown:
        raise ValueError(f"{directory}: this renderer does not know {sorted(unknown)}")
    docs: list[Doc] = []
    for resource in kustomization.get("resources", []):
        path = directory / resource
        docs += build(path) if path.is_dir() else load_documents(path)
    for patch in kustomization.get("patches", []):
        body = yaml.safe_load((directory / patch["path"]).read_text(encoding="utf-8"))
        if isinstance(body, list):
            target = _find(docs, patch["target"]["kind"], patch["target"]["name"])
            for op in body:
                _apply_json_patch(target, op)
        else:
            target = _find(docs, body["kind"], body["metadata"]["name"])
            strategic_merge(target, body)
    for image in kustomization.get("images", []):
        for doc in docs:
            for container in containers_of(doc):
                name = container["image"].split("@")[0].rsplit(":", 1)[0]
                if name == image["name"]:
                    container["image"] = f"{image.get('newName', name)}:{image['newTag']}"
    return docs


def containers_of(doc: Doc) -> list[Doc]:
    spec = doc.get("spec", {}).get("template", {}).get("spec", {})
    return [*spec.get("initContainers", []), *spec.get("containers", [])]


def _find(docs: list[Doc], kind: str, name: str) -> Doc:
    for doc in docs:
        if doc["kind"] == kind and doc["metadata"]["name"] == name:
            return doc
    raise KeyError(f"no {kind}/{name} to patch")


def strategic_merge(target: Doc, patch: Doc) -> None:
    for key, value in patch.items():
        if isinstance(value, dict) and isinstance(target.get(key), dict):
            strategic_merge(target[key], value)
        elif isinstance(value, list) and key in MERGE_KEYS and isinstance(target.get(key), list):
            merge_key = MERGE_KEYS[key]
            for item in value:
                match = next((t for t in target[key] if t[merge_key] == item[merge_key]), None)
                if match is None:
                    target[key].append(copy.deepcopy(item))
                else:
                    strategic_merge(match, item)
        else:
            target[key] = copy.deepcopy(value)


def _pointer(path: str) -> list[str]:
    return [part.replace("~1", "/").replace("~0", "~") for part in path.split("/")[1:]]


def _parent(doc: Any, parts: list[str]) -> Any:
    for part in parts[:-1]:
        doc = doc[int(part)] if isinstance(doc, list) else doc[part]
    return doc


def _remove(doc: Doc, path: str) -> Any:
    parts = _pointer(path)
    parent = _parent(doc, parts)
    return parent.pop(int(parts[-1])) if isinstance(parent, list) else parent.pop(parts[-1])


def _add(doc: Doc, path: str, value: Any) -> None:
    parts = _pointer(path)
    parent = _parent(doc, parts)
    if isinstance(parent, list):
        if parts[-1] == "-":
            parent.append(value)
        else:
            parent.insert(int(parts[-1]), value)
    else:
        parent[parts[-1]] = value


def _apply_json_patch(doc: Doc, op: Doc) -> None:
    kind = op["op"]
    if kind == "add":
        _add(doc, op["path"], copy.deepcopy(op["value"]))
    elif kind == "remove":
        _remove(doc, op["path"])
    elif kind == "replace":
        _remove(doc, op["path"])
        _add(doc, op["path"], copy.deepcopy(op["value"]))
    elif kind == "move":
        _add(doc, op["path"], _remove(doc, op["from"]))
    else:
        raise ValueError(f"this renderer does not know the JSON patch op {kind!r}")
