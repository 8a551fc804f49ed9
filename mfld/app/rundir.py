"""Run directories: atomic writes, metrics tables, checkpoints, environment records, loading.

Layout of a run directory::

    config.yaml      the resolved config (every field)
    env.json         versions, devices, precision, seed, git hash
    metrics.csv      one row per record; floats in a round-trip format (repr)
    summary.json     status, final values, run time
    checkpoint.npz   particles a, w, step and the key data of the last checkpoint
    optimum.json     the global optimum F* (when computed)
    data.npz         the data, when the run was given arrays (x, y) rather than a data kind
    figures/*.png
    .lock            while a process writes the run (see mfld.app.lock)
    .mfld-run        the marker: this directory holds an mfld run (``--overwrite`` clears
                     nothing else), and the integrity record of config.yaml and env.json

Every file is written atomically: to a temporary file in the same directory, then renamed;
files get the permissions the umask gives (0666 & ~umask), not the temporary file's 0600.
JSON is strict (RFC 8259): NaN and infinities are written as ``null``.

Every reader (:func:`read_metrics`, :func:`read_json`, :func:`load_checkpoint`,
:func:`read_config`, :func:`load_run`) answers damaged content with a :class:`RunFileError`:
one line naming the file, the place (line, column, key) and what is allowed.
"""

from __future__ import annotations

import csv
import datetime as _dt
import hashlib
import io
import json
import math
import os
import platform
import re
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mfld import config as cfgmod
from mfld.errors import ConfigError, short_repr
from mfld.serialize import jsonable

METRICS = "metrics.csv"
CHECKPOINT = "checkpoint.npz"
SUMMARY = "summary.json"
CONFIG = "config.yaml"
ENV = "env.json"
OPTIMUM = "optimum.json"
DATA = "data.npz"
MARKER = ".mfld-run"
# the files of an `mfld sweep` directory (beside one run directory per member)
SWEEP_JSON = "sweep.json"
SWEEP_CSV = "sweep.csv"
SWEEP_CHECKPOINT = ".sweep_checkpoint.npz"
#: Largest run file a reader parses as text (JSON, YAML); metrics.csv has no limit.
MAX_TEXT_BYTES = 64 << 20
#: The temporary files of :func:`atomic_write_bytes` (``.NAME.XXXXXXXX.tmp``).
TEMP_PATTERN = re.compile(r"^\..+\.[A-Za-z0-9_]{8}\.tmp$")


class RunFileError(ConfigError):
    """A run directory's file with content a reader cannot use: ``field`` is the file, the
    message says where (line, column, key) and what is wrong."""

    def __init__(self, path, message: str, allowed: str | None = None):
        super().__init__(message, field=str(path), allowed=allowed)
        self.path = Path(path)


def _umask() -> int:
    """The process umask, read without changing it where the OS allows (Linux ``/proc``)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    old = os.umask(0o022)
    os.umask(old)
    return old


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (temp file in the same directory + rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            if hasattr(os, "fchmod"):  # mkstemp's 0600 -> what the umask gives any new file
                os.fchmod(f.fileno(), 0o666 & ~_umask())
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def atomic_write_text(path, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def json_text(obj) -> str:
    """Strict JSON (RFC 8259) of ``obj``: NaN and infinities become ``null``."""
    return json.dumps(jsonable(obj, nonfinite_as_null=True), indent=2, allow_nan=False) + "\n"


def write_json(path, obj) -> None:
    """``obj`` as strict JSON (:func:`json_text`), atomically."""
    atomic_write_text(path, json_text(obj))


def format_float(v) -> str:
    """Round-trip float formatting (``repr``): reading it back gives the same float."""
    if isinstance(v, (int, np.integer)) and not isinstance(v, bool):
        return str(int(v))
    v = float(v)
    if math.isnan(v):
        return "nan"
    if math.isinf(v):
        return "inf" if v > 0 else "-inf"
    return repr(v)


def write_metrics(path, columns: dict) -> None:
    """Write a dict of equal-length columns as CSV (atomically)."""
    names = list(columns)
    n = len(columns[names[0]]) if names else 0
    buf = io.StringIO()
    wr = csv.writer(buf, lineterminator="\n")
    wr.writerow(names)
    int_cols = {"step"}
    for i in range(n):
        wr.writerow([str(int(columns[k][i])) if k in int_cols else format_float(columns[k][i]) for k in names])
    atomic_write_text(path, buf.getvalue())


def read_metrics(path) -> dict:
    """Read ``metrics.csv`` into a dict of NumPy arrays (``step`` as int64).

    Refused with a :class:`RunFileError` naming the line and column: text that is not UTF-8
    or not CSV, an empty file, a header without ``step`` or with a name twice, a row with the
    wrong number of fields, a value that is not a number (``nan``/``inf`` are numbers), a step
    that is not a non-negative integer, steps that do not increase."""
    path = Path(path)
    rows = _metrics_rows(path)
    names = _metrics_header(path, rows[0])
    out = _metrics_columns(path, names, rows[1:])
    steps = out["step"]
    if steps.size > 1 and np.any(np.diff(steps) <= 0):
        i = int(np.nonzero(np.diff(steps) <= 0)[0][0]) + 1
        raise RunFileError(path, f"line {rows[i + 1][0]}: step {int(steps[i])} does not follow step "
                                 f"{int(steps[i - 1])}", "steps that increase from row to row")
    return out


#: What a damaged metrics.csv is told to be.
_METRICS_ALLOWED = "the metrics.csv a run wrote (a header with step, then one row of numbers per record)"


def _metrics_rows(path: Path) -> list:
    """The (line number, fields) of every CSV row of ``path``; at least the header."""
    csv.field_size_limit(1 << 20)
    try:
        fh = open(path, newline="", encoding="utf-8")
    except OSError as e:
        raise RunFileError(path, f"cannot read the file ({e.strerror or e})") from None
    rows = []
    with fh:
        reader = csv.reader(fh)
        try:
            for row in reader:
                rows.append((reader.line_num, row))
        except csv.Error as e:
            raise RunFileError(path, f"line {reader.line_num}: not readable as CSV ({short_repr(str(e), 60)})",
                               _METRICS_ALLOWED) from None
        except UnicodeDecodeError:
            raise RunFileError(path, f"line {reader.line_num + 1}: not UTF-8 text", _METRICS_ALLOWED) from None
    if not rows:
        raise RunFileError(path, "the file is empty (no header)", _METRICS_ALLOWED)
    return rows


def _metrics_header(path: Path, header) -> list:
    """The column names of the header row (line, fields): with ``step``, none empty or twice."""
    hline, names = header
    if "step" not in names:
        raise RunFileError(path, f"line {hline}: the header has no 'step' column", _METRICS_ALLOWED)
    for j, k in enumerate(names):
        if not k or names.index(k) != j:
            raise RunFileError(path, f"line {hline}: column {j + 1} of the header is "
                                     f"{'empty' if not k else 'a repeated name ' + short_repr(k, 30)}",
                               _METRICS_ALLOWED)
    return names


def _metrics_columns(path: Path, names: list, rows: list) -> dict:
    """The data rows as columns: ``step`` non-negative integers (int64), the rest numbers."""
    cols = [[] for _ in names]
    isstep = [k == "step" for k in names]
    for line, row in rows:
        if len(row) != len(names):
            raise RunFileError(path, f"line {line}: {len(row)} fields, the header has {len(names)}",
                               _METRICS_ALLOWED)
        for j, v in enumerate(row):
            try:
                if isstep[j]:
                    x = int(v)
                    if x < 0 or x >= 2 ** 62:
                        raise ValueError
                else:
                    x = float(v)
            except ValueError:
                what = "a non-negative integer" if isstep[j] else "a number"
                raise RunFileError(path, f"line {line}, column {short_repr(names[j], 30)}: {short_repr(v, 30)} is "
                                         f"not {what}", _METRICS_ALLOWED) from None
            cols[j].append(x)
    return {k: np.array(cols[j], dtype=np.int64 if isstep[j] else np.float64) for j, k in enumerate(names)}


def save_checkpoint(path, a, w, step: int, key_data, extra: dict | None = None) -> None:
    """Particles, step and the raw key data (``jax.random.key_data``), atomically."""
    buf = io.BytesIO()
    np.savez(buf, a=np.asarray(a), w=np.asarray(w), step=np.asarray(int(step)),
             key_data=np.asarray(key_data), **(extra or {}))
    atomic_write_bytes(path, buf.getvalue())


#: Largest step a checkpoint may hold (the particle state counts steps in int32).
MAX_STEP = 2 ** 31 - 1


def load_checkpoint(path, stacked: bool = False) -> dict:
    """The arrays of a checkpoint, checked: ``a`` (N,) and ``w`` (N, p) finite floats,
    ``step`` an integer in 0..2^31-1, ``key_data`` unsigned integers. Anything else (a damaged
    file, a missing or extra-dimensional array, a pickled object) is a :class:`RunFileError`.
    ``stacked``: a sweep's checkpoint, one more leading (member) axis on a, w and key_data."""
    extra = 1 if stacked else 0
    path = Path(path)
    allowed = "a checkpoint.npz written by mfld (a, w, step, key_data)"
    try:
        with np.load(path, allow_pickle=False) as z:
            ck = {k: z[k] for k in z.files}
    except FileNotFoundError:
        raise RunFileError(path, "no checkpoint file", allowed) from None
    except Exception as e:  # noqa: BLE001 - a damaged zip, a bad header, an object array ...
        raise RunFileError(path, f"not a readable checkpoint ({type(e).__name__}: {short_repr(str(e), 50)})",
                           allowed) from None
    missing = [k for k in ("a", "w", "step", "key_data") if k not in ck]
    if missing:
        raise RunFileError(path, f"no array {', '.join(map(repr, missing))} in the checkpoint", allowed)
    a, w, step, kd = ck["a"], ck["w"], ck["step"], ck["key_data"]
    for name, arr, ndim in (("a", a, 1 + extra), ("w", w, 2 + extra)):
        if arr.dtype not in (np.float32, np.float64) or arr.ndim != ndim:
            raise RunFileError(path, f"array {name!r} has dtype {arr.dtype} and shape {arr.shape}",
                               f"a float32/float64 array of {ndim} dimension(s)")
        if not np.all(np.isfinite(arr)):
            raise RunFileError(path, f"array {name!r} holds NaN or inf", "finite particles")
    if a.shape[0] != w.shape[0] or a.dtype != w.dtype:
        raise RunFileError(path, f"arrays 'a' {a.shape} {a.dtype} and 'w' {w.shape} {w.dtype} do not match", allowed)
    if step.ndim != 0 or step.dtype.kind not in "iu" or not 0 <= int(step) <= MAX_STEP:
        shown = short_repr(step.tolist() if step.size < 8 else step.shape, 40)
        raise RunFileError(path, f"'step' is {shown}", f"an integer step in 0..{MAX_STEP}")
    if kd.dtype.kind != "u" or kd.ndim != 1 + extra or kd.size == 0:
        raise RunFileError(path, f"'key_data' has dtype {kd.dtype} and shape {kd.shape}",
                           "the key data of jax.random.key_data (unsigned integers)")
    return ck


def read_text(path, limit: int = MAX_TEXT_BYTES) -> str:
    """A run file's text (UTF-8, at most ``limit`` bytes), or a :class:`RunFileError`."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            raw = f.read(limit + 1)
    except OSError as e:
        raise RunFileError(path, f"cannot read the file ({e.strerror or e})") from None
    if len(raw) > limit:
        raise RunFileError(path, f"larger than {limit} bytes", "the file the run wrote")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw[:e.start].count(b"\n") + 1
        raise RunFileError(path, f"line {line}: not UTF-8 text", "the file the run wrote") from None


def read_json(path, *, required: tuple = ()) -> dict:
    """A run's JSON file as a dict (``NaN``/``Infinity`` of older files accepted, ``null`` is
    None); a :class:`RunFileError` naming the line and column of a syntax error, a top level
    that is not an object, or a missing ``required`` key."""
    path = Path(path)
    text = read_text(path)
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        raise RunFileError(path, f"line {e.lineno}, column {e.colno}: not valid JSON ({e.msg})",
                           "the JSON file the run wrote") from None
    except RecursionError:
        raise RunFileError(path, "nested too deeply", "the JSON file the run wrote") from None
    if not isinstance(obj, dict):
        raise RunFileError(path, f"the top level is a JSON {type(obj).__name__}, not an object",
                           "the JSON object the run wrote")
    missing = [k for k in required if k not in obj]
    if missing:
        raise RunFileError(path, f"no key {missing[0]!r}", "the JSON object the run wrote")
    return obj


def read_config(path) -> dict:
    """The stored ``config.yaml`` as a validated config dict (:func:`mfld.config.validate`);
    problems name the file (and the line or the field)."""
    import yaml

    path = Path(path)
    text = read_text(path, cfgmod.MAX_YAML_BYTES)
    try:
        data = cfgmod.safe_load(text)
    except cfgmod.YAMLProblem as e:
        raise RunFileError(path, f"YAML refused: {e}") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        raise RunFileError(path, f"line {mark.line + 1 if mark is not None else '?'}: not valid YAML",
                           "the config.yaml the run wrote") from None
    if not isinstance(data, dict):
        raise RunFileError(path, "not a mapping of config sections", "the config.yaml the run wrote")
    try:
        return cfgmod.validate(data).to_dict()
    except ConfigError as err:
        raise RunFileError(path, str(err)) from None


def remove_temporaries(run_dir) -> list[str]:
    """Delete the temporary files an interrupted :func:`atomic_write_bytes` left in a run
    directory (and its ``snapshots``/``figures``); only call it holding the run's lock."""
    removed = []
    run_dir = Path(run_dir)
    for d in (run_dir, run_dir / "snapshots", run_dir / "figures"):
        try:
            entries = list(os.scandir(d))
        except OSError:
            continue
        for e in entries:
            if TEMP_PATTERN.match(e.name) and e.is_file(follow_symlinks=False):
                try:
                    os.unlink(e.path)
                    removed.append(os.path.relpath(e.path, run_dir))
                except OSError:
                    pass
    return sorted(removed)


# ---------------------------------------------------------------------------------------
# The marker and the integrity record
# ---------------------------------------------------------------------------------------

def _canonical(value) -> str:
    return json.dumps(jsonable(value, nonfinite_as_str=True), sort_keys=True, separators=(",", ":"))


def digest(content: dict) -> dict:
    """The integrity record of a parsed run file (config or environment): the SHA-256 of its
    canonical JSON and a short digest per (flattened) field, to name the field that changed."""
    flat = cfgmod.flatten(content)
    return {"sha256": hashlib.sha256(_canonical(content).encode()).hexdigest(),
            "fields": {k: hashlib.sha256(_canonical(v).encode()).hexdigest()[:16] for k, v in sorted(flat.items())}}


def read_marker(run_dir) -> dict | None:
    """The marker of a run directory (None if there is none); a damaged one is a RunFileError."""
    path = Path(run_dir) / MARKER
    if not path.is_file() or path.is_symlink():
        return None
    marker = read_json(path)
    if marker.get("mfld_run") != 1 or not isinstance(marker.get("integrity", {}), dict):
        raise RunFileError(path, "not an mfld run marker", "the marker the run wrote")
    return marker


def write_marker(run_dir, records: dict, previous: dict | None = None) -> None:
    """Write the marker with the integrity ``records`` ({file name: :func:`digest`}). Files in
    ``previous`` ({name: digest of the content on disk now}) are about to be rewritten: both
    their old and their new content are accepted until the next :func:`write_marker` (a
    crash in between leaves a run that resumes)."""
    path = Path(run_dir) / MARKER
    old = {}
    try:
        old = read_marker(run_dir) or {}
    except ConfigError:
        old = {}
    integrity = {}
    for name, rec in records.items():
        entry = dict(rec)
        if previous and name in previous and previous[name]["sha256"] != rec["sha256"]:
            entry["also"] = [previous[name]["sha256"]]
        integrity[name] = entry
    marker = {"mfld_run": 1, "created": old.get("created") or _dt.datetime.now().isoformat(timespec="seconds"),
              "integrity": integrity}
    atomic_write_text(path, json_text(marker))


def check_integrity(run_dir, name: str, content: dict, marker: dict | None) -> None:
    """Refuse a run file (``name``, parsed ``content``) that differs from the integrity record
    in the marker, naming the first field that changed. Nothing to check without a record."""
    rec = ((marker or {}).get("integrity") or {}).get(name)
    if not isinstance(rec, dict):
        return
    now = digest(content)
    if now["sha256"] == rec.get("sha256") or now["sha256"] in (rec.get("also") or []):
        return
    fields, old = now["fields"], rec.get("fields") or {}
    changed = [k for k in sorted(set(fields) | set(old)) if fields.get(k) != old.get(k)]
    where = f" at {changed[0]}" + (f" (and {len(changed) - 1} more)" if len(changed) > 1 else "") if changed else ""
    raise RunFileError(Path(run_dir) / name, f"edited since the run wrote it{where}",
                       "the file as the run wrote it (start a new run, or --overwrite, to change settings)")


def is_run_dir(path) -> bool:
    """Whether ``path`` holds an mfld run: the marker, or (runs written before it existed) a
    ``config.yaml`` next to an ``env.json`` that names the mfld version and the data hash."""
    p = Path(path)
    if (p / MARKER).is_file() and not (p / MARKER).is_symlink():
        return True
    if not ((p / CONFIG).is_file() and (p / ENV).is_file()):
        return False
    try:
        env = read_json(p / ENV)
    except ConfigError:
        return False
    return "mfld" in env and "data_sha256" in env


def git_hash() -> str | None:
    try:
        root = Path(__file__).resolve().parents[2]
        out = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True,
                             text=True, timeout=5)
        return out.stdout.strip() or None if out.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        return None


def environment(seed: int, precision: str) -> dict:
    """Versions, devices and settings that determine a run's numbers."""
    import jax
    import jaxlib
    import scipy

    import mfld
    from mfld.blocking import cpu_threads
    from mfld.kernels import status as kernel_status
    from mfld.xla import compiler_options

    return {
        "mfld": mfld.__version__,
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "jax": jax.__version__,
        "jaxlib": jaxlib.__version__,
        "numpy": np.__version__,
        "scipy": scipy.__version__,
        "backend": jax.default_backend(),
        "devices": [str(d) for d in jax.devices()],
        "device_count": jax.device_count(),
        "process_count": jax.process_count(),
        # the step's block sizes follow the thread count, so runs with different counts agree
        # only up to the reassociation of sums (docs/performance.md)
        "cpu_threads": cpu_threads(),
        # XLA options the programs were compiled with (mfld.xla; change float32 rounding only)
        "xla_compiler_options": compiler_options(),
        # the compiled tanh kernels of the drift (mfld.kernels): "on" or why not
        "kernels": kernel_status(),
        "x64": bool(jax.config.jax_enable_x64),
        "precision": precision,
        "seed": seed,
        "git": git_hash(),
        "argv": sys.argv,
    }


class Metrics(dict):
    """The metrics table: a dict of column name -> 1-D NumPy array, with ``to_pandas()``."""

    def to_pandas(self):
        import pandas as pd  # optional, only if the user has it

        return pd.DataFrame(dict(self))

    @property
    def n_rows(self) -> int:
        return len(next(iter(self.values()), []))


@dataclass
class RunRecord:
    """What :func:`load_run` returns: everything a notebook needs from a run directory."""

    path: Path
    config: dict
    metrics: Metrics
    summary: dict
    env: dict
    a: np.ndarray | None
    w: np.ndarray | None
    step: int | None
    optimum: dict | None = None


def load_run(run_dir) -> RunRecord:
    """Load a run directory: config, metrics (as a table), summary and final particles.

    Damaged files are refused with one line naming the file and the place (:class:`RunFileError`)."""
    p = Path(run_dir)
    if not p.is_dir():
        raise ConfigError("not a directory", field="run_dir", value=str(p), allowed="a run directory")
    if not (p / CONFIG).is_file():
        raise ConfigError("not a run directory (no config.yaml)", field="run_dir", value=str(p))
    config = read_config(p / CONFIG)
    metrics = Metrics(read_metrics(p / METRICS)) if (p / METRICS).exists() else Metrics()
    summary = read_json(p / SUMMARY) if (p / SUMMARY).exists() else {}
    env = read_json(p / ENV) if (p / ENV).exists() else {}
    opt = read_json(p / OPTIMUM, required=("F_star",)) if (p / OPTIMUM).exists() else None
    a = w = step = None
    if (p / CHECKPOINT).exists():
        ck = load_checkpoint(p / CHECKPOINT)
        a, w, step = ck["a"], ck["w"], int(ck["step"])
    return RunRecord(p, config, metrics, summary, env, a, w, step, opt)
