"""Optimization profiles: from the request range a user names to per-component min/opt/max shapes, and back.

Build side: `ShapeRequest` (image sizes, images per request, CFG on/off/both, T5 length) becomes, per
component, a list of profiles. Each profile holds the request dims (spec.request_dims) at min/opt/max
and the concrete shape of every engine input, computed from the manifest's symbolic shapes.

Run side: `EngineProfiles` reads that back from an engine's metadata and picks the profile a request
fits, or says in one sentence which axis is out of range and how to rebuild. Standard library and
sd3trt.spec only: the runtime imports this module.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from sd3trt.errors import Sd3trtError
from sd3trt.spec import SD3_PIXEL_MULTIPLE, T5_DEFAULT_LENGTH, ModelFacts, concrete_shape, request_dims

CFG_MODES = ("on", "off", "both")
DEFAULT_IMAGES = (512, 1024, 1536)  # min, opt, max px when no --image-size is named
# Components the pipeline always calls with batch 1: one prompt per call, one init image per request.
SINGLE_BATCH = ("clip_l", "clip_g", "t5", "vae_encoder")
# Request axes in the order messages show them.
AXES = ("batch", "height", "width", "latent_height", "latent_width", "t5_seq", "text_seq")


@dataclass(frozen=True)
class Range:
    min: int
    opt: int
    max: int

    @classmethod
    def parse(cls, text: str | int, what: str) -> "Range":
        """"N", "MIN:MAX" (opt = MAX) or "MIN:OPT:MAX"."""
        parts = str(text).replace("-", ":").split(":")
        try:
            vals = [int(p) for p in parts]
        except ValueError:
            raise Sd3trtError(f"{what} {text!r} is not N, MIN:MAX or MIN:OPT:MAX (integers)") from None
        if len(vals) == 1:
            vals = vals * 3
        elif len(vals) == 2:
            vals = [vals[0], vals[1], vals[1]]
        elif len(vals) != 3:
            raise Sd3trtError(f"{what} {text!r} is not N, MIN:MAX or MIN:OPT:MAX")
        r = cls(*vals)
        if not 1 <= r.min <= r.opt <= r.max:
            raise Sd3trtError(f"{what} {text!r} must satisfy 1 <= MIN <= OPT <= MAX")
        return r

    def fixed(self) -> "Range":
        return Range(self.opt, self.opt, self.opt)

    def scaled(self, k: int) -> "Range":
        return Range(self.min * k, self.opt * k, self.max * k)

    def __str__(self) -> str:
        if self.min == self.max:
            return str(self.min)
        return f"{self.min}:{self.opt}:{self.max}"


@dataclass(frozen=True)
class ShapeRequest:
    """What engines must accept. `images`: one Range per profile group (applies to height and width)."""

    images: tuple[Range, ...] = ()  # empty: DEFAULT_IMAGES, capped by the model's largest side
    image_step: int = SD3_PIXEL_MULTIPLE
    batch: Range = Range(1, 1, 1)  # images per request (num_images)
    cfg: str = "both"  # on: guidance > 1 only; off: guidance <= 1 only; both: a profile for each
    t5_seq: Range = Range(T5_DEFAULT_LENGTH, T5_DEFAULT_LENGTH, T5_DEFAULT_LENGTH)
    static: bool = False  # every profile fixed at its OPT values

    def to_dict(self, facts: ModelFacts | None = None) -> dict:
        d = asdict(self)
        d["images"] = [asdict(r) for r in self.images]
        if facts is not None:
            lat = self.image_step // facts.vae_scale_factor
            d["axis_steps"] = {"height": self.image_step, "width": self.image_step,
                               "latent_height": lat, "latent_width": lat}
        return d

    def validated(self, facts: ModelFacts) -> "ShapeRequest":
        """Check against the model; returns the request with static ranges collapsed to OPT."""
        pm = facts.pixel_multiple
        if self.cfg not in CFG_MODES:
            raise Sd3trtError(f"--cfg {self.cfg!r} is not one of {', '.join(CFG_MODES)}")
        if self.image_step < 1 or self.image_step % pm:
            raise Sd3trtError(f"--image-step {self.image_step} must be a positive multiple of {pm} for this model")
        images = self.images
        if not images:
            top = facts.max_image_side - facts.max_image_side % self.image_step
            hi = min(DEFAULT_IMAGES[2], top)
            opt = min(DEFAULT_IMAGES[1], hi)
            images = (Range(min(DEFAULT_IMAGES[0], opt), opt, hi),)
        for r in images:
            for v in (r.min, r.opt, r.max):
                if v % self.image_step:
                    raise Sd3trtError(f"image size {v} in --image-size {r} is not a multiple of --image-step {self.image_step}")
            if r.max > facts.max_image_side:
                raise Sd3trtError(
                    f"--image-size {r} goes past {facts.max_image_side} px, the largest side this model's "
                    f"positional embedding covers; use a MAX of at most {facts.max_image_side}"
                )
        if not 1 <= self.t5_seq.min <= self.t5_seq.max <= facts.t5_max_length:
            raise Sd3trtError(f"--t5-seq {self.t5_seq} must lie within 1..{facts.t5_max_length}")
        if not self.static:
            return ShapeRequest(images, self.image_step, self.batch, self.cfg, self.t5_seq, False)
        return ShapeRequest(
            tuple(r.fixed() for r in images), self.image_step, self.batch.fixed(), self.cfg, self.t5_seq.fixed(), True,
        )


@dataclass
class Profile:
    label: str
    dims: dict  # "min" / "opt" / "max" -> request dims (spec.request_dims)
    shapes: dict  # input name -> {"min": [...], "opt": [...], "max": [...]}

    def to_dict(self) -> dict:
        return {"label": self.label, "dims": self.dims, "shapes": self.shapes}


def _batches(component: str, req: ShapeRequest) -> list[tuple[str, Range]]:
    if component in SINGLE_BATCH:
        return [("", Range(1, 1, 1))]
    if component != "transformer":
        return [("", req.batch)]
    modes = {"on": [("cfg on", 2)], "off": [("cfg off", 1)], "both": [("cfg off", 1), ("cfg on", 2)]}[req.cfg]
    return [(label, req.batch.scaled(k)) for label, k in modes]


def component_profiles(facts: ModelFacts, component: str, entry: dict, req: ShapeRequest) -> list[Profile]:
    """The profiles for one component; `entry` is its manifest entry (inputs with symbolic shapes)."""
    used = {a for t in entry["inputs"] for a in t["shape"] if isinstance(a, str)}
    profiles: list[Profile] = []
    seen = set()
    for blabel, batch in _batches(component, req):
        for img in req.images:
            dims = {
                k: request_dims(facts, getattr(batch, k), getattr(img, k), getattr(img, k), getattr(req.t5_seq, k))
                for k in ("min", "opt", "max")
            }
            shapes = {
                t["name"]: {k: list(concrete_shape(t["shape"], dims[k])) for k in dims} for t in entry["inputs"]
            }
            key = repr(sorted((n, tuple(map(tuple, s.values()))) for n, s in shapes.items()))
            if key in seen:  # e.g. text encoders: image size does not reach them
                continue
            seen.add(key)
            parts = [blabel] if blabel else []
            if {"height", "width", "latent_height", "latent_width"} & used:
                parts.append(f"{img} px")
            if "batch" in used and component not in SINGLE_BATCH:
                parts.append(f"batch {batch}")
            if {"t5_seq", "text_seq"} & used:
                parts.append(f"t5 {req.t5_seq}")
            profiles.append(Profile(", ".join(parts) or "fixed", dims, shapes))
    return profiles


def _axis_values(entry_inputs: list[dict], shapes: dict[str, tuple]) -> dict[str, int]:
    """Request dims read off the input shapes through the manifest's symbolic axes."""
    vals: dict[str, int] = {}
    for t in entry_inputs:
        shp = shapes.get(t["name"])
        if shp is None:
            continue
        for sym, got in zip(t["shape"], shp):
            if isinstance(sym, str):
                vals.setdefault(sym, int(got))
    return vals


@dataclass
class EngineProfiles:
    """Run-side view of an engine's profiles (from its metadata)."""

    component: str
    build: str
    inputs: list[dict]  # manifest input specs
    profiles: list[dict] = field(default_factory=list)  # Profile.to_dict() each
    axis_steps: dict = field(default_factory=dict)  # e.g. {"height": 16, "latent_height": 2}

    @classmethod
    def from_metadata(cls, meta: dict) -> "EngineProfiles":
        return cls(meta["component"], meta["build"], meta["io"]["inputs"], meta["profiles"],
                   meta.get("request", {}).get("axis_steps", {}))

    def fits(self, index: int, shapes: dict[str, tuple]) -> bool:
        p = self.profiles[index]["shapes"]
        for name, shp in shapes.items():
            lo, hi = p[name]["min"], p[name]["max"]
            if len(shp) != len(lo) or any(not a <= s <= b for s, a, b in zip(shp, lo, hi)):
                return False
        return True

    def explain(self, shapes: dict[str, tuple]) -> tuple[int | None, str]:
        """(index of the profile these input shapes fit - closest OPT wins - , "") or (None, why not)."""
        dims = _axis_values(self.inputs, shapes)
        for axis, step in self.axis_steps.items():
            if axis in dims and dims[axis] % step:
                return None, f"{axis} {dims[axis]} is not a multiple of {step}"
        fitting = [i for i in range(len(self.profiles)) if self.fits(i, shapes)]
        if not fitting:
            reasons = []
            for p in self.profiles:
                lo, hi = p["dims"]["min"], p["dims"]["max"]
                bad = [f"{a} {dims[a]} not in {lo[a]}..{hi[a]}" for a in AXES if a in dims and a in lo
                       and not lo[a] <= dims[a] <= hi[a]]
                reasons.append(f"profile {p['label']}: {', '.join(bad) or 'shape mismatch'}")
            return None, "; ".join(reasons)

        def distance(i: int) -> int:
            opt = self.profiles[i]["shapes"]
            return sum(abs(s - o) for n, shp in shapes.items() for s, o in zip(shp, opt[n]["opt"]))

        return min(fitting, key=distance), ""

    def select(self, shapes: dict[str, tuple]) -> int:
        """Index of the profile these input shapes fit, or an Sd3trtError naming the axis and the fix."""
        index, why = self.explain(shapes)
        if index is None:
            dims = _axis_values(self.inputs, shapes)
            shown = ", ".join(f"{a} {dims[a]}" for a in AXES if a in dims)
            raise Sd3trtError(
                f"{self.component}: input shapes ({shown}) are outside the optimization profiles of engine build "
                f"{self.build!r} ({why}); rebuild with `sd3trt build` and --image-size/--batch/--cfg/--t5-seq ranges "
                "that cover them"
            )
        return index


def request_shapes(entry_inputs: list[dict], dims: dict) -> dict[str, tuple]:
    """Concrete input shapes of one component for a request (dims from spec.request_dims)."""
    return {t["name"]: concrete_shape(t["shape"], dims) for t in entry_inputs}
