"""The config schema: defaults, strict types and ranges, one-line errors, overrides, resume checks.

Property tests (hypothesis): YAML -> Config -> YAML round trips, dotted overrides of random
valid values land in exactly the named field, and random invalid values are rejected with a
message that names the field and the value. Pure Python: no JAX.
"""

from __future__ import annotations

import math
import string
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mfld import config as cfgmod
from mfld.errors import ConfigError

# ---------------------------------------------------------------------------------------
# An independent description of the schema: leaf path -> (valid values, invalid values).
# Written from the documented ranges, not read from the pydantic model, so a changed range
# or type in config.py fails here.
# ---------------------------------------------------------------------------------------

pos_float = st.floats(min_value=1e-6, max_value=1e6, allow_nan=False, allow_infinity=False)
nonneg_float = st.one_of(st.just(0.0), pos_float)
unit = st.floats(min_value=0.0, max_value=1.0, allow_nan=False)
nonneg_int = st.integers(min_value=0, max_value=10**9)
pos_int = st.integers(min_value=1, max_value=10**6)
_EVERY = cfgmod.Config().record.every
multiple_of_20 = st.integers(min_value=0, max_value=10**7).map(lambda k: 20 * _EVERY * k)  # of record.every
label = st.text(alphabet=string.ascii_letters + string.digits + "-_.", min_size=1, max_size=12).filter(
    lambda s: s not in (".", ".."))
not_number = st.sampled_from(["abc", "0.1", True, False, [1], {"x": 1}, None])
not_int = st.sampled_from(["3", 2.0, 1.5, True, [1], None])
not_bool = st.sampled_from(["yes", 1, 0, 1.0, None, "true"])
non_finite = st.sampled_from([math.nan, math.inf, -math.inf])


def one_of(*vals):
    return st.sampled_from(vals)


LEAVES = {
    "name": (label, st.sampled_from(["", "a/b", "x\ny", "..", 5, None])),
    "seed": (nonneg_int, st.one_of(st.integers(max_value=-1), not_int)),
    "precision": (one_of("float32", "float64"), st.sampled_from(["float16", "double", 64, None])),
    "data.kind": (one_of("teacher_student", "single_index", "gaussian_mixture", "sparse_parity", "sklearn",
                         "file"), st.sampled_from(["mnist", "", 3, None])),
    "data.seed": (st.one_of(st.none(), nonneg_int), st.one_of(st.integers(max_value=-1), not_int.filter(
        lambda v: v is not None))),
    "model.activation": (one_of("tanh", "sigmoid", "erf", "relu", "softplus", "gelu", "linear"),
                         st.sampled_from(["Tanh", "swish", 1, None])),
    "model.bias": (st.booleans(), not_bool),
    "model.output": (one_of("trained", "fixed", "bounded"), st.sampled_from(["free", 1, None])),
    "model.r_out": (pos_float, st.one_of(st.floats(max_value=0.0, allow_nan=False), non_finite, not_number)),
    "model.scaling": (one_of("mean_field", "ntk"), st.sampled_from(["mf", "NTK", None])),
    "model.n_particles": (pos_int, st.one_of(st.integers(max_value=0), not_int)),
    "model.init.a_scale": (nonneg_float, st.one_of(st.floats(max_value=-1e-9, allow_nan=False), non_finite,
                                                   not_number)),
    "model.init.w_scale": (nonneg_float, st.one_of(st.floats(max_value=-1e-9, allow_nan=False), non_finite,
                                                   not_number)),
    "model.init.plus_fraction": (unit, st.one_of(st.floats(min_value=1.0001, allow_nan=False,
                                                           allow_infinity=False), st.floats(max_value=-1e-9,
                                                           allow_nan=False), non_finite, not_number)),
    "objective.loss": (one_of("squared", "logistic"), st.sampled_from(["l2", "hinge", None])),
    "objective.lam": (pos_float, st.one_of(st.floats(max_value=0.0, allow_nan=False), non_finite, not_number)),
    "objective.tau": (nonneg_float, st.one_of(st.floats(max_value=-1e-9, allow_nan=False), non_finite,
                                              not_number)),
    "dynamics.scheme": (one_of("euler", "ou"), st.sampled_from(["heun", "EM", None])),
    "dynamics.eta": (pos_float, st.one_of(st.floats(max_value=0.0, allow_nan=False), non_finite, not_number)),
    "dynamics.steps": (nonneg_int, st.one_of(st.integers(max_value=-1), not_int)),
    "dynamics.batch_size": (st.one_of(st.none(), pos_int), st.one_of(st.integers(max_value=0),
                                                                    st.sampled_from(["3", 2.0, True]))),
    "dynamics.tau_schedule": (one_of("constant", "log"), st.sampled_from(["exp", None])),
    "dynamics.chunk": (st.one_of(st.none(), pos_int), st.one_of(st.integers(max_value=0),
                                                               st.sampled_from(["3", 2.0, True]))),
    "record.every": (st.just(1), st.one_of(st.integers(max_value=0), not_int)),  # 1: every multiple works
    "record.certify_every": (multiple_of_20, st.one_of(st.integers(max_value=-1), not_int)),
    "record.certify_method": (one_of("auto", "quadrature", "mc"), st.sampled_from(["exact", None])),
    "record.certify_samples": (st.integers(min_value=16, max_value=10**7),
                               st.one_of(st.integers(max_value=15), not_int)),
    "record.optimum": (st.booleans(), not_bool),
    "record.checkpoint_every": (multiple_of_20, st.one_of(st.integers(max_value=-1), not_int)),
    "record.snapshot_every": (multiple_of_20, st.one_of(st.integers(max_value=-1), not_int)),
    "record.progress": (st.booleans(), not_bool),
}


def schema_leaves() -> set[str]:
    sections = {"data", "model", "model.init", "objective", "dynamics", "record"}
    return {p for p in cfgmod._all_paths(cfgmod.Config) if p not in sections and p != "data.params"}


def get_path(cfg, path):
    for part in path.split("."):
        cfg = getattr(cfg, part)
    return cfg


def same(u, v):
    if isinstance(u, float) and isinstance(v, (int, float)) and not isinstance(v, bool):
        return u == v or (math.isnan(u) and math.isnan(v))
    return u == v and type(u) is type(v) or (isinstance(u, float) and u == v)


def test_every_schema_field_is_described_here():
    # A new config field must get valid and invalid values in LEAVES (and docs).
    assert schema_leaves() == set(LEAVES)


def test_defaults_are_valid_and_complete():
    cfg = cfgmod.validate({})
    assert cfg == cfgmod.Config()
    assert cfgmod.validate(None) == cfg
    # the embedded default problem of issue 2: 1-D teacher-student with bias, lam, tau of that size
    assert cfg.data.kind == "teacher_student" and cfg.data.params["d"] == 1 and cfg.model.bias
    assert cfg.objective.lam > 0 and cfg.objective.tau > 0


def test_commented_default_parses_to_the_defaults():
    text = cfgmod.commented_default()
    assert text.startswith("#")
    assert cfgmod.validate(yaml.safe_load(text)) == cfgmod.Config()
    assert yaml.safe_load(cfgmod.Config().to_yaml()) == cfgmod.Config().to_dict()


valid_config = st.fixed_dictionaries({p: v for p, (v, _) in LEAVES.items()})


def nest(flat: dict) -> dict:
    out: dict = {}
    for path, v in flat.items():
        node = out
        *parents, leaf = path.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = v
    return out


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(valid_config)
def test_yaml_round_trip(flat):
    cfg = cfgmod.validate(nest(flat))
    for path, v in flat.items():
        assert same(get_path(cfg, path), v), path
    text = cfg.to_yaml()
    back = cfgmod.validate(yaml.safe_load(text))
    assert back == cfg
    assert back.to_yaml() == text  # the YAML form is a fixed point (floats round-trip through repr)


@settings(max_examples=80, deadline=None)
@given(st.data())
def test_override_lands_in_the_named_field_only(data):
    path = data.draw(st.sampled_from(sorted(LEAVES)))
    value = data.draw(LEAVES[path][0])
    text = yaml.safe_dump(value, default_flow_style=True).strip()
    if text.endswith("..."):  # yaml's document-end marker for bare scalars
        text = text[:-3].strip()
    cfg = cfgmod.load(None, [f"{path}={text}"])
    assert same(get_path(cfg, path), value), (path, text)
    changed = {k for k, _, _ in cfgmod.differences(cfgmod.Config(), cfg)}
    if path == "data.kind":  # another kind starts from its generator's own defaults (empty params)
        changed = {k for k in changed if not k.startswith("data.params")}
    assert changed <= {path}
    # the dict form of overrides does the same
    assert cfgmod.load(None, {path: value}) == cfg


@settings(max_examples=120, deadline=None)
@given(st.data())
def test_invalid_value_is_rejected_naming_the_field(data):
    path = data.draw(st.sampled_from(sorted(LEAVES)))
    bad = data.draw(LEAVES[path][1])
    with pytest.raises(ConfigError) as info:
        cfgmod.validate(nest({path: bad}))
    msg = str(info.value)
    assert msg.startswith(f"{path}: "), msg
    assert "\n" not in msg
    assert info.value.field == path
    assert "allowed" in msg or "must" in msg


@pytest.mark.parametrize("typo, meant", [
    ("objective.tua", "objective.tau"), ("dynamic.eta", "dynamics"), ("objectiv", "objective"),
    ("model.n_particle", "model.n_particles"), ("record.chekpoint_every", "record.checkpoint_every"),
    ("model.init.a_scal", "model.init.a_scale"), ("dynamics.batchsize", "dynamics.batch_size"),
])
def test_unknown_key_suggests_the_nearest(typo, meant):
    with pytest.raises(ConfigError) as info:
        cfgmod.validate(nest({typo: 1}))
    msg = str(info.value)
    assert "unknown key" in msg and f"did you mean '{meant}'" in msg, msg
    with pytest.raises(ConfigError) as info2:  # the same through --set
        cfgmod.load(None, [f"{typo}=1"])
    assert f"did you mean '{meant}" in str(info2.value)


def test_strictness_no_silent_coercion():
    for bad in ({"seed": "3"}, {"seed": True}, {"dynamics": {"steps": 10.0}}, {"objective": {"lam": "0.1"}},
                {"model": {"bias": "yes"}}, {"objective": {"tau": math.inf}}):
        with pytest.raises(ConfigError):
            cfgmod.validate(bad)
    # an integer is a valid float
    assert cfgmod.validate({"objective": {"lam": 1}}).objective.lam == 1.0


def test_cross_field_multiples():
    with pytest.raises(ConfigError) as info:
        cfgmod.validate({"record": {"every": 7, "checkpoint_every": 10, "certify_every": 0}})
    assert str(info.value).startswith("record.checkpoint_every: ") and "7" in str(info.value)
    assert cfgmod.validate({"record": {"every": 7, "checkpoint_every": 14, "certify_every": 0}})


@pytest.mark.parametrize("override, fragment", [
    ("objective.tau", "key=value"), ("=3", "malformed"), ("objective..tau=1", "malformed"),
    ("objective.tau.x=1", "unknown key"), ("name=a/b", "name: "),
])
def test_malformed_overrides(override, fragment):
    with pytest.raises(ConfigError) as info:
        cfgmod.load(None, [override])
    assert fragment in str(info.value)


def test_data_params_are_free_form_but_must_be_a_mapping():
    cfg = cfgmod.load(None, ["data.params.n=17", "data.params.noise=0.5"])
    assert cfg.data.params["n"] == 17 and cfg.data.params["noise"] == 0.5
    with pytest.raises(ConfigError, match="data.params: "):
        cfgmod.validate({"data": {"params": [1, 2]}})


def test_read_yaml_errors(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("objective: {tau: [1,\n")
    with pytest.raises(ConfigError, match="not valid YAML at line"):
        cfgmod.load(bad)
    with pytest.raises(ConfigError, match="not found"):
        cfgmod.load(tmp_path / "missing.yaml")
    lst = tmp_path / "list.yaml"
    lst.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="mapping"):
        cfgmod.load(lst)
    empty = tmp_path / "empty.yaml"
    empty.write_text("")
    assert cfgmod.load(empty) == cfgmod.Config()


def test_resume_allows_only_steps_to_change():
    stored = cfgmod.validate({"dynamics": {"steps": 100}})
    cfgmod.check_resumable(stored, cfgmod.validate({"dynamics": {"steps": 500}}))
    cfgmod.check_resumable(stored, cfgmod.validate({"dynamics": {"steps": 100}, "record": {"progress": False}}))
    with pytest.raises(ConfigError) as info:
        cfgmod.check_resumable(stored, cfgmod.validate({"dynamics": {"steps": 100, "eta": 0.0123}}))
    msg = str(info.value)
    assert msg.startswith("--resume: ") and "dynamics.eta" in msg
    assert f"stored {stored.dynamics.eta!r}" in msg and "given 0.0123" in msg
    with pytest.raises(ConfigError, match="data.params.n"):
        cfgmod.check_resumable(stored, cfgmod.load(None, ["dynamics.steps=100", "data.params.n=10"]))


# ------------------------------------------------------------------ issue 11: YAML, limits
@pytest.mark.parametrize("text, value", [("1e-3", 1e-3), ("2E5", 2e5), ("1.0e3", 1000.0), ("-3e-2", -0.03),
                                         (".5e1", 5.0), ("1e+2", 100.0), ("0.001", 0.001), ("7", 7),
                                         ("'1e-3'", "1e-3"), ("1e", "1e"), ("e3", "e3")])
def test_yaml_numbers_with_exponents_are_numbers(text, value, tmp_path):
    """YAML 1.2 floats (PyYAML's 1.1 resolver reads 1e-3 as a string): in files and in --set."""
    assert cfgmod.parse_value(text) == value and type(cfgmod.parse_value(text)) is type(value)
    p = tmp_path / "c.yaml"
    p.write_text(f"x: {text}\n")
    assert cfgmod.read_yaml(p) == {"x": value}


def test_exponent_values_validate_where_numbers_are_expected(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("objective:\n  tau: 1e-3\n  lam: 5E-2\ndynamics:\n  eta: 2e-2\n")
    cfg = cfgmod.load(p)
    assert (cfg.objective.tau, cfg.objective.lam, cfg.dynamics.eta) == (1e-3, 5e-2, 2e-2)
    assert cfgmod.load(None, ["objective.tau=1e-3"]).objective.tau == 1e-3
    with pytest.raises(ConfigError, match="model.n_particles: invalid value 1000.0; allowed: an integer"):
        cfgmod.load(None, ["model.n_particles=1e3"])  # an exponent is a float, not a count


def test_duplicate_keys_are_refused_with_their_line(tmp_path):
    p = tmp_path / "dup.yaml"
    p.write_text("objective:\n  tau: 0.1\n  lam: 1\n  tau: 0.2\n")
    with pytest.raises(ConfigError, match=r"config: YAML refused: duplicate key 'tau' at line 4"):
        cfgmod.load(p)
    # YAML merge keys are not duplicates: explicit keys override merged ones
    assert cfgmod.safe_load("base: &b {x: 1, y: 2}\nother:\n  <<: *b\n  x: 3\n")["other"] == {"x": 3, "y": 2}
    with pytest.raises(ConfigError, match="duplicate key"):
        cfgmod.parse_value("{a: 1, a: 2}")


def test_hostile_yaml_is_refused_quickly(tmp_path):
    import time

    levels = ["a: &a [x, x, x, x, x, x, x, x, x]"] + [
        f"{chr(98 + i)}: &{chr(98 + i)} [" + ", ".join([f"*{chr(97 + i)}"] * 9) + "]" for i in range(8)]
    bomb = "\n".join(levels) + "\n"  # 9^9 = 387 million leaves in 600 bytes
    cases = {"bomb.yaml": (bomb, "expands to more than"), "rec.yaml": ("a: &a [*a]\n", "recursive alias"),
             "deep.yaml": ("a: " + "[" * 10000 + "]" * 10000 + "\n", "nested deeper"),
             "big.yaml": ("# " + "x" * (cfgmod.MAX_YAML_BYTES + 10) + "\n", "larger than")}
    for name, (text, fragment) in cases.items():
        p = tmp_path / name
        p.write_text(text)
        t0 = time.perf_counter()
        with pytest.raises(ConfigError, match=fragment) as info:
            cfgmod.load(p)
        assert time.perf_counter() - t0 < 2.0, name
        assert len(str(info.value)) < 400
    # the same bomb through --set: refused, and the message shows a truncated value
    with pytest.raises(ConfigError, match="--set: override value refused") as info:
        cfgmod.load(None, ["data.params.n={" + bomb.strip().replace("\n", ", ") + "}"])
    assert len(str(info.value)) < 400
    with pytest.raises(ConfigError, match="too long"):
        cfgmod.load(None, ["name=" + "x" * (cfgmod.MAX_OVERRIDE_CHARS + 1)])


def test_error_messages_never_expand_a_value():
    """A value shown in a message is cut to a few levels and ~80 characters, whatever it is."""
    from mfld.errors import short_repr

    nested = [1]
    for _ in range(40):
        nested = [nested, nested]  # 2^40 leaves if expanded
    err = ConfigError("bad", field="x", value=nested)
    assert len(str(err)) < 200
    assert len(short_repr("y" * 10**6)) <= 80 and len(short_repr({i: i for i in range(10**5)})) <= 80
    with pytest.raises(ConfigError) as info:
        cfgmod.validate({"objective": {"tau": nested}})
    assert len(str(info.value)) < 300


@pytest.mark.parametrize("key, bad, suggestion", [
    ("model.activation", "tahn", "tanh"), ("model.activation", "Sigmoid", "sigmoid"),
    ("objective.loss", "logistc", "logistic"), ("precision", "float46", "float64"),
    ("model.output", "bounde", "bounded"), ("model.scaling", "mean-field", "mean_field"),
    ("data.kind", "teacher-student", "teacher_student"), ("record.certify_method", "quad", None),
])
def test_enumerated_values_suggest_the_nearest(key, bad, suggestion):
    with pytest.raises(ConfigError) as info:
        cfgmod.load(None, [f"{key}={bad}"])
    msg = str(info.value)
    assert msg.startswith(f"{key}: invalid value '{bad}'") and "allowed: one of" in msg
    assert (f"did you mean '{suggestion}'?" in msg) if suggestion else ("did you mean" not in msg)


def test_name_and_seed_limits():
    assert cfgmod.validate({"name": "x" * cfgmod.MAX_NAME}).name == "x" * cfgmod.MAX_NAME
    for bad in ("x" * (cfgmod.MAX_NAME + 1), "a\tb", "a\x00b", " ", "a\\b"):
        with pytest.raises(ConfigError, match="name: "):
            cfgmod.validate({"name": bad})
    assert cfgmod.validate({"seed": cfgmod.MAX_SEED}).seed == 2**32 - 1
    for bad in (2**32, 2**63, 2**64):
        with pytest.raises(ConfigError, match=r"seed: invalid value \d+; allowed: an integer <= 4294967295"):
            cfgmod.validate({"seed": bad})
        with pytest.raises(ConfigError, match="data.seed"):
            cfgmod.validate({"data": {"seed": bad}})


def test_data_file_path_is_recorded_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = cfgmod.load(None, ["data.kind=file", "data.params.path=sub/d.csv"])
    assert cfg.data.params["path"] == str(tmp_path / "sub" / "d.csv")
    cfg2 = cfgmod.load(None, ["data.kind=file", "data.params.path=~/d.csv"])
    assert cfg2.data.params["path"] == str(Path("~/d.csv").expanduser())
    # the stored (absolute) config validates to itself from any directory
    monkeypatch.chdir("/")
    assert cfgmod.validate(cfg.to_dict()) == cfg


def test_python_structures_that_share_lists_are_bounded_too():
    shared = [1]
    for _ in range(40):
        shared = [shared, shared]
    with pytest.raises(ConfigError, match="more than 100000 values"):
        cfgmod.apply_overrides({"data": {"params": {"n": shared}}}, None)


def test_closed_form_certificate_is_accepted_where_it_applies_and_refused_elsewhere():
    # one vocabulary: the config accepts every method mfld.gibbs implements (it refused
    # closed_form, which the library accepts), and refuses it up front where it does not apply
    ok = cfgmod.load(None, ["record.certify_method=closed_form", "model.activation=linear"])
    assert ok.record.certify_method == "closed_form"
    for bad in (["model.activation=tanh"], ["model.activation=linear", "model.output=bounded"]):
        with pytest.raises(ConfigError) as err:
            cfgmod.load(None, ["record.certify_method=closed_form", *bad])
        assert err.value.field == "record.certify_method" and "linear activation" in str(err.value)
