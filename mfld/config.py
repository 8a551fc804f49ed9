"""The run configuration: one schema, validated before JAX is imported.

A config is a YAML file with sections ``data``, ``model``, ``objective``, ``dynamics``,
``record`` and the top-level ``seed``, ``precision`` and ``name``. Every field has a default
(``mfld config`` prints them, commented); dotted overrides (``--set objective.tau=0.01``)
change single fields. Unknown keys are rejected with the nearest valid name suggested.

This module deliberately does not import JAX, so a bad config fails fast.
"""

from __future__ import annotations

import difflib
import os
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from mfld import choices
from mfld.errors import ConfigError, short_repr

#: Largest seed: the dynamics key is ``jax.random.key(seed)``, whose key data agree with and
#: without x64 only below 2^32 (without x64 a larger seed is silently truncated to 32 bits).
MAX_SEED = 2 ** 32 - 1
#: Longest run name (it becomes a directory name with a timestamp appended; most file systems
#: allow 255 bytes).
MAX_NAME = 100

ACTIVATION_NAMES = choices.ACTIVATIONS
DEFAULT_TEACHER_PARAMS = dict(n=64, d=1, teacher_width=3, noise=0.05, n_test=256)
DATA_KINDS = choices.DATA_KINDS


class _Section(BaseModel):
    # strict: no silent coercion ("3" is not a number, true is not an integer, 2.0 is not a
    # step count); an int is accepted where a float is expected. NaN and inf are refused.
    model_config = ConfigDict(extra="forbid", validate_assignment=True, strict=True, allow_inf_nan=False)


class DataConfig(_Section):
    """Where the data come from. ``params`` are passed to the generator of ``kind``."""

    kind: Literal[DATA_KINDS] = "teacher_student"  # type: ignore[valid-type]
    seed: int | None = Field(default=None, ge=0, le=MAX_SEED, description="data seed (default: the run seed)")
    params: dict[str, Any] = Field(
        default_factory=lambda: dict(DEFAULT_TEACHER_PARAMS),
        description="generator parameters (see mfld.data.make_dataset)")

    @model_validator(mode="after")
    def _params_follow_kind(self):
        # The default params are the default teacher-student problem's; choosing another
        # kind without giving params must not carry them over (they would be unknown there).
        if "params" not in self.model_fields_set and self.kind != "teacher_student":
            object.__setattr__(self, "params", {})
        # A data file is recorded by its absolute path, so that `mfld plot` and `--resume`
        # find it from any directory (relative paths are taken from the current directory).
        path = self.params.get("path") if self.kind == "file" else None
        if isinstance(path, str) and path.strip() and "\0" not in path:
            absolute = os.path.abspath(os.path.expanduser(path))
            if absolute != path:
                object.__setattr__(self, "params", {**self.params, "path": absolute})
        return self


class InitConfig(_Section):
    a_scale: float = Field(default=1.0, ge=0, description="std of the initial second-layer weights")
    w_scale: float = Field(default=1.0, ge=0, description="std of the initial first-layer weights")
    plus_fraction: float = Field(default=0.5, ge=0, le=1,
                                 description="fraction of a_i = +1 for a fixed output layer")


class ModelConfig(_Section):
    activation: Literal[ACTIVATION_NAMES] = "tanh"  # type: ignore[valid-type]
    bias: bool = True
    output: Literal[choices.OUTPUTS] = "trained"  # type: ignore[valid-type]
    r_out: float = Field(default=1.0, gt=0, description="bound of the bounded output layer")
    scaling: Literal[choices.SCALINGS] = "mean_field"  # type: ignore[valid-type]
    n_particles: int = Field(default=4000, ge=1, description="number of neurons N")
    init: InitConfig = Field(default_factory=InitConfig)


class ObjectiveConfig(_Section):
    loss: Literal[choices.LOSSES] = "squared"  # type: ignore[valid-type]
    lam: float = Field(default=0.1, gt=0, description="weight decay lambda")
    tau: float = Field(default=0.05, ge=0, description="temperature tau (0: noiseless flow)")


class DynamicsConfig(_Section):
    scheme: Literal[choices.SCHEMES] = "euler"  # type: ignore[valid-type]
    eta: float = Field(default=0.02, gt=0, description="step size; time t = step * eta")
    steps: int = Field(default=1000, ge=0)
    batch_size: int | None = Field(default=None, ge=1, description="minibatch size (null: full batch)")
    tau_schedule: Literal[choices.TAU_SCHEDULES] = "constant"  # type: ignore[valid-type]
    chunk: int | None = Field(default=None, ge=1, description="steps per compiled chunk (default: record.every)")


class RecordConfig(_Section):
    every: int = Field(default=10, ge=1, description="record metrics every K steps")
    # default 100, not every record: a certificate costs ~0.15 s (d = 1) to ~0.4 s (d = 10) per
    # record, more than 100 steps at N = 4000 (docs/certificates.md, "Cost")
    certify_every: int = Field(default=100, ge=0,
                               description="record the dual/primal bounds every K steps (0: off)")
    certify_method: Literal[choices.CERTIFY_METHODS] = "auto"  # type: ignore[valid-type]
    certify_samples: int = Field(default=65536, ge=16, description="Monte Carlo samples for log Z")
    optimum: bool = Field(default=True, description="solve for F* first and plot F - F* (needs tau > 0)")
    checkpoint_every: int = Field(default=500, ge=0, description="checkpoint every K steps (0: end only)")
    snapshot_every: int = Field(default=0, ge=0, description="save particle snapshots every K steps (0: off)")
    progress: bool = True

    @model_validator(mode="after")
    def _multiples(self):
        for name in ("certify_every", "checkpoint_every", "snapshot_every"):
            v = getattr(self, name)
            if v and v % self.every:
                raise ConfigError(f"must be a multiple of record.every={self.every}", field=f"record.{name}",
                                  value=v, allowed=f"0 or a multiple of {self.every}")
        return self


class Config(_Section):
    """The whole run configuration."""

    name: str = Field(default="run", description="a label for the run")
    seed: int = Field(default=0, ge=0, le=MAX_SEED)
    precision: Literal[choices.PRECISIONS] = "float32"  # type: ignore[valid-type]
    data: DataConfig = Field(default_factory=DataConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    objective: ObjectiveConfig = Field(default_factory=ObjectiveConfig)
    dynamics: DynamicsConfig = Field(default_factory=DynamicsConfig)
    record: RecordConfig = Field(default_factory=RecordConfig)

    @field_validator("name")
    @classmethod
    def _name(cls, v):
        allowed = f"a label of 1..{MAX_NAME} characters without slashes or control characters"
        if len(v) > MAX_NAME:
            raise ConfigError(f"run name of {len(v)} characters is too long", field="name", value=v,
                              allowed=allowed)
        if not v.strip() or any(c in v for c in "/\\") or any(ord(c) < 32 or ord(c) == 127 for c in v) \
                or v in (".", ".."):
            raise ConfigError("invalid run name", field="name", value=v, allowed=allowed)
        return v

    @model_validator(mode="after")
    def _closed_form_applies(self):
        if self.record.certify_method == "closed_form" and not choices.closed_form_applies(
                self.model.activation == "linear", self.model.output):
            raise ConfigError("the closed form of the certificate needs the linear activation and a trained or "
                              f"fixed output layer (this config: activation {self.model.activation}, output "
                              f"{self.model.output})", field="record.certify_method", value="closed_form",
                              allowed="auto, quadrature, mc")
        return self

    def to_dict(self) -> dict:
        return self.model_dump(mode="json")

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


# ---------------------------------------------------------------------------------------
# Loading, overrides, error messages
# ---------------------------------------------------------------------------------------

def _all_paths(model_cls: type[BaseModel], prefix: str = "") -> list[str]:
    out = []
    for name, f in model_cls.model_fields.items():
        path = f"{prefix}{name}"
        out.append(path)
        ann = f.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            out.extend(_all_paths(ann, path + "."))
    return out


def _suggest(bad: str, candidates: list[str]) -> str:
    close = difflib.get_close_matches(bad, candidates, n=1, cutoff=0.5)
    if not close:
        leaf = bad.rsplit(".", 1)[-1]
        close = [c for c in candidates if c.rsplit(".", 1)[-1] == leaf]
    return f"; did you mean '{close[0]}'?" if close else ""


_TYPE_ALLOWED = {
    "int_type": "an integer", "int_parsing": "an integer", "int_from_float": "an integer",
    "float_type": "a number", "float_parsing": "a number", "finite_number": "a finite number",
    "bool_type": "true or false", "bool_parsing": "true or false",
    "string_type": "a string", "dict_type": "a mapping", "model_type": "a mapping of fields",
    "model_attributes_type": "a mapping of fields", "none_required": "null",
}


def _allowed_from_error(e: dict) -> str:
    ctx = e.get("ctx") or {}
    kind = e["type"]
    number = "an integer" if isinstance(ctx.get("ge", ctx.get("gt", ctx.get("le", ctx.get("lt")))), int) \
        else "a number"
    bounds = {"greater_than": f"{number} > {ctx.get('gt')}", "greater_than_equal": f"{number} >= {ctx.get('ge')}",
              "less_than": f"{number} < {ctx.get('lt')}", "less_than_equal": f"{number} <= {ctx.get('le')}"}
    if kind in bounds:
        return bounds[kind]
    if kind == "literal_error":
        return "one of " + ctx.get("expected", "").replace(" or ", ", ")
    return _TYPE_ALLOWED.get(kind, e["msg"].replace("Input should be ", ""))


def _format_error(err: ValidationError) -> ConfigError:
    """The first validation problem as a one-line :class:`ConfigError` (field, value, allowed)."""
    errors = err.errors()
    # Union types (``int | None``) report one error per member: prefer the informative one.
    e = next((x for x in errors if x["type"] != "none_required"), errors[0])
    parts = [str(p) for p in e["loc"] if not isinstance(p, int)
             and p not in ("int", "float", "none", "function-after[_name(), str]")]
    loc = ".".join(parts)
    kind = e["type"]
    value = e.get("input")
    exc = (e.get("ctx") or {}).get("error")
    if isinstance(exc, ConfigError):  # raised by a validator with its own field and allowed text
        return exc
    if kind == "extra_forbidden":
        section = loc.rsplit(".", 1)[0] if "." in loc else ""
        allowed = [p for p in _all_paths(Config)
                   if (section and "." in p and p.rsplit(".", 1)[0] == section) or (not section and "." not in p)]
        return ConfigError(f"unknown key{_suggest(loc, _all_paths(Config))}", field=loc,
                           allowed=", ".join(a.rsplit('.', 1)[-1] for a in allowed))
    if kind == "missing":
        return ConfigError("missing value", field=loc or None)
    hint = ""
    if kind == "literal_error" and isinstance(value, str):
        options = [str(o) for o in ((e.get("ctx") or {}).get("expected_values") or ())] or \
            [o.strip().strip("'") for o in str((e.get("ctx") or {}).get("expected", "")).replace(" or ", ", ")
             .split(",")]
        close = difflib.get_close_matches(value.strip().lower(), options, n=1, cutoff=0.6)
        hint = f"; did you mean '{close[0]}'?" if close else ""
    return ConfigError(f"invalid value {_short(value)}{hint}", field=loc or "config",
                       allowed=_allowed_from_error(e))


def _short(v) -> str:
    return short_repr(v, 60)


def validate(data: dict | None) -> Config:
    """Validate a (possibly partial) config dict; raise :class:`ConfigError` on the first problem."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"a config must be a mapping of sections, got {type(data).__name__}",
                          field="config", allowed="a YAML mapping")
    try:
        return Config.model_validate(data)
    except ValidationError as err:
        raise _format_error(err) from None


# ---------------------------------------------------------------------------------------
# YAML: bounded, strict about duplicates, YAML 1.2 numbers
# ---------------------------------------------------------------------------------------

#: Largest config file (bytes) and ``--set`` value (characters) that are parsed at all.
MAX_YAML_BYTES = 1 << 20
MAX_OVERRIDE_CHARS = 100_000
#: Largest number of YAML nodes a document may expand to, counting every alias at its full
#: size (a "billion laughs" document of a few hundred bytes expands to billions).
MAX_YAML_NODES = 100_000


class YAMLProblem(Exception):
    """A problem of a YAML text that is not a syntax error (duplicate key, too large)."""


class _Loader(yaml.SafeLoader):
    """PyYAML's safe loader with YAML 1.2 exponent floats (``1e-3``, ``2E5``: PyYAML's YAML 1.1
    resolver reads them as strings) and duplicate mapping keys refused."""

    def construct_mapping(self, node, deep=False):
        if isinstance(node, yaml.MappingNode):
            seen = set()
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    continue
                key = self.construct_object(key_node, deep=True)
                try:
                    dup = key in seen
                    seen.add(key)
                except TypeError:  # unhashable: PyYAML reports it below
                    continue
                if dup:
                    raise YAMLProblem(f"duplicate key {short_repr(key, 40)} at line {key_node.start_mark.line + 1}")
        return super().construct_mapping(node, deep=deep)


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9][0-9_]*)[eE][-+]?[0-9]+$"),
    list("-+0123456789."))


def _expanded_size(root) -> int:
    """The number of nodes of a composed YAML document with every alias expanded (computed
    without expanding: sizes are memoised per node); raises on recursive aliases."""
    size: dict[int, int] = {}
    active: set[int] = set()
    stack = [(root, False)]
    while stack:
        node, done = stack.pop()
        k = id(node)
        if done:
            active.discard(k)
            kids = (node.value if isinstance(node, yaml.SequenceNode) else
                    [x for pair in node.value for x in pair])
            size[k] = min(1 + sum(size[id(c)] for c in kids), MAX_YAML_NODES + 1)
            continue
        if k in size:
            continue
        if isinstance(node, yaml.ScalarNode):
            size[k] = 1
            continue
        if k in active:
            raise YAMLProblem("a recursive alias (a structure that contains itself)")
        active.add(k)
        stack.append((node, True))
        kids = node.value if isinstance(node, yaml.SequenceNode) else [x for pair in node.value for x in pair]
        stack.extend((c, False) for c in kids if id(c) not in size)
    return size[id(root)]


#: Deepest nesting of flow collections (``[...]``, ``{...}``) parsed (PyYAML's scanner takes
#: time quadratic in it).
MAX_YAML_DEPTH = 64


def _flow_depth_ok(text: str) -> bool:
    """Whether no flow collection nests deeper than :data:`MAX_YAML_DEPTH` (brackets inside
    quotes and comments ignored; a quick over-estimate elsewhere)."""
    if text.count("[") + text.count("{") <= MAX_YAML_DEPTH:
        return True
    depth, quote, prev = 0, None, "\n"
    i, n = 0, len(text)
    while i < n:
        ch = text[i]
        if quote:
            if ch == quote:
                quote = None
        elif ch in "'\"" and prev in " \t\n[{,:":
            quote = ch
        elif ch == "#" and prev in " \t\n":
            j = text.find("\n", i)
            i = n if j < 0 else j
            prev = "\n"
            continue
        elif ch in "[{":
            depth += 1
            if depth > MAX_YAML_DEPTH:
                return False
        elif ch in "]}":
            depth = max(depth - 1, 0)
        prev = ch
        i += 1
    return True


def safe_load(text: str):
    """Parse one YAML document with :class:`_Loader`, refusing documents that expand (through
    aliases) to more than :data:`MAX_YAML_NODES` nodes. Raises ``yaml.YAMLError`` (syntax) or
    :class:`YAMLProblem` (duplicate key, too large, recursive, nested too deeply)."""
    if not _flow_depth_ok(text):
        raise YAMLProblem(f"nested deeper than {MAX_YAML_DEPTH} levels")
    loader = _Loader(text)
    try:
        try:
            node = loader.get_single_node()
            if node is None:
                return None
            n = _expanded_size(node)
            if n > MAX_YAML_NODES:
                raise YAMLProblem(f"expands to more than {MAX_YAML_NODES} values (aliases)")
            return loader.construct_document(node)
        except RecursionError:
            raise YAMLProblem("nested too deeply") from None
    finally:
        loader.dispose()


def parse_value(text: str):
    """Parse the right-hand side of ``--set key=value`` as YAML (numbers, bools, null, lists);
    text that is not YAML stays a string. ``1e-3`` is a number (YAML 1.2)."""
    if text == "":
        return ""
    if len(text) > MAX_OVERRIDE_CHARS:
        raise ConfigError(f"override value of {len(text)} characters is too long", field="--set",
                          value=text, allowed=f"at most {MAX_OVERRIDE_CHARS} characters")
    try:
        return safe_load(text)
    except YAMLProblem as err:
        raise ConfigError(f"override value refused: {err}", field="--set", value=text) from None
    except yaml.YAMLError:
        return text


def apply_overrides(data: dict, overrides: list[str] | dict | None) -> dict:
    """Apply dotted overrides (``["objective.tau=0.01", ...]``, YAML values, or a dict of Python
    values such as ``{"objective.tau": 0.01}``) to a config dict."""
    data = _deepcopy(data or {})
    if not overrides:
        return data
    # "--set key=value" texts are parsed as YAML; a dict's values are already Python values and
    # are taken as they are (overrides={"name": "0"} names the run "0")
    typed = isinstance(overrides, dict)
    items = overrides.items() if typed else [_split(o) for o in overrides]
    valid = _all_paths(Config)
    for key, value in items:
        parts = key.split(".")
        if not key or any(not p for p in parts):
            raise ConfigError("malformed override key", field="--set", value=key, allowed="dotted.key=value")
        if parts[0] != "data" or len(parts) < 3 or parts[1] != "params":
            if key not in valid:
                raise ConfigError(f"unknown key '{key}'{_suggest(key, valid)}", field="--set")
        if parts[:2] == ["data", "params"] and len(parts) > 2:
            sec = data.setdefault("data", {})
            if isinstance(sec, dict) and "params" not in sec and sec.get("kind", "teacher_student") == \
                    DataConfig.model_fields["kind"].default:
                # one generator parameter overridden: keep the default problem's other parameters
                sec["params"] = DataConfig().params
        node = data
        for p in parts[:-1]:
            nxt = node.get(p)
            if nxt is None:
                nxt = node[p] = {}
            if not isinstance(nxt, dict):
                where = ".".join(parts[:parts.index(p) + 1])
                raise ConfigError(f"invalid value {_short(nxt)} (needed by --set {key})", field=where,
                                  allowed="a mapping of fields (a section)")
            node = nxt
        node[parts[-1]] = value if typed or not isinstance(value, str) else parse_value(value)
    return data


def _split(o: str):
    if "=" not in o:
        raise ConfigError("override must look like key=value", field="--set", value=o,
                          allowed="dotted.key=value, e.g. objective.tau=0.01")
    k, v = o.split("=", 1)
    return k.strip(), v.strip()


def _deepcopy(d):
    """A copy of nested dicts and lists, refusing more than :data:`MAX_YAML_NODES` values (a
    Python structure that shares sub-lists expands like a YAML alias bomb)."""
    budget = [MAX_YAML_NODES]

    def copy(x, depth):
        budget[0] -= 1
        if budget[0] < 0 or depth > 200:
            raise ConfigError(f"the config holds more than {MAX_YAML_NODES} values (or is nested deeper than 200)",
                              field="config", allowed="a config of ordinary size")
        if isinstance(x, dict):
            return {k: copy(v, depth + 1) for k, v in x.items()}
        if isinstance(x, list):
            return [copy(v, depth + 1) for v in x]
        return x

    return copy(d, 0)


def read_yaml(path: str | Path, field: str = "config") -> dict:
    """A YAML file (at most :data:`MAX_YAML_BYTES`, see :func:`safe_load`); every problem is a
    :class:`ConfigError` naming ``field`` and the file."""
    path = Path(path)
    if not path.exists():
        raise ConfigError("config file not found", field=field, value=str(path))
    if path.is_dir():
        raise ConfigError("config path is a directory", field=field, value=str(path),
                          allowed="a YAML file")
    try:
        with open(path, "rb") as f:
            raw = f.read(MAX_YAML_BYTES + 1)
    except OSError as err:
        raise ConfigError(f"cannot read the file ({err.strerror or err})", field=field, value=str(path)) from None
    if len(raw) > MAX_YAML_BYTES:
        raise ConfigError(f"file larger than {MAX_YAML_BYTES} bytes", field=field, value=str(path),
                          allowed="a config file of at most 1 MiB")
    try:
        data = safe_load(raw.decode("utf-8"))
    except UnicodeDecodeError:
        raise ConfigError("not a text file (not UTF-8)", field=field, value=str(path)) from None
    except YAMLProblem as err:
        raise ConfigError(f"YAML refused: {err}", field=field, value=str(path)) from None
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"not valid YAML{where}", field=field, value=str(path)) from None
    return {} if data is None else data


def load(path: str | Path | None = None, overrides: list[str] | dict | None = None) -> Config:
    """Defaults <- YAML file (optional) <- dotted overrides, validated."""
    data = read_yaml(path) if path is not None else {}
    if not isinstance(data, dict):
        raise ConfigError("a config file must be a YAML mapping of sections", field="config",
                          value=str(path))
    return validate(apply_overrides(data, overrides))


def commented_default() -> str:
    """The default config as YAML, each field followed by a comment saying what it is."""
    lines = ["# mfld run configuration (all fields optional; these are the defaults)"]

    def walk(model: BaseModel, indent: int):
        for name, f in type(model).model_fields.items():
            val = getattr(model, name)
            pad = "  " * indent
            desc = f.description or ""
            if isinstance(val, BaseModel):
                lines.append(f"{pad}{name}:" + (f"  # {desc}" if desc else ""))
                walk(val, indent + 1)
            else:
                dumped = yaml.safe_dump({name: val}, default_flow_style=True, sort_keys=False).strip()
                if dumped.startswith("{") and dumped.endswith("}"):
                    dumped = dumped[1:-1]
                allowed = _allowed_text(f)
                comment = "; ".join(c for c in (desc, allowed) if c)
                lines.append(f"{pad}{dumped}" + (f"  # {comment}" if comment else ""))

    walk(Config(), 0)
    return "\n".join(lines) + "\n"


def _allowed_text(f) -> str:
    args = getattr(f.annotation, "__args__", None)
    if getattr(f.annotation, "__origin__", None) is Literal or (args and all(isinstance(a, str) for a in args)):
        return "one of " + ", ".join(args)
    return ""


# ---------------------------------------------------------------------------------------
# Comparing configs (resume)
# ---------------------------------------------------------------------------------------

#: Fields a resumed run may change: extending a run (more steps) and cosmetics.
RESUME_MAY_CHANGE = ("dynamics.steps", "record.progress")


def flatten(d: dict, prefix: str = "") -> dict:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}`` (``data.params`` entries are flattened too)."""
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


def differences(a: Config, b: Config) -> list[tuple[str, object, object]]:
    """The fields whose values differ between two configs: ``[(dotted_key, a_value, b_value)]``."""
    fa, fb = flatten(a.to_dict()), flatten(b.to_dict())
    return [(k, fa.get(k), fb.get(k)) for k in sorted(set(fa) | set(fb)) if fa.get(k) != fb.get(k)]


def check_resumable(stored: Config, given: Config) -> None:
    """Refuse to resume a run under a different config (only :data:`RESUME_MAY_CHANGE` may differ)."""
    bad = [d for d in differences(stored, given) if d[0] not in RESUME_MAY_CHANGE]
    if bad:
        key, old, new = bad[0]
        more = f" (and {len(bad) - 1} more field{'s' if len(bad) > 2 else ''})" if len(bad) > 1 else ""
        raise ConfigError(f"the config differs from the stored run at {key}: stored {old!r}, given {new!r}{more}",
                          field="--resume", allowed="the stored config; only " + ", ".join(RESUME_MAY_CHANGE)
                          + " may change")
