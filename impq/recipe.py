"""The recipe: what one run does (`impq quantize`, `impq export`, each sweep point), as one typed, frozen,
versioned value that checks itself when it is built.

The CLI builds one from flags (`Recipe.from_flags`, every default taken from here); `impq quantize --recipe FILE`
reads one (flags given beside it override it and are recorded). Every artifact carries its recipe without a
machine path (the GGUF's `impq.settings`, the safetensors folder's impq.json), so the same inputs give the same
bytes from any folder; `<stem>.recipe.yaml` beside it adds what was resolved on this machine (every tensor's type,
the device used, library versions, input digests) and the sha256 of each output file, which
`impq reproduce RECIPE --check` compares against a fresh run.

Schema (version 2):

    schema_version: 2
    model: embedded:imp-tiny | <folder name>   # the embedded model, or the checkpoint's folder name
    calibration:                               # null for an export (method none)
      data: default | <file name>              # the shipped default for the model, or the file's name
      nsamples: 64
      seqlen: 512
    seed: 0
    method:
      name: gptq                               # rtn | gptq | awq | signround; none: an export
      damp: 0.01                               # GPTQ (and learned rounding's fallback)
      block_size: 128
      act_order: false
      static_groups: false
      iterations: 200                          # learned rounding's tuning steps per block
      compute_dtype: float32
      device: auto
    target:                                    # one of:
      format: gguf                             #   a GGUF pair: decoder grid, embeddings/head, mmproj
      type: q4_k
      embeddings: q8_0
      vision: f16
    # target: {format: safetensors, layout: compressed-tensors, bits: 4, group_size: 128}
    budget: null                               # or: target_bpw | target_size, includes_vision, candidate_types,
                                               #     sensitivity, sensitivity_data, sensitivity_prompts,
                                               #     sensitivity_file
    overrides: ["attn_v=q6_k"]                 # llama-quantize style REGEX=TYPE, the last match wins

Schema 1 (a flat `quantize` section of the CLI's flag names, `calibration` a string) is read through
`migrate_schema_1`; the flag names are still how the CLI and a recipe with flags beside it address a field
(`FLAGS`)."""

from __future__ import annotations

import dataclasses
import hashlib
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import yaml

from .defaults import default_calib_data, default_model_dir, is_embedded_model
from .errors import ImpqError
from .export.gguf_file import EXPORT_TYPES, QType, canonical_type_name
from .export.gguf_mmproj import mmproj_tensors
from .export.gguf_text import text_tensors
from .export.pair import export_pair
from .export.safetensors_layouts import LAYOUTS
from .quant.driver import METHODS
from .quant.grids import GRIDS, Grid
from .quant.signround import ITERATIONS

SCHEMA_VERSION = 2
EMBEDDED_MODEL = "embedded:imp-tiny"
DEFAULT_CALIBRATION = "default"
NO_METHOD = "none"                     # an export: round-to-nearest by the writer, nothing calibrated
COMPUTE_DTYPES = ("float32", "bfloat16")
SENSITIVITY_MODES = ("measured", "scaled")
UNQUANTIZED_TYPES = ("q8_0", "f16", "f32")   # GGUF choices for the token embedding, output head and vision side
# --bits -> the GGUF grid used when --type is not given
DEFAULT_TYPE_FOR_BITS = {8: "q8_0", 6: "q6_k", 5: "q5_k", 4: "q4_k", 3: "q3_k", 2: "q2_k"}
DEFAULT_GROUP_SIZE = 128          # safetensors: int<bits> with one scale per 128 input columns
TOP_LEVEL = ("schema_version", "model", "calibration", "seed", "method", "target", "budget", "overrides",
             "resolved", "outputs")


def _setting(default, flag: str | None = None, least: int | None = None):
    """A recipe field: `flag` is its CLI name (the field's own name where None), `least` its smallest value."""
    return field(default=default, metadata={"flag": flag, "least": least})


def flag_of(cls, name: str) -> str:
    return next(f.metadata.get("flag") or f.name for f in dataclasses.fields(cls) if f.name == name)


def least(cls, name: str) -> int:
    """A counted field's smallest value: the CLI's options take their `min` from here."""
    return next(f.metadata["least"] for f in dataclasses.fields(cls) if f.name == name)


class _Checked:
    """Each field's type (as the dataclass declares it) and least value, checked on construction: the same rule
    for a flag, a recipe file and a library call; lists become tuples, so a recipe is hashable and frozen."""

    def __post_init__(self):
        hints = typing.get_type_hints(type(self))
        for f in dataclasses.fields(self):
            value, name = getattr(self, f.name), f.metadata.get("flag") or f.name
            hint = hints[f.name]
            allowed = typing.get_args(hint) if typing.get_origin(hint) in (typing.Union, types.UnionType) else (hint,)
            if value is None and type(None) in allowed:
                continue
            kinds = tuple(typing.get_origin(a) or a for a in allowed if a is not type(None))
            if float in kinds:
                kinds += (int,)                              # 4 is a fine --target-bpw
            if tuple in kinds:
                kinds += (list,)
            if isinstance(value, bool) and bool not in kinds or not isinstance(value, kinds):
                names = " or ".join("list" if k is tuple else k.__name__ for k in kinds if k is not list)
                raise ImpqError(None, f"{name} {value!r}: expected {names}")
            if tuple in kinds:
                if not all(isinstance(item, str) for item in value):
                    raise ImpqError(None, f"{name} {value!r}: expected a list of strings")
                object.__setattr__(self, f.name, tuple(value))
            if f.metadata.get("least") is not None and value < f.metadata["least"]:
                raise ImpqError(None, f"{name} {value!r}: at least {f.metadata['least']}")
        self.check()

    def check(self) -> None:
        """The section's own rules beyond types."""


@dataclass(frozen=True)
class Calibration(_Checked):
    # the image+text (or text) file; None: the model's default (the shapes split for imp-tiny, else calib_data/photos)
    data: str | None = _setting(None, flag="calib")
    nsamples: int = _setting(64, least=1)
    seqlen: int = _setting(512, least=8)


@dataclass(frozen=True)
class Method(_Checked):
    name: str = _setting("gptq", flag="method")
    damp: float = _setting(0.01)
    block_size: int = _setting(128, least=1)
    act_order: bool = _setting(False)
    static_groups: bool = _setting(False)
    # learned rounding's tuning steps per decoder block (AutoRound's iters: 200 by default, 50 in its light recipe);
    # the learning rate is 1 / iterations, so fewer steps cover the same range
    iterations: int = _setting(ITERATIONS, least=1)
    # the blocks' forward passes during quantization: bfloat16 autocast is 2-3x faster on a CPU with AVX-512 BF16
    # or a GPU, float32 the exact default (quant/driver.py)
    compute_dtype: str = _setting("float32")
    device: str = _setting("auto")          # where calibration and the layer-by-layer work run

    def check(self):
        if self.name not in (*METHODS, NO_METHOD):
            raise ImpqError(None, f"--method {self.name}: choose one of {', '.join(METHODS)}")
        if self.compute_dtype not in COMPUTE_DTYPES:
            raise ImpqError(None, f"--compute-dtype {self.compute_dtype}: choose one of {', '.join(COMPUTE_DTYPES)}")


@dataclass(frozen=True)
class Budget(_Checked):
    """A size budget: a per-group mix of candidate types that minimises the measured KLD within it."""
    target_bpw: float | None = _setting(None)       # bits per decoder weight
    target_size: int | None = _setting(None)        # bytes of the text GGUF, header and all
    includes_vision: bool = _setting(False, flag="budget_includes_vision")   # --target-size counts the mmproj too
    candidate_types: tuple[str, ...] = _setting(("q2_k", "q3_k", "q4_k", "q5_k", "q6_k", "q8_0"))
    # scaled: the default type's KLD measured, the others scaled by the quantizer's output error; measured: every
    # candidate type's measured (measure/sensitivity.py)
    sensitivity: str = _setting("scaled")
    sensitivity_data: str | None = _setting(None)   # measurement prompts (its last items); default: the eval split
    sensitivity_prompts: int = _setting(32, least=1)
    sensitivity_file: str | None = _setting(None)   # read from an earlier run's report instead of measured

    def check(self):
        object.__setattr__(self, "candidate_types", tuple(canonical_type_name(value, GRIDS, "--candidate-types")
                                                          for value in self.candidate_types))
        if self.target_bpw is not None and self.target_size is not None:
            raise ImpqError(None, "--target-bpw and --target-size: give one budget")
        if self.sensitivity not in SENSITIVITY_MODES:
            raise ImpqError(None, f"--sensitivity {self.sensitivity}: choose one of {', '.join(SENSITIVITY_MODES)}")
        if self.includes_vision and self.target_size is None:
            raise ImpqError(None, "--budget-includes-vision goes with --target-size")
        if self.target_size is not None and self.target_size <= 0:
            raise ImpqError(None, f"--target-size {self.target_size}: a positive number of bytes")
        if self.target_bpw is not None and not 1.0 <= self.target_bpw <= 16.0:
            raise ImpqError(None, f"--target-bpw {self.target_bpw}: choose a value between 1 and 16 bits")

    @property
    def given(self) -> bool:
        return self.target_bpw is not None or self.target_size is not None

    def label(self) -> str:
        # a per-group mix: no one type names the file
        return f"MIX{self.target_bpw:g}BPW" if self.target_bpw is not None else f"MIX{self.target_size / 1e6:.4g}MB"


def mix_bpw(type_name: str) -> float | None:
    """A type name `bpwB`, a budgeted mix at B bits per decoder weight (a sweep type): B; None for any other."""
    match = re.fullmatch(r"bpw(\d+(?:\.\d+)?)", type_name.lower())
    return float(match.group(1)) if match else None


@dataclass(frozen=True)
class GGUFPair(_Checked):
    """A text GGUF (the decoder on `type`, embeddings and output head at `embeddings`) and an mmproj (vision tower
    and projector at `vision`) that stock llama.cpp loads."""
    format: ClassVar[str] = "gguf"
    budgets: ClassVar[bool] = True           # a size budget can mix its types
    type: str = _setting("q4_k")
    embeddings: str = _setting("q8_0")
    vision: str = _setting("f16")

    def check(self):
        for key, choices in (("type", {**GRIDS, **EXPORT_TYPES}), ("embeddings", UNQUANTIZED_TYPES),
                             ("vision", {**GRIDS, **EXPORT_TYPES})):
            object.__setattr__(self, key, canonical_type_name(getattr(self, key), choices, f"--{key}"))

    def check_method(self, exporting: bool) -> None:
        """A calibrated method writes the decoder on a GGUF grid, and the vision side on one (calibrated like the
        decoder) or at 16 or 32 bits; an export takes any type the writer has."""
        if exporting:
            canonical_type_name(self.vision, EXPORT_TYPES, "--vision")
        else:
            canonical_type_name(self.type, GRIDS, "--type")
            canonical_type_name(self.vision, {**GRIDS, "f16": None, "f32": None}, "--vision")

    def vision_grid(self) -> Grid | None:
        """The grid a calibrated method puts the vision tower's blocks and the projector on (None: float)."""
        return GRIDS.get(self.vision)

    def holds_overrides(self) -> bool:
        return True

    @classmethod
    def from_flags(cls, bits: int | None, named: dict, exporting: bool) -> "GGUFPair":
        """--type, or --bits' default type (with both, they must agree); --embeddings, --vision."""
        if "layout" in named or "group_size" in named:
            raise ImpqError(None, "--layout and --group-size apply to --format safetensors; GGUF types fix their "
                                  "blocks")
        type_name = named.pop("type", None)
        if type_name is not None:
            type_name = canonical_type_name(type_name, EXPORT_TYPES if exporting else GRIDS, "--type")
        elif exporting:
            type_name = "f16"
        elif bits is None:
            type_name = cls().type
        elif bits not in DEFAULT_TYPE_FOR_BITS:
            raise ImpqError(None, f"--bits {bits}: the GGUF grids implemented hold "
                                  f"{', '.join(f'{b} ({t})' for b, t in DEFAULT_TYPE_FOR_BITS.items())} bits")
        else:
            type_name = DEFAULT_TYPE_FOR_BITS[bits]
        target = cls(type=type_name, **named)
        if not exporting and bits is not None and GRIDS[target.type].bits != bits:
            raise ImpqError(None, f"--type {target.type} holds {GRIDS[target.type].bits} bits, not --bits {bits}")
        return target

    @property
    def bits(self) -> int:
        # an export's float types by their width: f16 -> 16, f32 -> 32
        return GRIDS[self.type].bits if self.type in GRIDS else int(self.type[1:])

    def grid(self) -> Grid:
        return GRIDS[self.type]

    def override_grids(self) -> dict[str, Grid]:
        return GRIDS

    def label(self) -> str:
        return self.type.upper()

    def stem(self, model_name: str, label: str, method: str) -> str:
        return f"{model_name}-{label}-{method}"


@dataclass(frozen=True)
class Safetensors(_Checked):
    """A transformers folder whose LLM is in a GPTQ, AWQ or compressed-tensors layout on an integer grid."""
    format: ClassVar[str] = "safetensors"
    budgets: ClassVar[bool] = False
    layout: str = _setting("compressed-tensors")
    bits: int = _setting(4)
    group_size: int = _setting(DEFAULT_GROUP_SIZE, least=1)

    def check(self):
        self.grid()                          # layout, bits and group size, before any work

    def vision_grid(self) -> Grid | None:
        return None                          # the vision side stays at f16 in a transformers folder

    def check_method(self, exporting: bool) -> None:
        if exporting:
            raise ImpqError(None, "impq export writes GGUF pairs; a safetensors folder comes from impq quantize")

    def holds_overrides(self) -> bool:
        """compressed-tensors holds several bit widths in one checkpoint; GPTQ and AWQ layouts one."""
        return LAYOUTS[self.layout].mixed_widths

    @classmethod
    def from_flags(cls, bits: int | None, named: dict, exporting: bool) -> "Safetensors":
        """--layout, --bits, --group-size; the embeddings, output head and vision side stay at f16."""
        if "type" in named:
            raise ImpqError(None, "--type names a GGUF grid; with --format safetensors use --layout and --group-size")
        if named.get("embeddings", "f16") != "f16" or named.get("vision", "f16") != "f16":
            raise ImpqError(None, "--format safetensors keeps the embeddings, output head and vision side at f16")
        return cls(**{k: v for k, v in (("bits", bits), *named.items()) if k in ("bits", "layout", "group_size")
                      and v is not None})

    def grid(self) -> Grid:
        if self.layout not in LAYOUTS:
            raise ImpqError(None, f"--layout {self.layout}: choose one of {', '.join(LAYOUTS)}")
        if self.group_size < 8 or self.group_size % 8:
            raise ImpqError(None, f"--group-size {self.group_size}: a positive multiple of 8")
        return LAYOUTS[self.layout].grid(self.bits, self.group_size)

    def override_grids(self) -> dict[str, Grid]:
        """int2 .. int8 at the run's group size, as far as the layout holds them."""
        layout = LAYOUTS[self.layout]
        return {f"int{bits}": layout.grid(bits, self.group_size) for bits in layout.bits}

    def label(self) -> str:
        return f"W{self.bits}G{self.group_size}"

    def stem(self, model_name: str, label: str, method: str) -> str:
        return f"{model_name}-{label}-{method}-{self.layout}"


TARGET_SPECS = {spec.format: spec for spec in (GGUFPair, Safetensors)}
FORMATS = tuple(TARGET_SPECS)


def tensor_override(value: str, grids: dict) -> tuple[str, Grid]:
    """`REGEX=TYPE` (llama-quantize's --tensor-type) -> (pattern, grid); TYPE names one of `grids`."""
    pattern, sep, type_name = value.rpartition("=")
    if not sep or not pattern:
        raise ImpqError(None, f"--tensor-type {value!r}: write REGEX=TYPE, for example 'attn_v=q6_k'")
    try:
        re.compile(pattern)
    except re.error as err:
        raise ImpqError(None, f"--tensor-type {value!r}: not a regular expression ({err})") from None
    return pattern, grids[canonical_type_name(type_name, grids, "--tensor-type")]


def override_names(spec) -> dict[str, str]:
    """Each tensor's canonical name -> its GGUF name (blk.N.attn_v.weight in the text GGUF, v.blk.N.attn_q.weight
    and mm.0.weight in the mmproj), which an override's pattern may match as well as the canonical one:
    llama-quantize's --tensor-type vocabulary, whatever the target."""
    return {t.canonical: t.name for t in [*text_tensors(spec, QType.F16), *mmproj_tensors(spec, QType.F16)]
            if t.canonical}


@dataclass(frozen=True)
class Recipe(_Checked):
    calibration: Calibration | None = field(default_factory=Calibration)
    method: Method = field(default_factory=Method)
    target: GGUFPair | Safetensors = field(default_factory=GGUFPair)
    budget: Budget | None = None
    overrides: tuple[str, ...] = _setting((), flag="tensor_types")
    seed: int = _setting(0)                  # the calibration sampling's

    def check(self):
        exporting = self.method.name == NO_METHOD
        if exporting and (self.calibration is not None or self.budget is not None or self.overrides):
            raise ImpqError(None, "method none (an export) takes no calibration, budget or overrides")
        if not exporting and self.calibration is None:
            raise ImpqError(None, f"method {self.method.name} needs a calibration section")
        if self.budget is not None and not self.budget.given:
            raise ImpqError(None, "a budget needs --target-bpw or --target-size")
        if self.budget is not None and not self.target.budgets:
            raise ImpqError(None, f"--target-bpw and --target-size need --format gguf (for {self.target.format}, "
                                  "give compressed-tensors per-layer widths with --tensor-type REGEX=int8)")
        self.target.check_method(exporting)
        if self.overrides and not self.target.holds_overrides():
            raise ImpqError(None, f"--tensor-type: the {self.target.layout} layout holds one bit width per "
                                  "checkpoint; compressed-tensors holds several")
        self.tensor_overrides()              # each override is checked before any work

    def tensor_overrides(self) -> list[tuple[str, Grid]]:
        grids = self.target.override_grids()
        return [tensor_override(value, grids) for value in self.overrides]

    def grid(self) -> Grid:
        return self.target.grid()

    def vision_grid(self) -> Grid | None:
        """The vision side's grid where the method calibrates it (an export writes it by the type's own rule)."""
        return None if self.method.name == NO_METHOD else self.target.vision_grid()

    @property
    def label(self) -> str:
        """What names the artifact's precision: the decoder's grid, or the budget of a mix."""
        return self.budget.label() if self.budget is not None else self.target.label()

    def stem(self, model_name: str) -> str:
        return self.target.stem(model_name, self.label, self.method.name)

    # --- the CLI's flat view -------------------------------------------------------------------------------------

    @classmethod
    def from_flags(cls, **flags) -> "Recipe":
        """A recipe from the CLI's flag names (FLAGS), each missing one at its default. `bits` and `type`: the GGUF
        grid is --type (with --bits, they must agree), or --bits' default type; safetensors takes --layout, --bits
        and --group-size."""
        unknown = sorted(set(flags) - set(ALL_FLAGS))
        if unknown:
            raise ImpqError(None, f"{unknown[0]}: not a quantize setting; known: {', '.join(sorted(ALL_FLAGS))}")
        values = {k: v for k, v in flags.items() if v is not None or k in NULLABLE_FLAGS}
        format = values.pop("format", GGUFPair.format)
        if format not in TARGET_SPECS:
            raise ImpqError(None, f"--format {format}: choose one of {', '.join(FORMATS)}")
        bits = values.pop("bits", None)
        if bits is not None and (not isinstance(bits, int) or isinstance(bits, bool)):
            raise ImpqError(None, f"bits {bits!r}: expected int")
        named = {key: values.pop(key) for key in TARGET_FLAGS if key in values}
        target = TARGET_SPECS[format].from_flags(bits, named, values.get("method") == NO_METHOD)
        sections = {}
        for flag, value in values.items():
            section, name = FLAGS[flag]
            sections.setdefault(section, {})[name] = value
        budget = Budget(**sections.get("budget", {}))
        method = Method(**sections.get("method", {}))
        return cls(calibration=None if method.name == NO_METHOD else Calibration(**sections.get("calibration", {})),
                   method=method, target=target, budget=budget if budget.given else None,
                   **sections.get("recipe", {}))

    def flags(self) -> dict:
        """The recipe in the CLI's flag names: what flags given beside a recipe file are laid over."""
        flat = {"format": self.target.format, "bits": self.target.bits}
        flat.update({name: getattr(self.target, name) for name in TARGET_FLAGS if hasattr(self.target, name)})
        for flag, (section, name) in FLAGS.items():
            owner = self if section == "recipe" else getattr(self, section)
            if owner is not None:
                flat[flag] = getattr(owner, name)
        return flat

    # --- documents -----------------------------------------------------------------------------------------------

    def document(self, model_dir: Path) -> dict:
        """The recipe as a schema-2 document, with no machine path in it: the model and files by name."""
        def names(section):
            values = dataclasses.asdict(section)
            values.update({k: Path(v).name for k, v in values.items() if k in PATH_FIELDS and v is not None})
            return {k: list(v) if isinstance(v, tuple) else v for k, v in values.items()}

        calibration = None
        if self.calibration is not None:
            calibration = {**names(self.calibration),
                           "data": calibration_reference(self.calibration.data, Path(model_dir))}
        return {"schema_version": SCHEMA_VERSION, "model": model_reference(Path(model_dir)),
                "calibration": calibration, "seed": self.seed, "method": names(self.method),
                "target": {"format": self.target.format, **names(self.target)},
                "budget": None if self.budget is None else names(self.budget), "overrides": list(self.overrides)}

    @classmethod
    def from_document(cls, document: dict, calib: Path | None = None) -> "Recipe":
        """A schema-2 document's recipe (values checked as a flag's are); `calib`: the calibration file where the
        document names one by its name (None: the model's default)."""
        sections = {"method": Method, "calibration": Calibration, "budget": Budget}
        values = {}
        for key, kind in sections.items():
            part = document.get(key)
            if part is None:
                values[key] = None
                continue
            _known_keys(part, kind, key)
            values[key] = kind(**{**part, **({"data": None if calib is None else str(calib)}
                                             if key == "calibration" else {})})
        if values["method"] is None:
            raise ImpqError(None, "a recipe needs a 'method' section")
        target = dict(document.get("target") or {"format": "gguf"})
        kind = TARGET_SPECS.get(target.pop("format", None))
        if kind is None:
            raise ImpqError(None, f"target format {document['target'].get('format')!r}: choose one of "
                                  f"{', '.join(FORMATS)}")
        _known_keys(target, kind, "target")
        return cls(calibration=values["calibration"], method=values["method"], target=kind(**target),
                   budget=values["budget"], overrides=document.get("overrides") or (), seed=document.get("seed", 0))


# flag name -> (section, field): how the CLI, schema 1 and flags beside a recipe address a field
FLAGS = {flag_of(kind, f.name): (section, f.name)
         for section, kind in (("calibration", Calibration), ("method", Method), ("budget", Budget),
                               ("recipe", Recipe))
         for f in dataclasses.fields(kind) if f.name not in ("calibration", "method", "target", "budget")}
TARGET_FLAGS = ("type", "layout", "group_size", "embeddings", "vision")     # a target section's own fields
ALL_FLAGS = (*FLAGS, "bits", "format", *TARGET_FLAGS)
NULLABLE_FLAGS = ("target_bpw", "target_size", "sensitivity_data", "sensitivity_file", "calib")
PATH_FIELDS = ("data", "sensitivity_data", "sensitivity_file")


def _known_keys(values: dict, kind, section: str) -> None:
    if not isinstance(values, dict):
        raise ImpqError(None, f"recipe section {section!r}: expected a mapping")
    known = [f.name for f in dataclasses.fields(kind)]
    unknown = sorted(set(values) - set(known))
    if unknown:
        raise ImpqError(None, f"recipe key {unknown[0]!r} under {section!r} is unknown; known: {', '.join(known)}")


def export_recipe(type_name: str, mmproj_type: str) -> Recipe:
    """`impq export`'s recipe: no method, the writer's round-to-nearest onto `type_name` (embeddings and output
    head at 8 bits below Q8_0, as the writer does) and an mmproj at `mmproj_type`."""
    type_name = canonical_type_name(type_name, EXPORT_TYPES, "--type")
    return Recipe(calibration=None, method=Method(name=NO_METHOD),
                  target=GGUFPair(type=type_name, embeddings=type_name if type_name in UNQUANTIZED_TYPES else "q8_0",
                                  vision=mmproj_type))


def export_with_recipe(spec, out_dir: Path, type_name: str = "f16", mmproj_type: str | None = None, on_tensor=None,
                       reduction=None):
    """`impq export`: the GGUF pair (export/pair.py), carrying its recipe."""
    recipe = export_recipe(type_name, mmproj_type or type_name)
    return export_pair(spec, out_dir, recipe.target.type, recipe.target.vision, recipe.document(spec.folder),
                       on_tensor, reduction)


def model_reference(model_dir: Path) -> str:
    return EMBEDDED_MODEL if is_embedded_model(model_dir) else Path(model_dir).resolve().name


def calibration_reference(calib: str | None, model_dir: Path) -> str:
    if calib is None or Path(calib).resolve() == default_calib_data(model_dir).resolve():
        return DEFAULT_CALIBRATION
    return Path(calib).name


def calibration_path(recipe: Recipe, model_dir: Path) -> Path:
    """The run's calibration file: the recipe's, or the model's default."""
    return Path(recipe.calibration.data) if recipe.calibration.data is not None else default_calib_data(model_dir)


def migrate_schema_1(document: dict, calib: Path | None) -> Recipe:
    """A schema-1 document (a flat `quantize` section of flag names) as a recipe. Schema 1 wrote every field; one
    without `sensitivity` predates "scaled" and measured every candidate."""
    quantize = document["quantize"]
    unknown = sorted(set(quantize) - set(ALL_FLAGS) - {"calib"})
    if unknown:
        raise ImpqError(None, f"recipe key {unknown[0]!r} under 'quantize' is unknown; known: "
                              f"{', '.join(sorted(ALL_FLAGS))}")
    values = {"sensitivity": "measured", **quantize, "calib": None if calib is None else str(calib)}
    if values.get("target_bpw") is None and values.get("target_size") is None:
        values.pop("sensitivity")            # a run without a budget: the field never applied
    return Recipe.from_flags(**values)


def read_document(path: Path) -> dict:
    """A recipe file's YAML, checked for what every schema shares: a mapping, known top-level keys, a version this
    impq reads."""
    if not path.is_file():
        raise ImpqError(path, "recipe not found")
    try:
        document = yaml.safe_load(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as err:
        raise ImpqError(path, f"recipe is not UTF-8 text ({err.reason} at byte {err.start})") from None
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        raise ImpqError(path, f"recipe is not valid YAML: {getattr(err, 'problem', None) or err}{where}") from None
    if not isinstance(document, dict):
        raise ImpqError(path, "recipe needs a mapping at the top (see impq/recipe.py for the schema)")
    version = document.get("schema_version")
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise ImpqError(path, f"recipe schema_version {version!r}: expected a positive integer")
    if version > SCHEMA_VERSION:
        raise ImpqError(path, f"recipe schema_version {version} is newer than this impq's ({SCHEMA_VERSION}): "
                              "upgrade impq")
    known = ("schema_version", "model", "calibration", "quantize", "resolved", "outputs") if version == 1 else TOP_LEVEL
    unknown = [key for key in document if key not in known]
    if unknown:
        hint = "; quantize settings go under 'quantize'" if version == 1 else ""
        raise ImpqError(path, f"recipe key {unknown[0]!r} is unknown at the top level (known: {', '.join(known)}"
                              f"{hint})")
    if version == 1 and not isinstance(document.get("quantize"), dict):
        raise ImpqError(path, "recipe needs a 'quantize' mapping (see impq/recipe.py for the schema)")
    return document


def calibration_name(document: dict) -> str | None:
    """The calibration a document names (DEFAULT_CALIBRATION, a file name, or None for an export)."""
    calibration = document.get("calibration")
    return calibration.get("data") if isinstance(calibration, dict) else calibration


def recipe_of(document: dict, path: Path, calib: Path | None, flags: dict | None = None) -> Recipe:
    """A document's recipe (schema 1 migrated), with `flags` (CLI names) laid over it: they win, and a --type
    given alone brings its own bit width."""
    try:
        recipe = migrate_schema_1(document, calib) if document["schema_version"] == 1 else \
            Recipe.from_document(document, calib)
        if flags:
            values = {**recipe.flags(), **flags}
            if flags.get("type") and "bits" not in flags:
                values.pop("bits")                   # a --type given alone brings its own bit width
            if "format" in flags and flags["format"] != recipe.target.format:
                values = {k: v for k, v in values.items() if k not in TARGET_FLAGS or k in flags}
            recipe = Recipe.from_flags(**values)
    except ImpqError as err:
        raise ImpqError(path, f"recipe: {err.problem}") from None
    return recipe


def recipe_run(recipe_path: Path, model: Path | None, calib: Path | None, flags: dict) -> tuple[Path, Recipe]:
    """(model folder, Recipe) of a recipe file: the embedded model and the default calibration resolve by
    themselves; a recipe of another checkpoint or calibration file needs MODEL / --calib, given here."""
    document = read_document(Path(recipe_path))
    if model is None:
        if document.get("model") != EMBEDDED_MODEL:
            raise ImpqError(recipe_path, f"the recipe's model is {document.get('model')!r}: give its checkpoint folder")
        model = default_model_dir()
    named = calibration_name(document)
    if calib is None and named not in (DEFAULT_CALIBRATION, None):
        raise ImpqError(recipe_path, f"the recipe's calibration is {named!r}: pass --calib FILE")
    return Path(model), recipe_of(document, Path(recipe_path), calib, flags)


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def output_files(artifacts: dict) -> list[Path]:
    """Every file of an artifact (a GGUF pair, or a safetensors folder's files), in a stable order."""
    files = []
    for value in artifacts.values():
        path = Path(value)
        files += sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    return files


def write_resolved_recipe(path: Path, document: dict, resolved: dict, outputs: dict[str, str]) -> None:
    path.write_text(yaml.safe_dump({**document, "resolved": resolved, "outputs": outputs}, sort_keys=False))
