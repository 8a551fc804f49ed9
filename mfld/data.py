"""Datasets: seeded synthetic generators, a shipped real dataset, and user files.

Every generator returns a :class:`Dataset` of NumPy float64 arrays (raw inputs, without the
bias feature; :class:`mfld.problem.Problem` appends it) and is a pure function of its
arguments and ``seed``. Classification generators return labels in {-1, +1} (the logistic
loss's convention). :func:`make_dataset` dispatches on a ``kind`` name with keyword
parameters (the config's ``data.kind`` and ``data.params``); mistakes raise
:class:`mfld.errors.ConfigError` naming ``data.kind`` or ``data.params.<name>``.

Kinds: ``teacher_student``, ``single_index``, ``gaussian_mixture``, ``sparse_parity``,
``sklearn`` (optional extra ``mfld[datasets]``: ``diabetes`` regression,
``breast_cancer`` classification), ``file`` (a user's ``.npz`` or ``.csv``).
"""

from __future__ import annotations

import csv
import inspect
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from mfld.errors import ConfigError


@dataclass(frozen=True)
class Dataset:
    """x (n, d), y (n,), optional test split, and ``meta`` (e.g. the teacher's function)."""

    x: np.ndarray
    y: np.ndarray
    x_test: np.ndarray | None = None
    y_test: np.ndarray | None = None
    meta: dict = field(default_factory=dict)
    target: object = None  # callable x -> noiseless target, when known (for plots)


def _np_activation(name: str):
    """The registry activation ``name`` as a float64 NumPy function (no JAX import)."""
    from mfld.activations_numpy import NUMPY_FORMS

    _choice(name, "data.params.activation", tuple(NUMPY_FORMS))
    return NUMPY_FORMS[name][0]


def teacher_student(n: int = 64, d: int = 1, *, teacher_width: int = 3, noise: float = 0.05,
                    n_test: int = 256, activation: str = "tanh", teacher_scale: float = 1.0,
                    input_scale: float = 2.0, bias: bool = True, seed: int = 0) -> Dataset:
    """Teacher-student regression: y = f_T(x) + noise * N(0, 1).

    The teacher is a mean-field network of ``teacher_width`` neurons,
    f_T(x) = (1/m) sum_k a_k sigma(w_k . x + b_k), with a_k ~ teacher_scale * sqrt(m) * N(0, 1)
    (so f_T is O(teacher_scale) whatever m), w_k ~ N(0, I), b_k ~ N(0, 1) if ``bias``.
    Inputs are uniform on [-input_scale, input_scale]^d.
    """
    _positive_int(n, "data.params.n")
    _positive_int(d, "data.params.d")
    _positive_int(teacher_width, "data.params.teacher_width")
    _finite(teacher_scale, "data.params.teacher_scale")
    _positive(input_scale, "data.params.input_scale")
    if not isinstance(bias, bool):
        raise ConfigError("must be true or false", field="data.params.bias", value=bias)
    _nonneg(noise, "data.params.noise")
    _nonneg_int(n_test, "data.params.n_test")
    n, d, n_test, teacher_width = int(n), int(d), int(n_test), int(teacher_width)
    rng = np.random.default_rng(seed)
    m = teacher_width
    a = teacher_scale * np.sqrt(m) * rng.standard_normal(m)
    w = rng.standard_normal((m, d)) * 1.5
    b = rng.standard_normal(m) if bias else np.zeros(m)
    sigma = _np_activation(activation)

    def target(x):
        x = np.asarray(x, dtype=np.float64).reshape(-1, d)
        return sigma(x @ w.T + b) @ a / m

    x = rng.uniform(-input_scale, input_scale, (n, d))
    y = target(x) + noise * rng.standard_normal(n)
    xt = yt = None
    if n_test:
        xt = rng.uniform(-input_scale, input_scale, (n_test, d))
        yt = target(xt) + noise * rng.standard_normal(n_test)
    meta = dict(kind="teacher_student", teacher_a=a.tolist(), teacher_w=w.tolist(), teacher_b=b.tolist(),
                activation=activation)
    return Dataset(x, y, xt, yt, meta, target)



# ----------------------------------------------------------------------------- synthetic
_LINKS = {
    "tanh": np.tanh,
    "relu": lambda z: np.maximum(z, 0.0),
    "linear": lambda z: z,
    "he2": lambda z: (z * z - 1.0) / math.sqrt(2.0),
    "he3": lambda z: (z ** 3 - 3.0 * z) / math.sqrt(6.0),
}


def single_index(n: int = 256, d: int = 5, *, link: str = "tanh", noise: float = 0.05, n_test: int = 256,
                 seed: int = 0) -> Dataset:
    """Single-index regression: x ~ N(0, I_d), y = link(beta . x) + noise * N(0, 1).

    ``beta`` is uniform on the unit sphere (stored in ``meta['direction']``), so beta . x ~
    N(0, 1). Links: ``tanh``, ``relu``, ``linear`` and the normalised Hermite polynomials
    ``he2`` = (z^2 - 1)/sqrt 2 and ``he3`` = (z^3 - 3z)/sqrt 6 (information exponents 2, 3).
    """
    _positive_int(n, "data.params.n")
    _positive_int(d, "data.params.d")
    _nonneg(noise, "data.params.noise")
    _nonneg_int(n_test, "data.params.n_test")
    _choice(link, "data.params.link", tuple(_LINKS))
    n, d, n_test = int(n), int(d), int(n_test)
    rng = np.random.default_rng(seed)
    beta = rng.standard_normal(d)
    beta /= np.linalg.norm(beta)
    g = _LINKS[link]

    def target(x):
        return g(np.asarray(x, dtype=np.float64).reshape(-1, d) @ beta)

    x = rng.standard_normal((n, d))
    y = target(x) + noise * rng.standard_normal(n)
    xt = yt = None
    if n_test:
        xt = rng.standard_normal((n_test, d))
        yt = target(xt) + noise * rng.standard_normal(n_test)
    return Dataset(x, y, xt, yt, dict(kind="single_index", direction=beta.tolist(), link=link, noise=noise),
                   target)


def gaussian_mixture(n: int = 256, d: int = 2, *, separation: float = 2.0, std: float = 1.0,
                     n_test: int = 256, seed: int = 0) -> Dataset:
    """Two-class Gaussian mixture, labels y in {-1, +1} with probability 1/2 each:
    x | y ~ N(y (separation/2) mu, std^2 I_d), mu uniform on the unit sphere (``meta['mean']``).

    The Bayes classifier is sign(mu . x), with error Phi(-separation/(2 std)) (``meta``).
    """
    _positive_int(n, "data.params.n")
    _positive_int(d, "data.params.d")
    _nonneg(separation, "data.params.separation")
    _positive(std, "data.params.std")
    _nonneg_int(n_test, "data.params.n_test")
    n, d, n_test = int(n), int(d), int(n_test)
    rng = np.random.default_rng(seed)
    mu = rng.standard_normal(d)
    mu /= np.linalg.norm(mu)

    def draw(m):
        y = np.where(rng.random(m) < 0.5, -1.0, 1.0)
        x = y[:, None] * (0.5 * separation) * mu[None, :] + std * rng.standard_normal((m, d))
        return x, y

    x, y = draw(n)
    xt, yt = draw(n_test) if n_test else (None, None)
    bayes = 0.5 * math.erfc(separation / (2.0 * std) / math.sqrt(2.0))
    meta = dict(kind="gaussian_mixture", mean=mu.tolist(), separation=separation, std=std, bayes_error=bayes)
    return Dataset(x, y, xt, yt, meta, lambda x: np.sign(np.asarray(x, dtype=np.float64).reshape(-1, d) @ mu))


def sparse_parity(n: int = 512, d: int = 10, *, k: int = 3, label_noise: float = 0.0, n_test: int = 512,
                  seed: int = 0) -> Dataset:
    """k-sparse parity on the hypercube: x uniform on {-1, +1}^d, y = prod_{s in S} x_s in {-1, +1}
    for a support S of k coordinates drawn without replacement (``meta['support']``); each
    label is flipped independently with probability ``label_noise`` (train and test).
    """
    _positive_int(n, "data.params.n")
    _positive_int(d, "data.params.d")
    _positive_int(k, "data.params.k")
    _nonneg_int(n_test, "data.params.n_test")
    if k > d:
        raise ConfigError(f"the parity support k = {k} exceeds the dimension d = {d}", field="data.params.k",
                          value=k, allowed=f"1 <= k <= d = {d}")
    if not (_is_number(label_noise) and 0.0 <= label_noise <= 0.5):
        raise ConfigError("must be a flip probability", field="data.params.label_noise", value=label_noise,
                          allowed="0 <= label_noise <= 0.5")
    n, d, k, n_test = int(n), int(d), int(k), int(n_test)
    rng = np.random.default_rng(seed)
    support = np.sort(rng.choice(d, size=k, replace=False))

    def target(x):
        return np.prod(np.asarray(x, dtype=np.float64).reshape(-1, d)[:, support], axis=1)

    def draw(m):
        x = np.where(rng.random((m, d)) < 0.5, -1.0, 1.0)
        flip = np.where(rng.random(m) < label_noise, -1.0, 1.0)
        return x, target(x) * flip

    x, y = draw(n)
    xt, yt = draw(n_test) if n_test else (None, None)
    meta = dict(kind="sparse_parity", support=support.tolist(), k=k, label_noise=label_noise)
    return Dataset(x, y, xt, yt, meta, target)


# ----------------------------------------------------------------------------- shipped data
SKLEARN_DATASETS = ("diabetes", "breast_cancer")


def sklearn_dataset(name: str = "diabetes", *, test_fraction: float = 0.2, seed: int = 0) -> Dataset:
    """A small real dataset shipped inside scikit-learn (optional extra ``mfld[datasets]``).

    ``diabetes``: regression, 442 x 10, target standardised; ``breast_cancer``:
    classification, 569 x 30, labels +1 (benign) / -1 (malignant). A seeded random
    ``test_fraction`` of the rows is held out; inputs (and the regression target) are
    standardised with the training split's mean and standard deviation (``meta`` keeps them).
    """
    if name not in SKLEARN_DATASETS:
        raise ConfigError("unknown scikit-learn dataset", field="data.params.name", value=name,
                          allowed=", ".join(SKLEARN_DATASETS))
    _fraction(test_fraction, "data.params.test_fraction")
    try:
        from sklearn import datasets as skd
    except ImportError:
        raise ConfigError("scikit-learn is not installed", field="data.kind", value="sklearn",
                          allowed="install the extra: pip install 'mfld[datasets]'") from None
    if name == "diabetes":
        x, y = skd.load_diabetes(return_X_y=True)
        classification = False
    else:
        x, y = skd.load_breast_cancer(return_X_y=True)
        y = np.where(y == 1, 1.0, -1.0)
        classification = True
    ds = _split(np.asarray(x, np.float64), np.asarray(y, np.float64), test_fraction, seed,
                dict(kind="sklearn", name=name))
    return _standardise(ds, standardise_y=not classification)


def _split(x, y, test_fraction, seed, meta):
    n = x.shape[0]
    n_test = int(round(test_fraction * n))
    if n_test and n - n_test < 1:
        raise ConfigError("the test split leaves no training rows", field="data.params.test_fraction",
                          value=test_fraction, allowed="a fraction leaving at least one training row")
    if not n_test:
        return Dataset(x, y, None, None, meta)
    perm = np.random.default_rng(seed).permutation(n)
    tr, te = perm[n_test:], perm[:n_test]
    return Dataset(x[tr], y[tr], x[te], y[te], meta)


def _standardise(ds: Dataset, standardise_y: bool) -> Dataset:
    mx = ds.x.mean(axis=0)
    sx = ds.x.std(axis=0)
    sx = np.where(sx > 0, sx, 1.0)
    meta = dict(ds.meta, x_mean=mx.tolist(), x_std=sx.tolist())
    y, yt = ds.y, ds.y_test
    if standardise_y:
        my, sy = float(ds.y.mean()), float(ds.y.std()) or 1.0
        y = (y - my) / sy
        yt = None if yt is None else (yt - my) / sy
        meta.update(y_mean=my, y_std=sy)
    xt = None if ds.x_test is None else (ds.x_test - mx) / sx
    return Dataset((ds.x - mx) / sx, y, xt, yt, meta)


# ----------------------------------------------------------------------------- user files
def load_file(path: str, *, y_column: str = "y", x_columns: list | None = None, test_fraction: float = 0.0,
              seed: int = 0) -> Dataset:
    """A user's data file.

    ``.npz``: arrays ``x`` (n, d) or (n,), ``y`` (n,), optional ``x_test``, ``y_test``.
    ``.csv``: a header row of column names; ``y_column`` is the target and ``x_columns`` the
    inputs (default: every other column). ``test_fraction`` > 0 holds out a seeded random
    split (only when the file has no test arrays). Values must be finite numbers.
    """
    if not isinstance(path, (str, Path)) or not str(path).strip() or "\0" in str(path):
        raise ConfigError("invalid data file path", field="data.params.path", value=path,
                          allowed="the path of an existing .npz or .csv file")
    p = Path(str(path)).expanduser()
    try:
        found, exists = p.is_file(), p.exists()
    except (OSError, ValueError):
        found = exists = False
    if not found:
        raise ConfigError("not a regular file" if exists else "file not found", field="data.params.path",
                          value=str(path), allowed="an existing .npz or .csv file")
    _fraction(test_fraction, "data.params.test_fraction")
    suffix = p.suffix.lower()
    if suffix == ".npz":
        x, y, xt, yt = _read_npz(p)
    elif suffix == ".csv":
        x, y = _read_csv(p, y_column, x_columns)
        xt = yt = None
    else:
        raise ConfigError("unsupported file type", field="data.params.path", value=str(path),
                          allowed=".npz or .csv")
    x = _check_arrays(x, y, "", str(p))
    meta = dict(kind="file", path=str(p))
    if xt is not None:
        xt = _check_arrays(xt, yt, "_test", str(p))
        if xt.shape[1] != x.shape[1]:
            raise ConfigError(f"x_test has {xt.shape[1]} columns but x has {x.shape[1]} in {p}",
                              field="data.params.path", value=str(path))
        if test_fraction:
            raise ConfigError("the file already has a test split", field="data.params.test_fraction",
                              value=test_fraction, allowed="0 for files with x_test, y_test")
        return Dataset(x, y, xt, yt, meta)
    return _split(x, y, test_fraction, seed, meta)


#: dtype kinds a data array may have (booleans, integers, floats).
_NUMERIC_KINDS = "biuf"
_KIND_NAMES = {"c": "complex", "O": "object (pickled Python objects)", "U": "text", "S": "bytes",
               "V": "structured", "M": "datetime", "m": "timedelta"}


def _too_big(nbytes: int, p: Path, what: str):
    """Refuse data that cannot fit in memory (mfld.resources.available_memory), before reading."""
    from mfld.resources import available_memory, human

    avail = available_memory()
    if avail is not None and nbytes > avail:
        raise ConfigError(f"{what} of {p.name} needs ~{human(nbytes)}, more than the {human(avail)} of memory "
                          f"available", field="data.params.path", value=str(p), allowed="data that fit in memory")


def _npz_headers(p: Path) -> dict:
    """``{name: (shape, dtype)}`` of the arrays of an .npz file, read from the .npy headers
    only (nothing is allocated); refuses object, complex and other non-numeric arrays and
    headers whose size disagrees with the stored bytes."""
    import zipfile

    from numpy.lib import format as npformat

    out = {}
    try:
        with zipfile.ZipFile(p) as zf:
            for info in zf.infolist():
                if not info.filename.endswith(".npy"):
                    continue
                name = info.filename[:-4]
                with zf.open(info) as f:
                    version = npformat.read_magic(f)
                    if version == (1, 0):
                        shape, fortran, dtype = npformat.read_array_header_1_0(f)
                    elif version == (2, 0):
                        shape, fortran, dtype = npformat.read_array_header_2_0(f)
                    else:
                        shape, fortran, dtype = npformat._read_array_header(f, version)  # noqa: SLF001
                    header_end = f.tell()
                if dtype.kind not in _NUMERIC_KINDS or dtype.hasobject:
                    kind = _KIND_NAMES.get(dtype.kind, str(dtype))
                    raise ConfigError(f"array {name!r} in {p} holds {kind} values (dtype {dtype.str})",
                                      field="data.params.path", allowed="real numbers (bool, int or float arrays)")
                count = 1
                for s in shape:
                    count *= int(s)
                nbytes = count * dtype.itemsize
                if nbytes > max(info.file_size - header_end, 0):
                    raise ConfigError(f"array {name!r} in {p} is damaged: its header claims {count} values "
                                      f"({nbytes} bytes) but the file holds {max(info.file_size - header_end, 0)}",
                                      field="data.params.path", allowed="an .npz written by numpy.savez")
                out[name] = (tuple(int(s) for s in shape), dtype)
    except ConfigError:
        raise
    except (zipfile.BadZipFile, OSError, ValueError, EOFError, KeyError, TypeError, SyntaxError) as e:
        from mfld.errors import short_repr

        raise ConfigError(f"cannot read {p}: not a valid .npz file ({type(e).__name__}: {short_repr(str(e), 60)})",
                          field="data.params.path", allowed="an .npz written by numpy.savez") from None
    return out


def _read_npz(p: Path):
    headers = _npz_headers(p)
    keys = set(headers)
    missing = [k for k in ("x", "y") if k not in keys]
    if missing:
        has = ", ".join(sorted(keys))
        raise ConfigError(f"{p} lacks array(s) {', '.join(missing)} "
                          f"(has: {(has if len(has) <= 60 else has[:57] + '...') if keys else 'none'})",
                          field="data.params.path", allowed="keys x, y and optionally x_test, y_test")
    if ("x_test" in keys) != ("y_test" in keys):
        raise ConfigError(f"{p} has only one of x_test, y_test", field="data.params.path",
                          allowed="both or neither")
    used = [k for k in ("x", "y", "x_test", "y_test") if k in keys]
    total = sum(8 * max(1, _prod(headers[k][0])) for k in used)
    _too_big(2 * total, p, "the arrays")
    out = []
    try:
        z = np.load(p, allow_pickle=False)
    except Exception as e:  # noqa: BLE001 - any unreadable file is a user mistake here
        raise ConfigError(f"cannot read {p} ({type(e).__name__})", field="data.params.path") from None
    with z:
        for k in ("x", "y", "x_test", "y_test"):
            if k not in keys:
                out.append(None)
                continue
            try:
                out.append(np.asarray(z[k], dtype=np.float64))
            except Exception as e:  # noqa: BLE001 - a damaged member (bad CRC, truncated)
                raise ConfigError(f"array {k!r} in {p} cannot be read ({type(e).__name__})",
                                  field="data.params.path", allowed="an .npz written by numpy.savez") from None
    return tuple(out)


def _first_undecodable_line(p: Path) -> int | str:
    """The 1-based number of the first line of ``p`` that is not valid UTF-8 ("?" if none)."""
    try:
        with open(p, "rb") as f:
            for i, raw in enumerate(f, 1):
                try:
                    raw.decode("utf-8")
                except UnicodeDecodeError:
                    return i
    except OSError:
        pass
    return "?"


def _prod(shape) -> int:
    n = 1
    for s in shape:
        n *= int(s)
    return n


def _read_csv(p: Path, y_column, x_columns):
    """A CSV data file: a header row, then one row of numbers per point. Every problem names
    the file and the line (and the column)."""
    from mfld.errors import short_repr

    # each value takes at least 2 bytes of text ("1,") and 8 bytes as a float64 (twice, while
    # the columns are assembled)
    try:
        size = p.stat().st_size
    except OSError:
        size = 0
    _too_big(8 * size, p, "the values")
    csv.field_size_limit(1 << 20)
    try:
        fh = open(p, newline="", encoding="utf-8")
    except OSError as e:
        raise ConfigError(f"cannot read {p} ({e.strerror or e})", field="data.params.path") from None
    with fh:
        reader = csv.reader(fh)
        try:
            header = _csv_header(p, reader)
            cols = _csv_inputs(p, header, y_column, x_columns) + [y_column]
            values, n_rows = _csv_values(p, reader, header, cols)
        except csv.Error as e:  # (line_num is 0 only before the first line is read)
            raise _csv_error(p, reader.line_num or 1, f"not readable as CSV ({short_repr(str(e), 60)})") from None
        except UnicodeDecodeError:
            raise ConfigError(f"{p} line {_first_undecodable_line(p)}: not UTF-8 text", field="data.params.path",
                              allowed="a UTF-8 (or ASCII) CSV file") from None
    if not n_rows:
        raise ConfigError(f"{p} has a header but no data rows", field="data.params.path")
    out = np.frombuffer(values, dtype=np.float64).reshape(n_rows, len(cols)).copy()
    return out[:, :-1], out[:, -1]


def _csv_error(p: Path, line, msg: str, allowed=None) -> ConfigError:
    return ConfigError(f"{p} line {line}: {msg}", field="data.params.path", allowed=allowed)


def _csv_header(p: Path, reader) -> list:
    """The column names of the first non-blank row: every column named, no name twice."""
    from mfld.errors import short_repr

    line = 1
    header = None
    for row in reader:
        line = reader.line_num
        if any(c.strip() for c in row):
            header = [h.strip() for h in row]
            break
    if header is None:
        raise ConfigError(f"{p} is empty", field="data.params.path", allowed="a header row and data rows")
    seen = {}
    for j, h in enumerate(header):
        if not h:
            raise _csv_error(p, line, f"column {j + 1} of the header has no name",
                             allowed="a name for every column (no trailing comma)")
        if h in seen:
            raise _csv_error(p, line, f"column {short_repr(h, 40)} appears twice in the header "
                                      f"(columns {seen[h] + 1} and {j + 1})", allowed="distinct column names")
        seen[h] = j
    return header


def _csv_inputs(p: Path, header: list, y_column, x_columns) -> list:
    """The input columns: ``x_columns`` (checked against the header and the target) or every
    column but the target ``y_column`` (which must be in the header)."""
    from mfld.errors import short_repr

    avail = short_repr(", ".join(header), 200)[1:-1]
    if y_column not in header:
        raise ConfigError(f"no column {short_repr(y_column, 40)} in {p}", field="data.params.y_column",
                          value=y_column, allowed=f"one of the columns: {avail}")
    if x_columns is None:
        x_columns = [h for h in header if h != y_column]
        if not x_columns:
            raise ConfigError(f"{p} has no input columns besides {y_column!r}", field="data.params.x_columns")
        return x_columns
    x_columns = [x_columns] if isinstance(x_columns, str) else list(x_columns)
    if not x_columns:
        raise ConfigError("no input columns given", field="data.params.x_columns", value=x_columns,
                          allowed=f"a non-empty list of columns from: {avail}")
    missing = [c for c in x_columns if c not in header]
    if missing:
        raise ConfigError(f"no column(s) {short_repr(', '.join(map(str, missing)), 60)} in {p}",
                          field="data.params.x_columns", value=x_columns, allowed=f"columns from: {avail}")
    if len(set(x_columns)) != len(x_columns):
        raise ConfigError("an input column is listed twice", field="data.params.x_columns",
                          value=x_columns, allowed="distinct columns")
    if y_column in x_columns:
        raise ConfigError("the target column is also an input", field="data.params.x_columns",
                          value=x_columns, allowed=f"columns other than {y_column!r}")
    return x_columns


def _csv_values(p: Path, reader, header: list, cols: list):
    """(values row by row as an ``array('d')``, number of rows) of the columns ``cols`` of the
    remaining non-blank rows: finite numbers, as many fields as the header on every line."""
    import array

    from mfld.errors import short_repr

    idx = [header.index(c) for c in cols]
    values = array.array("d")
    n_rows = 0
    for row in reader:
        line = reader.line_num
        if not any(c.strip() for c in row):
            continue
        if len(row) != len(header):
            raise _csv_error(p, line, f"{len(row)} fields, the header has {len(header)}",
                             allowed="the same number of fields on every line")
        for c, j in zip(cols, idx, strict=True):
            cell = row[j].strip()
            try:
                v = float(cell)
            except ValueError:
                raise _csv_error(p, line, f"non-numeric value {short_repr(cell, 40)} in column {short_repr(c, 40)}",
                                 allowed="numbers") from None
            if v != v or v in (float("inf"), float("-inf")):
                raise _csv_error(p, line, f"non-finite value {short_repr(cell, 20)} (NaN/inf) in column "
                                          f"{short_repr(c, 40)}", allowed="finite numbers")
            values.append(v)
        n_rows += 1
    return values, n_rows


def _check_arrays(x, y, suffix, where):
    if x.ndim == 1:
        x = x[:, None]
    if x.ndim != 2 or y.ndim != 1 or x.shape[0] != y.shape[0]:
        raise ConfigError(f"x{suffix} must be (n, d) and y{suffix} (n,) in {where}; got {x.shape} and {y.shape}",
                          field="data.params.path")
    if x.shape[0] == 0 or x.shape[1] == 0:
        raise ConfigError(f"x{suffix} in {where} is empty", field="data.params.path")
    for name, arr in ((f"x{suffix}", x), (f"y{suffix}", y)):
        if not np.all(np.isfinite(arr)):
            bad = int(np.sum(~np.isfinite(arr)))
            raise ConfigError(f"{name} in {where} has {bad} NaN/inf value(s)", field="data.params.path",
                              allowed="finite numbers")
    return x


# ----------------------------------------------------------------------------- dispatcher
GENERATORS = {
    "teacher_student": teacher_student,
    "single_index": single_index,
    "gaussian_mixture": gaussian_mixture,
    "sparse_parity": sparse_parity,
    "sklearn": sklearn_dataset,
    "file": load_file,
}
CLASSIFICATION_KINDS = ("gaussian_mixture", "sparse_parity")


def make_dataset(kind: str, seed: int = 0, **params) -> Dataset:
    """Build the dataset of ``kind`` with generator keyword ``params`` and ``seed``.

    Unknown kinds and parameters raise :class:`ConfigError` naming them and what is allowed.
    ``file`` needs ``path``; ``sklearn`` takes ``name`` (default ``diabetes``).
    """
    if kind not in GENERATORS:
        raise ConfigError("unknown data kind", field="data.kind", value=kind, allowed=", ".join(GENERATORS))
    fn = GENERATORS[kind]
    sig = inspect.signature(fn)
    allowed = [n for n in sig.parameters if n != "seed"]
    for name in params:
        if name not in allowed:
            raise ConfigError(f"unknown parameter for data kind {kind!r}", field=f"data.params.{name}",
                              value=params[name], allowed=", ".join(allowed))
    if kind == "file" and "path" not in params:
        raise ConfigError("the file data kind needs a path", field="data.params.path",
                          allowed="a .npz or .csv file")
    ds = fn(seed=int(seed), **params)
    return Dataset(ds.x, ds.y, ds.x_test, ds.y_test, dict(ds.meta, seed=int(seed)), ds.target)


# ----------------------------------------------------------------------------- checks
def _is_number(v) -> bool:
    return not isinstance(v, bool) and isinstance(v, (int, np.integer, float, np.floating)) and bool(np.isfinite(v))


def _positive_int(v, name):
    if not _is_number(v) or int(v) != v or v < 1:
        raise ConfigError("must be a positive integer", field=name, value=v)


def _nonneg_int(v, name):
    if not _is_number(v) or int(v) != v or v < 0:
        raise ConfigError("must be a non-negative integer", field=name, value=v)


def _nonneg(v, name):
    if not _is_number(v) or v < 0:
        raise ConfigError("must be a finite non-negative number", field=name, value=v)


def _positive(v, name):
    if not _is_number(v) or v <= 0:
        raise ConfigError("must be a finite positive number", field=name, value=v)


def _finite(v, name):
    if not _is_number(v):
        raise ConfigError("must be a finite number", field=name, value=v)


def _choice(v, name, allowed):
    if not isinstance(v, str) or v not in allowed:
        raise ConfigError("invalid value", field=name, value=v, allowed=", ".join(allowed))


def _fraction(v, name):
    if not _is_number(v) or not 0.0 <= v < 1.0:
        raise ConfigError("must be a fraction", field=name, value=v, allowed="0 <= value < 1")
