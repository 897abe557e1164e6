"""The bundle: a directory of ONNX graphs (and later engines) described by manifest.json.

Format (version 1), documented in README.md:
  manifest.json           written last and atomically; lists every file with its sha256
  onnx/<component>.onnx   (+ <component>.onnx.data when the graph holds over 2 GB of weights)
  tokenizers/<name>/      tokenizer.json and tokenizer_config.json as transformers saved them

Integrity: every load checks that each listed file exists; the first load of a file also checks its
sha256 and records a stamp (sha256, size, mtime, ctime, inode) in .sd3trt-verified.json beside the
manifest (in ~/.cache/sd3trt/verified/ when the bundle is read-only), so later loads cost one stat per
file. A file whose stat differs from its stamp is hashed again; a stamp only vouches for the sha256
the manifest lists now. `sd3trt verify` (and `load_bundle(..., verify_checksums=True)`) re-hashes all.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Mapping

from sd3trt import precision as words
from sd3trt.errors import Sd3trtError
from sd3trt.files import sha256_file, write_json_atomic
from sd3trt.lora import LORA_MAP_KEY
from sd3trt.spec import ModelFacts

FORMAT = "sd3trt-bundle"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
LOCK = ".manifest.lock"  # not a bundle file: serializes writers of manifest.json (update_manifest, commit_entry)
ENGINES = "engines"  # manifest section of engine builds, keyed by build name (`sd3trt build`, `sd3trt refit`)
QUANTIZED = "quantized"  # manifest section of quantized graphs, keyed by quantized_key()
COMPRESSED = "compressed"  # manifest section of 8-bit-weight graphs (`sd3trt compress-weights`), by component
CPU_GATES = "cpu_gates"  # manifest section of `sd3trt gate` records (runtime/cpu_precision.py); lists no files
STAMPS = ".sd3trt-verified.json"  # not a bundle file: stamps of files already checked against the manifest
RESTORE = "re-run `sd3trt export --overwrite` (or the `sd3trt build` / `sd3trt quantize` that wrote it) to restore it"
LOG_HASHING_ABOVE = 1 << 30  # bytes: hashing more than this on a load logs one line

log = logging.getLogger(__name__)


@contextlib.contextmanager
def _manifest_lock(root: Path):
    """An exclusive lock on the bundle's manifest for one read-modify-write (fcntl; advisory, per bundle)."""
    root.mkdir(parents=True, exist_ok=True)
    with open(root / LOCK, "a+b") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


def _read_manifest(path: Path) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {}


def update_manifest(root: Path, change: Callable[[dict], dict | None]) -> dict:
    """Rewrite manifest.json under the bundle's lock: read it ({} when there is none yet), apply `change`
    (which edits the dict in place or returns a new one), write it back atomically. This and commit_entry (an
    entry with its files) are the manifest's writers; concurrent ones (`sd3trt build` beside `sd3trt
    quantize`) serialize, and none loses another's entry."""
    root = Path(root)
    with _manifest_lock(root):
        path = root / MANIFEST
        data = _read_manifest(path)
        new = change(data)
        data = data if new is None else new
        write_json_atomic(path, data)
        return data


def set_entry(root: Path, section: str, name: str, entry: dict | None) -> dict:
    """Add or replace (entry) or remove (None) manifest[section][name]; returns the manifest written."""
    def change(data: dict) -> None:
        part = data.setdefault(section, {})
        if entry is None:
            part.pop(name, None)
        else:
            part[name] = entry

    return update_manifest(root, change)


def commit_entry(root: Path, section: str, key: str, staged_files: Mapping[str, Path | None],
                 entry: dict | Callable[[dict | None], dict]) -> dict:
    """Put an entry's files into place and list them in manifest[section][key]; returns the entry written.

    staged_files: bundle-relative path -> the file to move there (os.replace: the same filesystem, e.g. a
    temp directory inside the bundle), that path itself when the file is already in place, or None to delete
    the file there (a leftover the new entry no longer has). entry: the new entry, or a function of the one
    listed now (None when none) that returns it, for a writer that merges. The entry's "files" is the sha256
    of every staged file, over the digests the entry already lists (files hashed when written, e.g. engines).

    Staged files are hashed first, outside the lock. Then, under the lock: when any file moves or goes, the
    old entry is unlisted first (the manifest never names a file in flux), the files move, and the new entry
    is listed; otherwise one read-modify-write. Concurrent writers serialize; none loses another's entry.

        staged = {"onnx/transformer.int8.onnx": tmp / "transformer.int8.onnx",   # moved into place
                  "onnx/transformer.int8.onnx.data": None,                        # the old external data goes
                  "onnx/transformer.int8.json": tmp / "report.json"}
        commit_entry(root, QUANTIZED, quantized_key("int8"), staged, entry)"""
    root = Path(root)
    digests = {rel: sha256_file(src) for rel, src in staged_files.items() if src is not None}
    moves = {rel: src for rel, src in staged_files.items() if src is None or Path(src) != root / rel}
    with _manifest_lock(root):
        path = root / MANIFEST
        data = _read_manifest(path)
        previous = data.get(section, {}).get(key)
        if moves and previous is not None:
            del data[section][key]
            write_json_atomic(path, data)
        for rel, src in moves.items():
            if src is None:
                (root / rel).unlink(missing_ok=True)
            else:
                (root / rel).parent.mkdir(parents=True, exist_ok=True)
                os.replace(src, root / rel)
        new = dict(entry(previous) if callable(entry) else entry)
        new["files"] = dict(sorted({**new.get("files", {}), **digests}.items()))
        data.setdefault(section, {})[key] = new
        write_json_atomic(path, data)
        return new


def quantized_key(precision: str, component: str = "transformer") -> str:
    return f"{component}.{precision}"


def _quantize_flag(component: str) -> str:
    return "" if component == "transformer" else f" --component {component}"


def entry_file(entry: dict) -> str:
    """The graph a component or quantized entry names, relative to the bundle."""
    return entry["file"]


def entry_files(entry: dict) -> dict[str, str]:
    """The files an entry lists (relative path -> sha256), sorted."""
    return dict(sorted(entry.get("files", {}).items()))


def entry_sha256(entry: dict) -> str | None:
    """The sha256 the entry lists for its own graph (entry["file"]) of a component or quantized entry."""
    return entry.get("files", {}).get(entry_file(entry))


def tensor_specs(entry: dict, kind: str) -> list[dict]:
    """A component entry's "inputs" or "outputs": [{"name", "dtype", "shape" (ints and symbolic axes)}]."""
    if kind not in ("inputs", "outputs"):
        raise ValueError(f"kind must be 'inputs' or 'outputs', got {kind!r}")
    return entry[kind]


def gate_passed(entry: dict) -> bool:
    """Whether a quantized graph passed its accuracy gate (False when it was recorded with --force)."""
    return bool(entry.get("accuracy", {}).get("passed", False))


def quantized_summary(entry: dict) -> dict:
    """What an engine built from a quantized graph records of that graph's entry."""
    return {**{k: entry.get(k) for k in ("precision", "method", "file", "scheme")},
            "coverage": {k: v for k, v in entry["coverage"].items() if not isinstance(v, (list, dict))},
            "accuracy_passed": entry["accuracy"]["passed"]}


def build_precisions(entry: dict) -> tuple[str, str]:
    """(transformer precision, precision of the other engines, the VAE's among them) of an engine build's entry."""
    return entry.get("transformer_precision") or entry.get("precision"), entry.get("precision")


def build_option(entry: dict, option: str):
    """One of the build options an engine build (or an engine's metadata) records; None when absent."""
    return entry.get("options", {}).get(option)


def engine_digests(components: dict[str, dict]) -> dict[str, str]:
    """engine path -> sha256 of an engine build's components (hashed when each engine was written)."""
    return {v["engine"]: v["engine_sha256"] for v in components.values()}


def build_flavour(entry: dict) -> str:
    """The TensorRT flavour (its module name: tensorrt or tensorrt_rtx) an engine build was made with."""
    return entry.get("flavour", "")


def newest_build(builds: dict[str, dict], names) -> str:
    """The most recently built of `names` (keys of `builds`, Bundle.engine_builds())."""
    return max(names, key=lambda n: builds[n].get("built_at", ""))


def build_components(entry: dict) -> dict[str, dict]:
    """component -> {"engine", "metadata", "engine_sha256", "precision", ...} of an engine build's entry."""
    return entry.get("components", {})


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

    @property
    def opset(self) -> int:
        return self.data.get("opset", 17)

    @property
    def loras(self) -> list:
        """The LoRAs fused into the exported weights, in order (their records)."""
        return self.data.get("loras", [])

    def has(self, component: str) -> bool:
        return component in self.data["components"]

    def component_names(self) -> list[str]:
        return list(self.data["components"])

    def lora_map_path(self, component: str) -> Path | None:
        """The component's module -> initializer map for LoRAs (written by export), None when it has none."""
        rel = self.component(component).get(LORA_MAP_KEY)
        return self.path(rel) if rel else None

    def tokenizer_names(self) -> list[str]:
        return list(self.data["tokenizers"])

    def source_record(self, component: str) -> dict:
        """{"file", "sha256"} of the component's exported graph: what a graph derived from it records."""
        entry = self.component(component)
        return {"file": entry["file"], "sha256": entry_sha256(entry)}

    def component(self, name: str) -> dict:
        if name not in self.data["components"]:
            raise Sd3trtError(f"bundle {self.root} has no {name} component; re-export the model with it")
        return self.data["components"][name]

    def fp32_scopes(self, name: str, precision: str) -> tuple[str, ...]:
        """ONNX node-name prefixes of the modules `name` keeps in float32 in `precision` graphs and engines
        (spec.Fp32Rule, recorded by export; a 16-bit bundle's graph has them in fp32 already)."""
        from sd3trt.spec import node_scope

        kept = self.component(name).get("export", {}).get("fp32_modules", [])
        return tuple(node_scope(name, m) for rule in kept if precision in rule["dtypes"] for m in rule["modules"])

    def path(self, rel: str) -> Path:
        return self.root / rel

    def onnx_path(self, name: str) -> Path:
        return self.path(self.component(name)["file"])

    def tokenizer_dir(self, name: str) -> Path:
        return self.path(self.data["tokenizers"][name]["dir"])

    def engine_builds(self) -> dict[str, dict]:
        """name -> manifest entry of every engine build (written by `sd3trt build` and `sd3trt refit`)."""
        return dict(self.data.get(ENGINES) or {})

    def engine_build(self, name: str) -> dict:
        """The manifest entry of engine build `name` (written by `sd3trt build`)."""
        builds = self.engine_builds()
        if name not in builds:
            have = ", ".join(sorted(builds)) or "none"
            raise Sd3trtError(f"bundle {self.root} has no engine build {name!r}; it has {have}; create it with "
                              f"`sd3trt build --bundle {self.root} --name {name}`")
        return builds[name]

    def engine_files(self, build_entry: dict, component: str) -> tuple[Path, Path] | None:
        """(engine, metadata) paths of `component` in an engine build's entry; None when it has no such engine."""
        comp = build_components(build_entry).get(component)
        return None if comp is None else (self.path(comp["engine"]), self.path(comp["metadata"]))

    def quantized_entry(self, precision: str, component: str = "transformer") -> dict:
        """The entry of the bundle's `precision` `component` graph (written by `sd3trt quantize`); an
        Sd3trtError naming the fix when it is missing or was made from an earlier export."""
        allowed = words.QUANTIZED if component == "transformer" else words.VAE_QUANTIZED
        words.check(precision, allowed, f"{component} precision")
        fix = f"`sd3trt quantize --bundle {self.root} --precision {precision}{_quantize_flag(component)}`"
        entry = self.data.get(QUANTIZED, {}).get(quantized_key(precision, component))
        if entry is None:
            raise Sd3trtError(f"bundle {self.root} has no {precision} {component}; create it with {fix}")
        if entry["source"]["sha256"] != entry_sha256(self.component(component)):
            raise Sd3trtError(f"the {precision} {component} of {self.root} was made from an earlier export; re-run {fix}")
        return entry

    def quantized_parts(self, precision: str, components: tuple[str, ...]) -> list[str]:
        """Which of `components` the bundle has in `precision`; an Sd3trtError naming the fix when none."""
        parts = [c for c in components if quantized_key(precision, c) in self.data.get(QUANTIZED, {})]
        if not parts:
            raise Sd3trtError(
                f"bundle {self.root} has no {precision} {' or '.join(components)}; create it with "
                f"`sd3trt quantize --bundle {self.root} --precision {precision}{_quantize_flag(components[0])}`"
            )
        return parts

    def compressed_graphs(self) -> dict[str, Path]:
        """{component: its 8-bit-weight graph} for the graphs of `sd3trt compress-weights` made from the present
        export whose image gate did not fail; an Sd3trtError naming the fix when there is none."""
        fix = f"`sd3trt compress-weights --bundle {self.root}`"
        current = {c: e for c, e in self.data.get(COMPRESSED, {}).items()
                   if self.has(c) and e["source"]["sha256"] == entry_sha256(self.component(c))}
        usable = {c: self.path(e["file"]) for c, e in current.items() if (e.get("gate") or {}).get("passed", True)}
        if not usable:
            state = "all failed their image gate" if current else "none made from the present export"
            raise Sd3trtError(f"bundle {self.root} has no usable 8-bit-weight graphs ({state}); create them with {fix}")
        return usable

    def quantized_path(self, precision: str, component: str = "transformer") -> Path:
        return self.path(self.quantized_entry(precision, component)["file"])

    def quantized_graphs(self) -> dict[str, tuple[str, str, Path, str | None]]:
        """quantized key -> (component, precision, path, sha256) of every graph `sd3trt quantize` listed, current
        or not (quantized_entry checks that one was made from the present export)."""
        out = {}
        for key, entry in self.data.get(QUANTIZED, {}).items():
            component, precision = key.split(".", 1)
            out[key] = (component, precision, self.path(entry["file"]), entry_sha256(entry))
        return out

    def cpu_gate(self, key: str) -> dict:
        """The record `sd3trt gate` wrote under manifest[CPU_GATES][key]; {} when none."""
        return self.data.get(CPU_GATES, {}).get(key) or {}

    def _files_of(self, sections: tuple[str, ...]) -> dict[str, str]:
        files = {}
        for section in sections:
            for entry in self.data.get(section, {}).values():
                files.update(entry.get("files", {}))
        return files

    def export_files(self) -> dict[str, str]:
        """The files `sd3trt export` wrote (graphs and tokenizers), relative path -> sha256."""
        return self._files_of(("components", "tokenizers"))

    def all_files(self) -> dict[str, str]:
        """Every file the manifest lists, relative path -> sha256."""
        return self._files_of(("components", "tokenizers", ENGINES, QUANTIZED, COMPRESSED))

    def check_files(self, verify_checksums: bool = False,
                    report: Callable[[str, str], None] | None = None) -> None:
        """Raise an Sd3trtError naming the first listed file that is missing or differs from its sha256.
        A file is hashed unless a stamp shows it unchanged since it matched (verify_checksums: hash all).
        report(rel, "ok" | "MISMATCH" | "missing"), when given, is called for every file in turn."""
        known = [{}, {}] if verify_checksums else [_read_stamps(p) for p in _stamp_paths(self.root)]
        checks = []  # [rel, path, its stamp now, verdict ("ok", "missing", "MISMATCH"; None: hash it), problem]
        for rel, digest in sorted(self.all_files().items()):
            p = self.path(rel)
            now = _stamp(p, digest)
            seen = [k[rel] for k in known if isinstance(k.get(rel), dict) and k[rel].get("sha256") == digest]
            if now is None:
                checks.append([rel, p, now, "missing", f"bundle file {p} is missing"])
            elif now in seen:
                checks.append([rel, p, now, "ok", None])
            elif seen and seen[0].get("size") != now["size"]:  # so it cannot have that sha256: no need to hash
                checks.append([rel, p, now, "MISMATCH", f"bundle file {p} has {now['size']} bytes instead of the "
                               f"{seen[0]['size']} it had when verified (truncated or overwritten)"])
            else:
                checks.append([rel, p, now, None, None])
        if report is None:  # a load stops at what a stat shows, before hashing anything
            for *_, problem in checks:
                if problem:
                    raise Sd3trtError(f"{problem}; {RESTORE}")
        todo = [c for c in checks if c[3] is None]
        size = sum(c[2]["size"] for c in todo)
        if size > LOG_HASHING_ABOVE:
            log.info("hashing %d file(s) (%.1f GiB) of bundle %s to check them against its manifest",
                     len(todo), size / 2**30, self.root)
        stamps, problems = {}, []
        for rel, p, now, verdict, problem in checks:
            if verdict is None:
                verdict = "ok" if sha256_file(p) == now["sha256"] else "MISMATCH"
                if verdict != "ok":
                    problem = f"bundle file {p} is corrupted (sha256 does not match the manifest)"
            if verdict == "ok":
                stamps[rel] = now
            if report is not None:
                report(rel, verdict)
            if problem:
                problems.append(problem)
                if report is None:
                    break
        if todo and (report is not None or not problems):
            _write_stamps(self.root, stamps)
        if problems:
            raise Sd3trtError(f"{problems[0]}; {RESTORE}")


def _stamp(path: Path, digest: str) -> dict | None:
    """What a stamp records of a file (None when it is not a regular file): compared, not trusted, on later loads."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    if not stat.S_ISREG(st.st_mode):
        return None
    return {"sha256": digest, "size": st.st_size, "mtime_ns": st.st_mtime_ns, "ctime_ns": st.st_ctime_ns,
            "inode": st.st_ino}


def _stamp_paths(root: Path) -> list[Path]:
    """Beside the manifest, then the per-user cache (used when the bundle directory is read-only)."""
    cache = Path(os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"))
    key = hashlib.sha256(str(root.resolve()).encode()).hexdigest()
    return [root / STAMPS, cache / "sd3trt" / "verified" / f"{key}.json"]


def _read_stamps(path: Path) -> dict:
    try:
        files = json.loads(path.read_text())["files"]
        return files if isinstance(files, dict) else {}
    except (OSError, ValueError, KeyError, TypeError):
        return {}


def _write_stamps(root: Path, stamps: dict) -> None:
    """Atomically, so concurrent loads never see a partial file (the last writer wins; a lost stamp costs a hash)."""
    for path in _stamp_paths(root):
        try:
            write_json_atomic(path, {"bundle": str(root.resolve()), "files": stamps})
            return
        except OSError as e:
            log.debug("cannot record verified files in %s: %s", path, e)


def load_bundle(root: Path, verify_checksums: bool = False,
                report: Callable[[str, str], None] | None = None) -> Bundle:
    """Read the manifest and check the files (see Bundle.check_files; verify_checksums re-hashes every file)."""
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
    bundle.check_files(verify_checksums, report)
    return bundle
