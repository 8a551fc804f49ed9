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


class OneLineGroup(click.Group):
    """A click group whose usage errors are printed on one line."""

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
        except click.exceptions.Abort:
            click.echo("error: aborted", err=True)
            sys.exit(130)
        except click.exceptions.Exit as e:
            sys.exit(e.exit_code)
        except click.ClickException as e:
            click.echo(f"error: {e.format_message()}", err=True)
            sys.exit(e.exit_code)
        except (ConfigError, TheoryNotApplicable) as e:
            click.echo(f"error: {e}", err=True)
            sys.exit(EXIT_USER_ERROR)


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
@click.argument("config", required=False, type=click.Path(dir_okay=False))
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE",
              help="Dotted override, e.g. --set objective.tau=0.01 (repeatable).")
@click.option("--out", type=click.Path(file_okay=False), default=None, help="Run directory.")
@click.option("--x64", is_flag=True, help="Run the particles in float64 (precision: float64).")
@click.option("--overwrite", is_flag=True, help="Replace an existing run directory.")
@click.option("--resume", "resume", is_flag=True, help="Continue the run in --out from its checkpoint.")
@click.option("--quiet", is_flag=True, help="No progress bar.")
def run(config, overrides, out, x64, overwrite, resume, quiet):
    """Train on CONFIG (YAML; default: the embedded teacher-student problem)."""
    from mfld import config as cfgmod

    ov = list(overrides) + (["precision=float64"] if x64 else [])
    cfg = cfgmod.load(config, ov)  # validated before JAX is imported
    if resume and out is None:
        raise ConfigError("--resume needs --out RUN_DIR", field="--resume")
    _set_x64(cfg.precision == "float64")
    from mfld.app.runner import run as do_run

    res = do_run(cfg, out=out, overwrite=overwrite, resume=resume, progress=not quiet and cfg.record.progress)
    _print_summary(res)
    if res.summary.get("status") == "diverged":
        sys.exit(3)


def _print_summary(res):
    s = res.summary
    fin = s.get("final", {})
    parts = [f"status={s.get('status')}", f"steps={fin.get('step', 0)}"]
    for k in ("risk", "test_risk", "reg_risk", "gap", "F_minus_Fstar_upper"):
        if k in fin and fin[k] == fin[k]:
            parts.append(f"{k}={fin[k]:.4g}")
    if "F_star" in s:
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
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE")
def validate(config, overrides):
    """Check CONFIG without running it."""
    from mfld import config as cfgmod

    cfg = cfgmod.load(config, list(overrides))
    click.echo(f"ok: {config} ({cfg.model.n_particles} particles, {cfg.dynamics.steps} steps)")


@cli.command()
@click.argument("run_dir", type=click.Path(file_okay=False))
def plot(run_dir):
    """Redraw the figures of RUN_DIR from its files."""
    from mfld.app.replot import replot

    for name in replot(run_dir):
        click.echo(os.path.join(run_dir, "figures", name))


def main(argv=None):
    cli.main(args=argv)


if __name__ == "__main__":  # pragma: no cover
    main()
