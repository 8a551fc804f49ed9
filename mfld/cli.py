"""The ``mfld`` command line.

Every user mistake ends in one line on stderr (``error: <field>: <message>``) and a non-zero
exit code (2), never a traceback or a usage box. The config is validated before JAX is
imported, so mistakes fail fast.
"""

from __future__ import annotations

import os
import sys

import click

from mfld.errors import ConfigError, TheoryNotApplicable

EXIT_USER_ERROR = 2
EXIT_DIVERGED = 3  # the run diverged (summary status "diverged"); interrupted runs exit 128 + signal


class _Interrupted(Exception):
    """A KeyboardInterrupt (a second Ctrl-C) carried past click, which would print an empty line
    and "Aborted!" for it; ``run_dir``: the run it stopped, if one was being written."""

    def __init__(self, run_dir=None):
        super().__init__("interrupted")
        self.run_dir = run_dir


def resume_command(run_dir, devices=None) -> str:
    """The exact command that continues the run in ``run_dir``."""
    import shlex

    return "mfld run --resume " + shlex.quote(str(run_dir)) + (f" --devices {int(devices)}" if devices else "")


class OneLineGroup(click.Group):
    """A click group whose usage errors are printed on one line."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except KeyboardInterrupt as err:
            raise _Interrupted(getattr(err, "run_dir", None)) from None

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        try:
            return super().main(args=args, prog_name=prog_name or "mfld", standalone_mode=False, **extra)
        except click.exceptions.NoArgsIsHelpError as e:
            click.echo(e.ctx.get_help())
            sys.exit(0)
        except click.UsageError as e:
            msg = e.format_message().replace("\n", " ")
            where = f" (mfld {e.ctx.command.name})" if e.ctx is not None and e.ctx.command is not self else ""
            click.echo(f"error: {msg}{where}; see 'mfld --help'", err=True)
            sys.exit(EXIT_USER_ERROR)
        except _Interrupted as e:  # a second Ctrl-C during a run (the first one checkpoints and stops)
            hint = f"; resume with: {resume_command(e.run_dir)}" if e.run_dir is not None else ""
            click.echo(f"error: interrupted{hint}", err=True)
            stop = SystemExit(130)
            stop.interrupted = True  # main() ends the process at once (see there)
            raise stop from None
        except click.exceptions.Abort:  # a Ctrl-C outside a command (click's own prompt handling)
            click.echo("error: interrupted", err=True)
            sys.exit(130)
        except click.exceptions.Exit as e:
            sys.exit(e.exit_code)
        except click.ClickException as e:
            click.echo(f"error: {e.format_message()}", err=True)
            sys.exit(e.exit_code)
        except (ConfigError, TheoryNotApplicable) as e:
            click.echo(f"error: {e}", err=True)
            sys.exit(EXIT_USER_ERROR)
        except KeyboardInterrupt:  # a second Ctrl-C during a run (the first one checkpoints and stops)
            click.echo("error: interrupted", err=True)
            sys.exit(130)
        except OSError as e:  # the file system refused (permissions, disk full, read-only ...): one line
            where = f": {e.filename}" if getattr(e, "filename", None) else ""
            click.echo(f"error: {e.strerror or e}{where}", err=True)
            sys.exit(1)


@click.group(cls=OneLineGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="mfld", prog_name="mfld")
def cli():
    """mfld: mean-field Langevin dynamics of two-layer networks -- simulate, measure, certify."""


def _set_x64(enabled: bool):
    """Apply the precision switch at the entry point, before any JAX array exists."""
    if enabled:
        import jax

        jax.config.update("jax_enable_x64", True)


@cli.command()
@click.argument("config", required=False, type=click.Path())
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE",
              help="Dotted override, e.g. --set objective.tau=0.01 (repeatable).")
@click.option("--out", type=click.Path(file_okay=False), default=None,
              help="Run directory (default: runs/<name>-<YYYYmmdd-HHMMSS> under the current directory; "
                   "'-2', '-3' ... appended when taken).")
@click.option("--x64", is_flag=True, help="Run the particles in float64 (precision: float64).")
@click.option("--overwrite", is_flag=True,
              help="Replace the mfld run in --out (a directory that does not hold an mfld run is never cleared).")
@click.option("--resume", "resume", is_flag=True,
              help="Continue the run in --out (or: mfld run --resume RUN_DIR) from its checkpoint.")
@click.option("--quiet", is_flag=True, help="No progress bar.")
@click.option("--devices", type=int, default=None, metavar="K",
              help="Shard the particles over K devices (CPU: K simulated devices). Same seed, same run.")
@click.option("--threads", type=int, default=None, metavar="T", help="CPU cores for this process (pinned).")
@click.option("--coordinator", default=None, metavar="HOST:PORT",
              help="Multi-process run: process 0's address ('auto': detect a SLURM/MPI cluster).")
@click.option("--coordinator-bind", "coordinator_bind", default=None, metavar="HOST:PORT",
              help="Multi-process run: the address process 0 listens on (default: the --coordinator address, "
                   "so 127.0.0.1 stays local; 0.0.0.0:PORT for every interface).")
@click.option("--num-processes", type=int, default=None, metavar="P", help="Multi-process run: process count.")
@click.option("--process-id", type=int, default=None, metavar="I", help="Multi-process run: this process (0..P-1).")
@click.option("--format", "fig_format", type=click.Choice(["png", "pdf", "svg"]), default="png", show_default=True,
              help="File format of the figures.")
def run(config, overrides, out, x64, overwrite, resume, quiet, devices, threads, coordinator, coordinator_bind,
        num_processes, process_id, fig_format):
    """Train on CONFIG (YAML; default: the embedded teacher-student problem).

    The run is written to --out (default runs/<name>-<timestamp>): config.yaml, metrics.csv,
    summary.json, checkpoint.npz, figures/ (docs/runs.md). Ctrl-C stops at the next record
    with a checkpoint; the command to continue is printed."""
    if devices is not None or threads is not None:  # before JAX (and NumPy's BLAS) start
        from mfld.sharding import configure_cpu

        configure_cpu(threads=threads, devices=devices)
    from mfld.app import inputs  # no JAX at import: config, data and run-directory checks first

    if resume and overwrite:
        raise ConfigError("--resume and --overwrite exclude each other", field="--overwrite",
                          allowed="one of --resume (continue) or --overwrite (start again)")
    ov = list(overrides) + (["precision=float64"] if x64 else [])
    if resume and out is None and config is not None and os.path.isdir(config):
        config, out = None, config  # mfld run --resume RUN_DIR
    # the config (a resume must match the stored one) and its data (a resume: the run's own),
    # validated before JAX is imported; the runner takes them as they are
    single = coordinator is None and num_processes is None and process_id is None
    prep = inputs.prepare(config, ov, out=out, resume=resume, overwrite=overwrite,
                          check_dir=single)  # several processes: only process 0's runner checks it
    cfg = prep.config
    _set_x64(cfg.precision == "float64")
    writer = _join_processes(coordinator, num_processes, process_id, coordinator_bind)
    from mfld.app import runner

    if not writer:  # only process 0 writes; the others compute their share and read a resumed run
        runner.run(prep, out=out, resume=resume, progress=False, devices=devices, write=False,
                   handle_signals=False, follower=True)
        return
    from mfld.app.style import figure_format

    with figure_format(fig_format):
        res = runner.run(prep, out=out, overwrite=overwrite, resume=resume,
                         progress=not quiet and cfg.record.progress, devices=devices)
    _print_summary(res)
    status = res.summary.get("status")
    if status == "diverged":
        sys.exit(EXIT_DIVERGED)
    if status == "interrupted":
        if res.run_dir is not None:
            click.echo(f"resume with: {resume_command(res.run_dir, devices)}")
        sys.exit(128 + int(res.summary.get("signal") or 2))


def _join_processes(coordinator, num_processes, process_id, bind=None) -> bool:
    """``jax.distributed`` start-up for a multi-process run (before any JAX computation); returns
    whether this process writes (process 0, or a single-process run)."""
    if coordinator is None and num_processes is None and process_id is None:
        if bind is not None:
            raise ConfigError("--coordinator-bind needs a multi-process run", field="--coordinator-bind",
                              value=bind, allowed="with --coordinator")
        return True
    from mfld import sharding

    if coordinator == "auto" and num_processes is None and process_id is None:
        sharding.initialize(bind=bind)
    else:
        sharding.initialize(coordinator, num_processes, process_id, bind=bind)
    return sharding.is_writer()


def _print_summary(res):
    s = res.summary
    fin = s.get("final", {})
    parts = [f"status={s.get('status')}", f"steps={fin.get('step', 0)}"]
    for k in ("risk", "test_risk", "reg_risk", "gap", "F_minus_Fstar_upper"):
        if isinstance(fin.get(k), (int, float)) and fin[k] == fin[k]:
            parts.append(f"{k}={fin[k]:.4g}")
    if isinstance(s.get("F_star"), (int, float)):
        parts.append(f"F*={s['F_star']:.6g}")
    parts.append(f"time={s.get('run_time_s', 0):.1f}s")
    click.echo("  ".join(parts))
    for n in res.notes:
        click.echo(f"note: {n}")
    if res.run_dir is not None:
        click.echo(f"run directory: {res.run_dir}")


@cli.command("config")
@click.option("--plain", is_flag=True, help="Without comments.")
def config_cmd(plain):
    """Print the default config (commented YAML)."""
    from mfld import config as cfgmod

    click.echo(cfgmod.Config().to_yaml() if plain else cfgmod.commented_default(), nl=False)


@cli.command()
@click.argument("config", type=click.Path(dir_okay=False))
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE",
              help="Dotted override applied before checking, as for mfld run, e.g. --set objective.tau=0.01 "
                   "(repeatable).")
def validate(config, overrides):
    """Check CONFIG (with its overrides) without running it: every field, the data, the
    certificate settings and the memory the run needs (the checks `mfld run` makes before it
    writes anything)."""
    from mfld.app.inputs import validate_inputs  # the config and its data; no JAX

    cfg = validate_inputs(config, list(overrides))
    click.echo(f"ok: {config} ({cfg.model.n_particles} particles, {cfg.dynamics.steps} steps)")


@cli.command()
@click.argument("run_dir", type=click.Path(file_okay=False))
@click.option("--format", "fig_format", type=click.Choice(["png", "pdf", "svg"]), default="png", show_default=True,
              help="File format of the figures.")
def plot(run_dir, fig_format):
    """Redraw the figures of RUN_DIR from its files."""
    from mfld.app.replot import replot
    from mfld.app.style import figure_format

    with figure_format(fig_format):
        names = replot(run_dir)
    for name in names:
        click.echo(os.path.join(run_dir, "figures", name))


@cli.command("optimum")
@click.argument("config", required=False, type=click.Path())
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help="Dotted override (repeatable).")
@click.option("--out", type=click.Path(file_okay=False), default=".", help="Directory for optimum.json.")
def optimum_cmd(config, overrides, out):
    """Solve for the global optimum F* of CONFIG's problem; write optimum.json."""
    from mfld.app.optimum_cmd import main as optimum_main

    optimum_main(config, list(overrides), out)


@cli.command()
@click.argument("name")
@click.option("--quick", is_flag=True, help="Seconds-long CI setting instead of the full one.")
@click.option("--out", type=click.Path(file_okay=False), default=None,
              help="Output directory (default experiments/NAME).")
@click.option("--format", "fig_format", type=click.Choice(["png", "pdf", "svg"]), default="png", show_default=True,
              help="File format of the figures.")
@click.option("--quiet", is_flag=True, help="No progress bar (none is shown either when stderr is not a terminal).")
def experiment(name, quick, out, fig_format, quiet):
    """Run experiment NAME (linear-convergence, global-optimality, discretisation, mf-vs-ntk,
    annealing, minibatch, lazy-vs-mean-field, sparse-parity, real-data): figures, report.md
    and CSVs in one directory."""
    from mfld.experiments import run_experiment

    path = run_experiment(name, out, quick=quick, progress=not quiet, figure_format=fig_format)
    click.echo(os.path.join(str(path), "report.md"))


@cli.command()
@click.argument("run_dir", type=click.Path(file_okay=False))
@click.option("--out", "out_gif", type=click.Path(dir_okay=False), default=None,
              help="GIF path (default RUN_DIR/figures/particles.gif).")
def animate(run_dir, out_gif):
    """GIF of the particle snapshots of RUN_DIR (density of rho* behind when d = 1)."""
    from mfld.app.animate import animate as _animate

    click.echo(str(_animate(run_dir, out_gif)))


@cli.command()
@click.argument("config", required=False, type=click.Path())
@click.option("--grid", "grid", multiple=True, metavar="NAME=V1,V2",
              help="Values of tau, lam or eta (repeatable), e.g. --grid tau=0.01,0.02.")
@click.option("--seeds", type=int, default=1, show_default=True, help="Seeds per grid point.")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help="Dotted override (repeatable).")
@click.option("--out", type=click.Path(file_okay=False), default=None, help="Sweep directory.")
@click.option("--threads", type=int, default=None, help="CPU cores to use (before JAX starts).")
@click.option("--resume", "resume", is_flag=True, help="Continue the interrupted sweep in --out (same arguments).")
@click.option("--quiet", is_flag=True, help="No progress bars.")
def sweep(config, grid, seeds, overrides, out, threads, resume, quiet):
    """All members of a hyperparameter grid in one compiled, vmapped call (see mfld.app.sweep_cmd).
    Exit status 3 when a member diverged (as mfld run)."""
    if threads is not None:
        from mfld.sharding import configure_cpu

        configure_cpu(threads=threads)
    from mfld.app.sweep_cmd import run_sweep

    res = run_sweep(config, overrides, grid, seeds, out, resume=resume, progress=not quiet)
    click.echo(str(res.out))
    if res.diverged:
        click.echo(f"note: {len(res.diverged)} of {len(res.statuses)} members diverged: "
                   f"{', '.join(res.diverged[:5])}{' ...' if len(res.diverged) > 5 else ''}")
        sys.exit(EXIT_DIVERGED)


def main(argv=None):
    """The console script's entry point (``argv=None``: the command line)."""
    try:
        cli.main(args=argv)
    except SystemExit as stop:
        if argv is None and getattr(stop, "interrupted", False):
            # A KeyboardInterrupt inside a JAX computation can leave XLA's threads (and the
            # persistent compilation cache's writer) mid-operation; the interpreter's teardown
            # then crashes now and then (SIGSEGV after the error line, with a compilation
            # cache). The run's files are written and its lock released by now: end here.
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(int(stop.code))
        raise


if __name__ == "__main__":  # pragma: no cover
    main()
