"""The bundle: a directory of ONNX graphs (and later engines) described by manifest.json.

Format (version 1), documented in README.md:
  manifest.json           written last and atomically; lists every file with its sha256
  onnx/<component>.onnx   (+ <component>.onnx.data when the graph holds over 2 GB of weights)
  tokenizers/<name>/      tokenizer.json and tokenizer_config.json as transformers saved them
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

from sd3trt.errors import Sd3trtError
from sd3trt.spec import ModelFacts

FORMAT = "sd3trt-bundle"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def write_bytes_atomic(path: Path, data: bytes) -> None:
    """Write via a temp file in the same directory and rename, so readers never see a partial file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json_atomic(path: Path, data: dict) -> None:
    write_bytes_atomic(path, (json.dumps(data, indent=2, sort_keys=True) + "\n").encode())


@dataclass
class Bundle:
    root: Path
    data: dict

    @property
    def facts(self) -> ModelFacts:
        return ModelFacts.from_dict(self.data["model"])

    @property
    def dtype(self) -> str:
        return self.data["dtype"]

    @property
    def scheduler_config(self) -> dict:
        return self.data["scheduler"]

    def has(self, component: str) -> bool:
        return component in self.data["components"]

    def component(self, name: str) -> dict:
        if name not in self.data["components"]:
            raise Sd3trtError(f"bundle {self.root} has no {name} component; re-export the model with it")
        return self.data["components"][name]

    def path(self, rel: str) -> Path:
        return self.root / rel

    def onnx_path(self, name: str) -> Path:
        return self.path(self.component(name)["file"])

    def tokenizer_dir(self, name: str) -> Path:
        return self.path(self.data["tokenizers"][name]["dir"])

    def all_files(self) -> dict[str, str]:
        """Every file the manifest lists, relative path -> sha256."""
        files = {}
        for section in ("components", "tokenizers", "engines", "quantized"):
            for entry in self.data.get(section, {}).values():
                files.update(entry.get("files", {}))
        return files

    def check_files(self, verify_checksums: bool = False) -> None:
        for rel, digest in sorted(self.all_files().items()):
            p = self.path(rel)
            if not p.is_file():
                raise Sd3trtError(f"bundle file {p} is missing; re-run `sd3trt export` (or `sd3trt build`) to restore it")
            if verify_checksums and sha256_file(p) != digest:
                raise Sd3trtError(
                    f"bundle file {p} is corrupted (sha256 does not match the manifest); re-run the export to restore it"
                )


def load_bundle(root: Path, verify_checksums: bool = False) -> Bundle:
    root = Path(root)
    mpath = root / MANIFEST
    if not mpath.is_file():
        raise Sd3trtError(f"{root} is not an sd3trt bundle (no {MANIFEST}); create one with `sd3trt export`")
    try:
        data = json.loads(mpath.read_text())
    except (OSError, ValueError) as e:
        raise Sd3trtError(f"{mpath} is not valid JSON ({e}); re-run `sd3trt export`") from None
    if data.get("format") != FORMAT:
        raise Sd3trtError(f"{mpath} is not an sd3trt bundle manifest")
    version = data.get("format_version")
    if version != FORMAT_VERSION:
        raise Sd3trtError(
            f"bundle {root} has format version {version}, this sd3trt reads version {FORMAT_VERSION}; "
            "re-export the model with this sd3trt"
        )
    bundle = Bundle(root, data)
    bundle.check_files(verify_checksums)
    return bundle
