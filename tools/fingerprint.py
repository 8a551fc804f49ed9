"""Fingerprint everything the default run and the experiments' quick settings write.

A refactor that must not change any number (issue 13) is checked by fingerprinting before and
after on one machine::

    python tools/fingerprint.py --json /tmp/before.json            # on the old commit
    python tools/fingerprint.py --json /tmp/after.json --compare /tmp/before.json

Each output is produced in its own fresh process (``mfld run`` on the embedded default problem,
``mfld experiment NAME --quick`` for every registered experiment) and every file it writes is
hashed (SHA-256), figures included, after removing what is a clock reading rather than a result:
``env.json`` (versions, host), wall-time fields of JSON and CSV files (``wall_time``,
``created``, keys ending in ``_s``, which hold seconds; in ``.mfld-run`` the checksum of
``env.json``), wall-time phrases and time columns of tables in reports; ``real_data.png``
(a panel of wall times) is not hashed. Two fingerprints of one commit agree (checked with
``--compare`` against a second run); a difference names the file (keep the outputs with
``--keep`` on both sides to compare its contents).

The hashes depend on the machine (CPU thread count, jaxlib build): compare runs on one machine.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import io
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

# keys whose values are clock readings, not results
_TIME_KEYS = re.compile(r"^(wall_time|created|seconds|elapsed.*|wall.*|.*_s|argv|env\.json)$")
# phrases with a wall time in prose (reports, logs)
_TIME_TEXT = re.compile(r"(?i)((?:wall[ -]?time|time=|took|fit \+ predict)[^0-9\n]{0,40})"
                        r"[0-9][0-9.,]*(?:e[-+]?\d+)?(\s*(?:min|s|ms)\b)?")
# files that are clock readings (versions and host; a figure with a wall-time panel)
_SKIP = {"env.json", "real_data.png"}


def _canon_md(text: str) -> str:
    """Wall-time phrases replaced; in Markdown tables, the cells of time columns blanked."""
    text = _TIME_TEXT.sub(lambda m: m.group(1) + "<time>", text)
    out, drop = [], None
    for line in text.split("\n"):
        if line.startswith("|"):
            cells = line.split("|")
            if drop is None:
                drop = {i for i, c in enumerate(cells) if _TIME_KEYS.match(c.strip().strip("`"))}
            line = "|".join("<time>" if i in drop else c for i, c in enumerate(cells))
        else:
            drop = None
        out.append(line)
    return "\n".join(out)


def _canon_json(obj):
    if isinstance(obj, dict):
        return {k: ("<time>" if _TIME_KEYS.match(str(k)) else _canon_json(v)) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_canon_json(v) for v in obj]
    return obj


def _canon_csv(text: str) -> str:
    rows = list(csv.reader(io.StringIO(text)))
    if not rows:
        return text
    keep = [i for i, name in enumerate(rows[0]) if not _TIME_KEYS.match(name)]
    out = io.StringIO()
    w = csv.writer(out, lineterminator="\n")
    for r in rows:
        w.writerow([r[i] for i in keep if i < len(r)])
    return out.getvalue()


def canonical_bytes(path: Path) -> bytes:
    """The file's bytes with clock readings removed (see the module docstring)."""
    raw = path.read_bytes()
    suffix = path.suffix.lower()
    if path.name == ".mfld-run" or suffix == ".json":
        try:
            return json.dumps(_canon_json(json.loads(raw)), sort_keys=True).encode()
        except ValueError:
            return raw
    if suffix == ".csv":
        return _canon_csv(raw.decode()).encode()
    if suffix in (".md", ".txt", ".log", ".yaml"):
        return _canon_md(raw.decode()).encode()
    return raw


def fingerprint_dir(root: Path) -> dict[str, str]:
    out = {}
    for p in sorted(root.rglob("*")):
        if p.is_file() and p.name not in _SKIP:
            out[str(p.relative_to(root))] = hashlib.sha256(canonical_bytes(p)).hexdigest()
    return out


def _jobs():
    from mfld.experiments import EXPERIMENTS

    yield "run", ["run", "--quiet"]
    yield "run-x64", ["run", "--quiet", "--x64", "--set", "dynamics.steps=300"]
    # d = 5: the Monte Carlo certificate with the adapted proposal, and the k-NN entropy
    yield "run-d5", ["run", "--quiet", "--set", "data.params.d=5", "--set", "dynamics.steps=300"]
    for name in EXPERIMENTS:
        yield f"experiment/{name}", ["experiment", name, "--quick", "--quiet"]


def produce(work: Path, only: list[str] | None = None) -> dict[str, str]:
    """Run every job in a fresh process under ``work``; return {job/file: sha256}."""
    prints = {}
    env = dict(os.environ)
    for job, args in _jobs():
        if only and not any(o in job for o in only):
            continue
        out = work / job
        cmd = [sys.executable, "-m", "mfld.cli", *args, "--out", str(out)]
        print(f"[fingerprint] {job}", file=sys.stderr, flush=True)
        res = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if res.returncode != 0:
            raise SystemExit(f"{job} failed ({res.returncode}):\n{res.stderr[-3000:]}")
        for rel, h in fingerprint_dir(out).items():
            prints[f"{job}/{rel}"] = h
    return prints


def compare(a: dict, b: dict) -> list[str]:
    diffs = []
    for k in sorted(set(a) | set(b)):
        if k not in a:
            diffs.append(f"only in the new fingerprint: {k}")
        elif k not in b:
            diffs.append(f"only in the old fingerprint: {k}")
        elif a[k] != b[k]:
            diffs.append(f"differs: {k}")
    return diffs


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--json", type=Path, required=True, help="where to write the fingerprint")
    ap.add_argument("--compare", type=Path, help="an earlier fingerprint to compare with")
    ap.add_argument("--keep", type=Path, help="keep the outputs in this directory (default: a temp dir)")
    ap.add_argument("--only", nargs="*", help="only the jobs whose name contains one of these")
    args = ap.parse_args(argv)
    if args.keep:
        args.keep.mkdir(parents=True, exist_ok=True)
        prints = produce(args.keep, args.only)
    else:
        with tempfile.TemporaryDirectory() as tmp:
            prints = produce(Path(tmp), args.only)
    args.json.write_text(json.dumps(prints, indent=1, sort_keys=True) + "\n")
    print(f"{len(prints)} files fingerprinted -> {args.json}")
    if args.compare:
        diffs = compare(prints, json.loads(args.compare.read_text()))
        for d in diffs:
            print(d)
        print("identical" if not diffs else f"{len(diffs)} differences")
        return 1 if diffs else 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
