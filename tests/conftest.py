"""Shared fixtures: tiny SD3 models and their exported bundles, made once per test session."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# Deterministic, comparable numerics across the suite (also keeps 2-core CI machines responsive).
os.environ.setdefault("OMP_NUM_THREADS", "2")


@pytest.fixture(scope="session", autouse=True)
def _caches_in_the_session_tmp(tmp_path_factory):
    """Runtime caches (OpenVINO's compiled models, prompt caches, bench models) go to the session's temporary
    directory, not the user's ~/.cache/sd3trt (GBs after a few runs), unless SD3TRT_CACHE_DIR names a place."""
    from sd3trt.runtime.caches import ENV_CACHE

    if os.environ.get(ENV_CACHE):
        yield
        return
    os.environ[ENV_CACHE] = str(tmp_path_factory.mktemp("sd3trt-cache"))
    try:
        yield
    finally:
        os.environ.pop(ENV_CACHE, None)


VARIANTS = {
    "sd3": dict(),
    "sd35": dict(sd35=True),
    "no_t5": dict(with_t5=False),
    "p1c8": dict(patch_size=1, latent_channels=8, num_layers=1),
    "vae2": dict(vae_levels=2, num_layers=1),  # a VAE that downsamples by 2, not 8
}


@pytest.fixture(scope="session")
def tiny_factory(tmp_path_factory):
    """variant name -> (model_dir, bundle_dir), built on first use."""
    from sd3trt.export.bundle import export_bundle
    from sd3trt.export.tiny_model import TinyOptions, make_tiny

    root = tmp_path_factory.mktemp("tiny")
    made: dict[str, tuple[Path, Path]] = {}

    def get(variant: str) -> tuple[Path, Path]:
        if variant not in made:
            model = make_tiny(root / f"model-{variant}", TinyOptions(**VARIANTS[variant]))
            bundle = export_bundle(model, root / f"bundle-{variant}", log=lambda s: None)
            made[variant] = (model, bundle)
        return made[variant]

    return get


@pytest.fixture(scope="session")
def tiny_sd3(tiny_factory):
    return tiny_factory("sd3")


@pytest.fixture(scope="session")
def tiny_int8(tiny_sd3, tmp_path_factory):
    """A copy of the tiny bundle with its INT8 transformer (gate run on ONNX Runtime); copy it to change it."""
    import shutil

    from sd3trt.engines.calibrate import CalibSettings
    from sd3trt.engines.transformer_quant import quantize_bundle

    root = tmp_path_factory.mktemp("tiny-int8") / "bundle"
    shutil.copytree(tiny_sd3[1], root)
    quantize_bundle(root, "int8", CalibSettings(prompts=3, holdout=1, steps=3, strength=0.9, size=64), threads=2,
                    log=lambda s: None)
    return root
