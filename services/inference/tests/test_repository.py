"""The model repository with real ONNX Runtime models: versions, failures with reasons, load/unload, fallback."""

from __future__ import annotations

import asyncio
import contextlib
import shutil
from collections.abc import AsyncIterator
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from inference import model_config_pb2 as mc
from services.inference.backends import create_backends
from services.inference.config import ControlConfig, ModelServingConfig
from services.inference.errors import ModelLoadError, ModelNotFound
from services.inference.model_config import parse_config_text
from services.inference.repository import ModelRepository


def _repo(root: Path, max_instances: int = 8, **models: object) -> ModelRepository:
    config = ModelServingConfig(model_repository=root, **models)  # type: ignore[arg-type]
    return ModelRepository(
        config, ControlConfig(control_max_instances=max_instances), create_backends(config)
    )


@contextlib.asynccontextmanager
async def _started(root: Path, **models: object) -> AsyncIterator[ModelRepository]:
    """The repository with its start-up models loaded; closed afterwards."""
    repo = _repo(root, **models)
    await repo.load_startup()
    try:
        yield repo
    finally:
        await repo.close()


def _states(repo: ModelRepository, name: str) -> dict[str, tuple[str, str]]:
    return {e.version: (e.state, e.reason) for e in repo.index() if e.name == name}


async def test_startup_loads_every_model_and_records_why_some_failed(model_repo: Path) -> None:
    async with _started(model_repo) as repo:
        assert repo.started
        assert not repo.startup_models_ready()  # broken and trt_only did not load
        assert repo.ready_versions("fraud") == [1, 2]
        assert repo.get("fraud").version == 2  # "" is the latest
        assert repo.get("fraud", "1").version == 1
        assert repo.is_ready("types") and repo.is_ready("double")
        broken = _states(repo, "broken")
        assert broken["1"][0] == "UNAVAILABLE" and "ONNX Runtime cannot load" in broken["1"][1]
        trt_only = _states(repo, "trt_only")
        assert trt_only["1"][0] == "UNAVAILABLE"
        assert "TensorRT backend unavailable" in trt_only["1"][1]
        fallback = repo.get("trt_fallback")
        assert fallback.spec.backend == "onnxruntime" and fallback.spec.platform == "onnxruntime_onnx"
        assert "serving with fallback backend onnxruntime" in fallback.note
        assert _states(repo, "trt_fallback")["1"][0] == "READY"
        with pytest.raises(ModelNotFound, match="model 'broken' is not ready"):
            repo.get("broken")
        with pytest.raises(ModelNotFound, match="model 'nope' is not found"):
            repo.get("nope")
        with pytest.raises(
            ModelNotFound, match=r"model 'fraud' version '7' is not found; ready versions: \[1, 2\]"
        ):
            repo.get("fraud", "7")


async def test_loaded_model_matches_onnxruntime_on_the_same_file(model_repo: Path) -> None:
    async with _started(model_repo, startup_models=("fraud",)) as repo:
        x = np.random.default_rng(0).normal(50, 30, (5, 32)).astype(np.float32)
        direct = ort.InferenceSession(str(model_repo / "fraud" / "1" / "model.onnx")).run(
            None, {"features": x}
        )[0]
        (y,) = await repo.get("fraud", "1").batcher.infer({"features": x}, 5)
        np.testing.assert_allclose(y, direct, rtol=1e-5, atol=1e-6)


async def test_version_policy_latest_and_specific_via_load_config(fresh_repo: Path) -> None:
    async with _started(fresh_repo, startup_models=("fraud",)) as repo:
        text = (
            (fresh_repo / "fraud" / "config.pbtxt")
            .read_text()
            .replace("all { }", "specific { versions: [1] }")
        )
        await repo.load("fraud", parse_config_text(text, "override"))
        assert repo.ready_versions("fraud") == [1]
        assert _states(repo, "fraud")["2"] == ("UNAVAILABLE", "unloaded")
        (fresh_repo / "fraud" / "config.pbtxt").write_text(
            text.replace("specific { versions: [1] }", "latest { num_versions: 1 }")
        )
        await repo.load("fraud")
        assert repo.ready_versions("fraud") == [2]


async def test_unload_then_load_again(fresh_repo: Path) -> None:
    async with _started(fresh_repo, startup_models=("double",)) as repo:
        assert repo.startup_models_ready()
        await repo.unload("double")
        assert not repo.is_ready("double")
        assert _states(repo, "double")["1"] == ("UNAVAILABLE", "unloaded")
        with pytest.raises(ModelNotFound):
            repo.get("double")
        await repo.load("double")
        assert repo.is_ready("double")
        with pytest.raises(ModelNotFound, match="'ghost' is not found"):
            await repo.unload("ghost")
        with pytest.raises(ModelNotFound, match="'ghost' is not in the model repository"):
            await repo.load("ghost")


async def test_failed_reload_keeps_the_old_versions_serving(fresh_repo: Path) -> None:
    async with _started(fresh_repo, startup_models=("double",)) as repo:
        (fresh_repo / "double" / "config.pbtxt").write_text('backend: "nope"')
        with pytest.raises(ModelLoadError, match="unknown backend 'nope'"):
            await repo.load("double")
        assert repo.is_ready("double")
        entries = [e for e in repo.index() if e.name == "double"]
        assert [e.state for e in entries] == ["READY"]


async def test_config_that_disagrees_with_the_model_file_fails_with_a_reason(fresh_repo: Path) -> None:
    config = (fresh_repo / "double" / "config.pbtxt").read_text()
    (fresh_repo / "double" / "config.pbtxt").write_text(config.replace('name: "x"', 'name: "z"'))
    (fresh_repo / "types" / "config.pbtxt").write_text(
        (fresh_repo / "types" / "config.pbtxt").read_text().replace("TYPE_INT32", "TYPE_INT16", 1)
    )
    async with _started(fresh_repo, startup_models=("double", "types")) as repo:
        assert "config input 'z' is not in the model file" in _states(repo, "double")["1"][1]
        assert (
            "is TYPE_INT16 in the config but TYPE_INT32 in the model file" in _states(repo, "types")["1"][1]
        )


async def test_missing_config_is_completed_from_the_model(fresh_repo: Path) -> None:
    (fresh_repo / "double" / "config.pbtxt").unlink()
    shutil.rmtree(fresh_repo / "broken")
    async with _started(fresh_repo, startup_models=("double",)) as repo:
        spec = repo.get("double").spec
        assert [t.name for t in spec.inputs] == ["x"] and spec.inputs[0].dims == (-1, -1)


async def test_no_version_folder_and_missing_model_file_are_reported(fresh_repo: Path) -> None:
    shutil.rmtree(fresh_repo / "double" / "1")
    (fresh_repo / "types" / "1" / "model.onnx").unlink()
    async with _started(fresh_repo, startup_models=("double", "types")) as repo:
        reasons = {e.name: e.reason for e in repo.index()}
        assert "no version folder matches" in reasons["double"] or "no model.onnx" in reasons["double"]
        assert "model.onnx not found in" in reasons["types"]


async def test_reload_while_requests_flow_loses_none(fresh_repo: Path) -> None:
    async with _started(fresh_repo, startup_models=("fraud",)) as repo:
        x = np.ones((1, 32), dtype=np.float32)
        stop = False
        done = 0

        async def traffic() -> None:
            nonlocal done
            while not stop:
                (y,) = await repo.get("fraud").batcher.infer({"features": x}, 1)
                assert y.shape == (1, 1)
                done += 1

        workers = [asyncio.create_task(traffic()) for _ in range(8)]
        config = mc.ModelConfig()
        config.CopyFrom(repo.get("fraud").spec.config)
        for versions in ([1], [1, 2], [2], [1, 2]):
            del config.version_policy.specific.versions[:]
            config.version_policy.specific.versions.extend(versions)
            await repo.load("fraud", config)
            await asyncio.sleep(0.05)
        stop = True
        await asyncio.gather(*workers)  # any failed request would raise here
        assert done > 0


@pytest.mark.parametrize(
    "filename", ["/etc/passwd", "../../fraud/1/model.onnx", "sub/model.onnx", "..", "a\\\\b"]
)
async def test_a_model_file_name_that_leaves_its_folder_is_refused(model_repo: Path, filename: str) -> None:
    repo = _repo(model_repo, warmup=False)
    config = parse_config_text(
        f'name: "fraud"\nbackend: "onnxruntime"\ndefault_model_filename: "{filename}"\n', "x"
    )
    with pytest.raises(ModelLoadError, match="plain file name"):
        await repo.load("fraud", config)
    for name in ("../fraud", "/abs", "..", "fraud/1"):
        with pytest.raises(ModelNotFound):
            await repo.load(name)


async def test_instance_counts_are_capped(model_repo: Path) -> None:
    repo = _repo(model_repo, warmup=False, max_instances=4)
    text = 'name: "fraud"\nbackend: "onnxruntime"\ninstance_group [{count: 5000, kind: KIND_CPU}]\n'
    with pytest.raises(ModelLoadError, match="5000 instances, at most 4"):
        await repo.load("fraud", parse_config_text(text, "x"))
