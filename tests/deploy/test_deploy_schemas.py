"""Every rendered object validates against the Kubernetes schemas; a broken manifest is reported."""

from __future__ import annotations

import copy

import pytest

from deploy.k8s import kustomize
from tests.deploy.k8s_objects import CRD_KINDS, KUBERNETES_VERSION, OVERLAYS, Rendered, validate, validate_all


def test_there_are_dev_and_prod_overlays() -> None:
    assert {"dev", "prod"} <= set(OVERLAYS)
    assert set(OVERLAYS) == set(kustomize.OVERLAYS), "deploy/k8s/kustomize.py's --overlay choices"


def test_every_object_validates(rendered: Rendered) -> None:
    assert rendered.objects, f"{rendered.overlay} renders nothing"
    errors = validate_all(rendered.objects)
    assert errors == [], f"{rendered.overlay} against Kubernetes {KUBERNETES_VERSION}:\n" + "\n".join(errors)


def test_only_known_operator_kinds_skip_the_schemas(rendered: Rendered) -> None:
    skipped = {(o["apiVersion"], o["kind"]) for o in rendered.objects} & CRD_KINDS
    # The rest went through kubernetes-validate above; these are checked by tests/deploy rules.
    assert skipped <= CRD_KINDS


def _deployment(rendered: Rendered) -> dict:
    return copy.deepcopy(rendered.get("Deployment", "features"))


@pytest.mark.parametrize(
    ("break_it", "expected"),
    [
        (lambda o: o.update(apiVersion="apps/v1beta1"), "no schema"),
        (lambda o: o.update(apiVersion="app/v1"), "no schema"),
        (
            lambda o: o["spec"]["template"]["spec"].update(terminationGracePeriodSecond=30),
            "terminationGracePeriodSecond",
        ),
        (
            lambda o: o["spec"]["template"]["spec"]["containers"][0]["livenessProbe"].update(
                periodSeconds="10s"
            ),
            "10s",
        ),
        (
            lambda o: o["spec"]["template"]["spec"]["containers"][0]["ports"][0].update(containerPort="grpc"),
            "grpc",
        ),
        (
            lambda o: o["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]["grpc"].pop("port"),
            "port",
        ),
        (lambda o: o["spec"].pop("selector"), "selector"),
    ],
    ids=[
        "old-apiVersion",
        "misspelled-apiVersion",
        "misspelled-field",
        "string-for-integer",
        "wrong-type",
        "missing-required",
        "missing-selector",
    ],
)
def test_a_broken_deployment_fails_validation(overlays: dict[str, Rendered], break_it, expected: str) -> None:  # type: ignore[no-untyped-def]
    obj = _deployment(overlays["prod"])
    assert validate(obj) == []
    break_it(obj)
    errors = validate(obj)
    assert errors, "the broken object validated"
    assert any(expected in e for e in errors), errors


def test_a_broken_hpa_fails_validation(overlays: dict[str, Rendered]) -> None:
    hpa = copy.deepcopy(overlays["prod"].get("HorizontalPodAutoscaler", "gateway"))
    hpa["spec"]["metrics"][1]["pods"]["target"]["averageValu"] = "1"
    assert validate(hpa)


def test_a_broken_kustomization_fails_to_render(tmp_path, kustomize_binary: str) -> None:  # type: ignore[no-untyped-def]
    (tmp_path / "kustomization.yaml").write_text("resources:\n- missing.yaml\n")
    with pytest.raises(kustomize.KustomizeError, match=r"missing\.yaml"):
        kustomize.build(tmp_path)
