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

Every file is written atomically: to a temporary file in the same directory, then renamed.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import platform
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

METRICS = "metrics.csv"
CHECKPOINT = "checkpoint.npz"
SUMMARY = "summary.json"
CONFIG = "config.yaml"
ENV = "env.json"
OPTIMUM = "optimum.json"
DATA = "data.npz"


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (temp file in the same directory + rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
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


def write_json(path, obj) -> None:
    atomic_write_text(path, json.dumps(jsonable(obj), indent=2, allow_nan=True) + "\n")


def jsonable(o, *, nonfinite_as_str: bool = False):
    """``o`` with NumPy arrays/scalars, tuples and dict keys made JSON-native (recursively).
    ``nonfinite_as_str``: nan/inf floats become the strings "nan", "inf", "-inf" (strict JSON)."""
    if isinstance(o, dict):
        return {str(k): jsonable(v, nonfinite_as_str=nonfinite_as_str) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [jsonable(v, nonfinite_as_str=nonfinite_as_str) for v in o]
    if isinstance(o, np.ndarray):
        return jsonable(o.tolist(), nonfinite_as_str=nonfinite_as_str)
    if isinstance(o, (np.floating, np.integer, np.bool_)):
        o = o.item()
    if nonfinite_as_str and isinstance(o, float) and not math.isfinite(o):
        return str(o)
    return o


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
    """Read ``metrics.csv`` into a dict of NumPy arrays (``step`` as int64)."""
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    if not rows:
        return {}
    names, body = rows[0], rows[1:]
    out = {}
    for j, k in enumerate(names):
        vals = [r[j] for r in body]
        out[k] = np.array([int(v) for v in vals], dtype=np.int64) if k == "step" else \
            np.array([float(v) for v in vals], dtype=np.float64)
    return out


def save_checkpoint(path, a, w, step: int, key_data, extra: dict | None = None) -> None:
    """Particles, step and the raw key data (``jax.random.key_data``), atomically."""
    buf = io.BytesIO()
    np.savez(buf, a=np.asarray(a), w=np.asarray(w), step=np.asarray(int(step)),
             key_data=np.asarray(key_data), **(extra or {}))
    atomic_write_bytes(path, buf.getvalue())


def load_checkpoint(path) -> dict:
    with np.load(path) as z:
        return {k: z[k] for k in z.files}


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
    from mfld.network import cpu_threads
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
    """Load a run directory: config, metrics (as a table), summary and final particles."""
    import yaml

    from mfld.errors import ConfigError

    p = Path(run_dir)
    if not (p / CONFIG).exists():
        raise ConfigError("not a run directory (no config.yaml)", field="run_dir", value=str(p))
    config = yaml.safe_load((p / CONFIG).read_text())
    metrics = Metrics(read_metrics(p / METRICS)) if (p / METRICS).exists() else Metrics()
    summary = json.loads((p / SUMMARY).read_text()) if (p / SUMMARY).exists() else {}
    env = json.loads((p / ENV).read_text()) if (p / ENV).exists() else {}
    opt = json.loads((p / OPTIMUM).read_text()) if (p / OPTIMUM).exists() else None
    a = w = step = None
    if (p / CHECKPOINT).exists():
        ck = load_checkpoint(p / CHECKPOINT)
        a, w, step = ck["a"], ck["w"], int(ck["step"])
    return RunRecord(p, config, metrics, summary, env, a, w, step, opt)
