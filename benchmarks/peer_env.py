"""The peers' own virtual environment: optimum-intel + OpenVINO, created on demand by the benchmark.

optimum-intel 2.2 needs transformers < 5.6 (the main environment may have a newer one), so the peer systems run
in a venv of their own, `<cache>/envs/optimum-intel/`, with the sd3trt package installed into it without its
dependencies (`pip install --no-deps -e`) so that `python -m sd3trt.benchmarks.worker` runs there.

A finished environment holds a marker file, written last and atomically, with the pinned requirements, the
versions pip installed and the sd3trt checkout installed into it; an environment without it, or with other
requirements, is half-made and built anew (one made from another checkout only gets this checkout's sd3trt).

Standard library only: the orchestrator imports this without torch.
"""

from __future__ import annotations

import fcntl
import importlib.metadata
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

PEERS = {
    "optimum-intel-openvino": "optimum-intel OVStableDiffusion3Img2ImgPipeline on OpenVINO (CPU), exported from the "
                              "same diffusers model; bf16 inference where the CPU has AVX512_BF16/AMX, f32 elsewhere",
    "optimum-intel-openvino-int8": "the same with optimum-intel's 8-bit hybrid quantization (8-bit weights "
                                   "everywhere, int8 activations in the transformer's attention, calibrated on "
                                   "local prompts)",
}
ENV_NAME = "optimum-intel"
MARKER = "sd3trt-peer-env.json"
KEY_PACKAGES = ("optimum-intel", "optimum", "openvino", "nncf", "transformers", "diffusers", "torch", "torchvision")
PIP_TIMEOUT_S = 3600.0


class PeerEnvError(RuntimeError):
    """The peer environment cannot be made; the message is one sentence naming the problem and the fix."""


def _repo_root() -> Path:
    return Path(__file__).resolve().parent.parent


def requirements() -> list[str]:
    """The pinned requirements of the peer environment (diffusers: at most the main environment's version)."""
    try:
        diffusers = importlib.metadata.version("diffusers")
    except importlib.metadata.PackageNotFoundError:
        raise PeerEnvError("the peer systems pin diffusers to this environment's version and diffusers is not "
                           "installed here; install it (pip install -e '.[export]')") from None
    return [
        "optimum-intel[openvino,nncf]==2.2.*",
        "transformers<5.6",
        # Not the main environment's diffusers itself where that one needs a newer huggingface-hub than
        # optimum-intel allows (diffusers 0.42 needs >= 1.32, optimum-intel 2.2 < 1.22): the newest one that fits.
        f"diffusers<={diffusers}",
        # torch and torchvision builds that match each other. optimum-intel 2.2 lists torchvision among its own
        # requirements (Requires-Dist), so it is installed either way; pinned, pip cannot pick a newer one that
        # drags a different torch along.
        "torch==2.14.1",
        "torchvision==0.29.1",
    ]


def env_dir(cache_dir: Path) -> Path:
    return Path(cache_dir) / "envs" / ENV_NAME


def _python(env: Path) -> Path:
    return env / "bin" / "python"


def _read_marker(env: Path) -> dict | None:
    try:
        return json.loads((env / MARKER).read_text())
    except (OSError, ValueError):
        return None


def _write_marker(env: Path, data: dict) -> None:
    tmp = env / (MARKER + ".tmp")
    tmp.write_text(json.dumps(data, indent=1))
    os.replace(tmp, env / MARKER)


def _run(args: list, log_file: Path, what: str) -> None:
    with open(log_file, "a") as f:
        f.write(f"\n$ {' '.join(map(str, args))}\n")
        f.flush()
        try:
            rc = subprocess.run([str(a) for a in args], stdout=f, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                timeout=PIP_TIMEOUT_S).returncode
        except subprocess.TimeoutExpired:
            raise PeerEnvError(f"{what} took longer than {PIP_TIMEOUT_S:.0f} s and was stopped; run the benchmark "
                               f"again once the package index is reachable (pip's output: {log_file})") from None
        except OSError as e:
            raise PeerEnvError(f"{what} could not start ({e.strerror or e}); check that {args[0]} exists and "
                               f"runs") from None
    if rc != 0:
        errors = [ln.strip() for ln in log_file.read_text(errors="replace").splitlines() if ln.startswith("ERROR:")]
        why = f" ({errors[0].removeprefix('ERROR:').strip().rstrip('.')})" if errors else ""
        raise PeerEnvError(f"{what} failed{why}; fix the cause shown in {log_file} and run the benchmark again")


def versions(python: Path | str) -> dict:
    """Installed versions of the key packages in the environment of `python` ({} when pip cannot tell)."""
    try:
        out = subprocess.run([str(python), "-m", "pip", "list", "--format=json", "--disable-pip-version-check"],
                             capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL)
        listed = json.loads(out.stdout) if out.returncode == 0 else []
    except (OSError, ValueError, subprocess.SubprocessError):
        return {}
    found = {p["name"].lower().replace("_", "-"): p["version"] for p in listed if "name" in p and "version" in p}
    return {k: found[k] for k in KEY_PACKAGES if k in found}


def python_for(cache_dir: Path, log, *, base_python: str | None = None) -> Path:
    """The python of the peer environment under `cache_dir`, created (minutes: pip) when missing or half-made.

    `log(str)` receives progress lines; pip's own output goes to `<cache>/envs/optimum-intel.pip.log`.
    Raises PeerEnvError (one sentence) when the environment cannot be made.
    """
    env = env_dir(cache_dir)
    reqs = requirements()
    root = _repo_root()
    if not (root / "pyproject.toml").is_file():
        raise PeerEnvError(f"the peer environment installs sd3trt from its source checkout and {root} is not one; "
                           f"install sd3trt with pip install -e <checkout> to benchmark the peers")
    try:
        env.parent.mkdir(parents=True, exist_ok=True)
        lock = open(env.parent / f"{ENV_NAME}.lock", "w")
    except OSError as e:
        raise PeerEnvError(f"cannot write the peer environment's folder {env.parent} ({e.strerror or e}); "
                           f"pass a writable --cache-dir") from None
    with lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # one creator at a time; the others wait and then reuse it
        marker = _read_marker(env)
        pip_log = env.parent / f"{ENV_NAME}.pip.log"
        if marker and marker.get("requirements") == reqs and _python(env).exists():
            if marker.get("sd3trt_source") != str(root):  # made from another checkout: its workers would run that code
                log(f"peer environment {env}: installing sd3trt from {root}")
                _run([_python(env), "-m", "pip", "install", "--disable-pip-version-check", "--no-deps", "-e", root],
                     pip_log, "installing sd3trt into the peer environment")
                _write_marker(env, {**marker, "sd3trt_source": str(root)})
            return _python(env)
        if env.exists():
            log(f"peer environment {env} is incomplete or has other requirements; building it anew")
            shutil.rmtree(env)
        pip_log.write_text("")
        log(f"creating the peer environment {env} (pip: {', '.join(reqs)}; minutes; pip's output in {pip_log}) ...")
        _run([base_python or sys.executable, "-m", "venv", env], pip_log, "creating the peer virtual environment")
        py = _python(env)
        pip = [py, "-m", "pip", "install", "--disable-pip-version-check"]
        _run([*pip, *reqs], pip_log, "installing optimum-intel and its pinned requirements into the peer environment")
        _run([*pip, "--no-deps", "-e", root], pip_log, "installing sd3trt into the peer environment")
        installed = versions(py)
        if not {"optimum-intel", "openvino", "torch", "diffusers"} <= set(installed):
            raise PeerEnvError(f"pip finished but the peer environment {env} lacks some of optimum-intel, openvino, "
                               f"torch and diffusers; delete {env} and run the benchmark again")
        _write_marker(env, {"requirements": reqs, "versions": installed, "sd3trt_source": str(root)})
        log(f"peer environment ready: {', '.join(f'{k} {v}' for k, v in installed.items())}")
        return py
