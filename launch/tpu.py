"""Create, set up, run on and delete Cloud TPU VMs (single hosts and pod slices).

Every subcommand only composes `gcloud` commands; `--dry-run` prints them (one per line,
shell-quoted) instead of running them, so a launch can be reviewed or pasted elsewhere.

Remote paths (`--remote-dir`, `--venv`, `--log-file`) are relative to the home directory on
each worker, which is where `gcloud ... ssh --command` starts.
"""

from __future__ import annotations

import argparse
import shlex
import shutil
import subprocess
import sys
from collections.abc import Callable, Sequence

# Runtime images per TPU generation (https://cloud.google.com/tpu/docs/runtimes).
DEFAULT_VERSIONS = {
    "v2": "tpu-ubuntu2204-base",
    "v3": "tpu-ubuntu2204-base",
    "v4": "tpu-ubuntu2204-base",
    "v5litepod": "v2-alpha-tpuv5-lite",
    "v5p": "v2-alpha-tpuv5",
    "v6e": "v2-alpha-tpuv6e",
}
GCLOUD_TPU = ["gcloud", "compute", "tpus", "tpu-vm"]
UV = '"$HOME/.local/bin/uv"'
Builder = Callable[[argparse.Namespace], list[list[str]]]


def _location(args: argparse.Namespace) -> list[str]:
    flags = [f"--zone={args.zone}"]
    if args.project:
        flags.append(f"--project={args.project}")
    return flags


def _ssh_all(args: argparse.Namespace, remote: str) -> list[str]:
    """One ssh that runs `remote` on every worker of the slice (worker 0 alone on a v4-8)."""
    return [*GCLOUD_TPU, "ssh", args.name, *_location(args), "--worker=all", f"--command={remote}"]


def default_version(accelerator_type: str) -> str:
    """Runtime image for an accelerator type such as `v4-8` or `v5litepod-32`."""
    generation = accelerator_type.split("-")[0]
    if generation not in DEFAULT_VERSIONS:
        raise ValueError(f"no default --version for {accelerator_type!r}; pass --version")
    return DEFAULT_VERSIONS[generation]


def create_commands(args: argparse.Namespace) -> list[list[str]]:
    version = args.version or default_version(args.accelerator_type)
    cmd = [
        *GCLOUD_TPU,
        "create",
        args.name,
        *_location(args),
        f"--accelerator-type={args.accelerator_type}",
        f"--version={version}",
    ]
    if args.spot:
        cmd.append("--spot")
    if args.preemptible:
        cmd.append("--preemptible")
    return [cmd]


def setup_commands(args: argparse.Namespace) -> list[list[str]]:
    """Fetch the code, then build a Python venv with uv.

    uv provides the Python (`--python`, default 3.11): the TPU images ship Python 3.10, which
    current JAX releases no longer support.
    """
    repo, venv = shlex.quote(args.remote_dir), shlex.quote(args.venv)
    commands = []
    if args.repo_url:
        fetch = (
            f"rm -rf {repo} && git clone --quiet {shlex.quote(args.repo_url)} {repo}"
            f" && git -C {repo} checkout --quiet {shlex.quote(args.ref)}"
        )
        commands.append(_ssh_all(args, fetch))
    else:
        # scp into an existing directory would nest the copy inside it, so clear it first.
        commands.append(_ssh_all(args, f"rm -rf {repo}"))
        commands.append(
            [
                *GCLOUD_TPU,
                "scp",
                "--recurse",
                args.local_dir,
                f"{args.name}:{args.remote_dir}",
                *_location(args),
                "--worker=all",
            ]
        )
    package = shlex.quote(f"./{args.remote_dir}[tpu]")
    install = (
        f"(test -x {UV} || curl -LsSf https://astral.sh/uv/install.sh | sh)"
        f" && rm -rf {venv} && {UV} venv --python {shlex.quote(args.python)} {venv}"
        f" && {UV} pip install --python {venv}/bin/python -e {package}"
    )
    commands.append(_ssh_all(args, install))
    return commands


def run_commands(args: argparse.Namespace) -> list[list[str]]:
    """Start the same `echo_jax.main` on all workers, detached so the ssh returns at once; with
    `--shards N`, VM i runs the grid's shard i (`--config.grid.shard=i --config.grid.num_shards=N`).
    """
    for override in args.overrides:
        if not override.startswith("--config."):
            raise ValueError(f"override {override!r} must look like --config.KEY=VALUE")
        if args.shards and override.startswith(("--config.grid.shard=", "--config.grid.num_")):
            raise ValueError(f"--shards sets the grid's shard; drop {override!r}")
    overrides = list(args.overrides)
    if args.shards:
        overrides += [
            f"--config.grid.shard={args.shard}",
            f"--config.grid.num_shards={args.shards}",
        ]
    main = [
        "python",
        "-m",
        "echo_jax.main",
        f"--config={args.config}",
        f"--workdir={args.workdir}",
        *overrides,
    ]
    inner = (
        f"source {shlex.quote(args.venv)}/bin/activate && cd {shlex.quote(args.remote_dir)}"
        f" && export ECHO_JAX_DISTRIBUTED=1 && exec {shlex.join(main)}"
    )
    remote = f"nohup bash -c {shlex.quote(inner)} > {shlex.quote(args.log_file)} 2>&1 < /dev/null &"
    return [_ssh_all(args, remote)]


def delete_commands(args: argparse.Namespace) -> list[list[str]]:
    return [[*GCLOUD_TPU, "delete", args.name, *_location(args)]]


def status_commands(args: argparse.Namespace) -> list[list[str]]:
    commands = [[*GCLOUD_TPU, "describe", args.name, *_location(args)]]
    if args.tail:
        remote = f"tail -n {args.tail} {shlex.quote(args.log_file)}"
        commands.append(
            [*GCLOUD_TPU, "ssh", args.name, *_location(args), "--worker=0", f"--command={remote}"]
        )
    return commands


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tpu.py", description=__doc__.splitlines()[0])
    subparsers = parser.add_subparsers(dest="subcommand", required=True)

    def add(name: str, help_text: str, build: Builder) -> argparse.ArgumentParser:
        sub = subparsers.add_parser(name, help=help_text, description=help_text)
        sub.set_defaults(build=build)
        sub.add_argument("--name", required=True, help="TPU VM name (with --shards: its prefix)")
        sub.add_argument(
            "--shards",
            type=int,
            default=0,
            help="act on the VMs NAME-0 ... NAME-(N-1); `run` gives VM i the grid's shard i",
        )
        sub.add_argument("--zone", required=True, help="e.g. us-central2-b")
        sub.add_argument("--project", help="GCP project (default: gcloud's configured one)")
        sub.add_argument("--dry-run", action="store_true", help="print commands, run nothing")
        return sub

    create = add("create", "Create a TPU VM or pod slice.", create_commands)
    create.add_argument("--accelerator-type", required=True, help="e.g. v4-8, v5litepod-32")
    create.add_argument("--version", help="runtime image (default: by TPU generation)")
    capacity = create.add_mutually_exclusive_group()
    capacity.add_argument("--spot", action="store_true", help="spot capacity")
    capacity.add_argument("--preemptible", action="store_true", help="preemptible capacity")

    setup = add("setup", "Copy or clone the repo on every worker and install it.", setup_commands)
    source = setup.add_mutually_exclusive_group(required=True)
    source.add_argument("--repo-url", help="git URL to clone on every worker")
    source.add_argument("--local-dir", help="local checkout to copy with scp --recurse")
    setup.add_argument("--ref", default="main", help="git branch, tag or commit (--repo-url)")
    setup.add_argument("--python", default="3.11", help="Python version for the venv")

    run = add("run", "Start echo_jax.main on all workers (ECHO_JAX_DISTRIBUTED=1).", run_commands)
    run.add_argument("--config", required=True, help="e.g. configs/lm_pretrain.py:150m")
    run.add_argument("--workdir", required=True, help="shared by all workers, e.g. gs://b/run1")
    run.add_argument(
        "overrides",
        nargs="*",
        help="config overrides after '--', e.g. -- --config.train.num_steps=1000",
    )

    add("delete", "Delete the TPU VM.", delete_commands)

    status = add(
        "status", "Describe the TPU VM; optionally tail worker 0's run log.", status_commands
    )
    status.add_argument("--tail", type=int, default=0, help="log lines to show (0: none)")

    for sub in (setup, run):
        sub.add_argument("--remote-dir", default="echo_jax", help="repo location on workers")
        sub.add_argument("--venv", default="echo_jax_venv", help="venv location on workers")
    for sub in (run, status):
        sub.add_argument("--log-file", default="echo_jax.log", help="run log on each worker")
    return parser


def commands_for(args: argparse.Namespace) -> list[list[str]]:
    """The subcommand's commands, for one VM or (`--shards N`) for each of NAME-0 ... NAME-(N-1)."""
    if args.shards < 0:
        raise ValueError(f"--shards must be >= 1, got {args.shards}")
    if not args.shards:
        return args.build(args)
    commands = []
    for shard in range(args.shards):
        one = argparse.Namespace(**{**vars(args), "name": f"{args.name}-{shard}", "shard": shard})
        commands += args.build(one)
    return commands


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        commands = commands_for(args)
    except ValueError as e:
        parser.error(str(e))
    if args.subcommand == "run" and not args.workdir.startswith("gs://"):
        print(
            "warning: --workdir is not a gs:// path; on a multi-host slice every worker "
            "writes its own local copy",
            file=sys.stderr,
        )
    if args.dry_run:
        for cmd in commands:
            print(shlex.join(cmd))
        return 0
    if shutil.which("gcloud") is None:
        sys.exit(
            "error: gcloud not found on PATH; install the Google Cloud CLI "
            "(https://cloud.google.com/sdk/docs/install) or use --dry-run"
        )
    for cmd in commands:
        result = subprocess.run(cmd, check=False)
        if result.returncode:
            sys.exit(f"error: exit status {result.returncode}: {shlex.join(cmd)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
